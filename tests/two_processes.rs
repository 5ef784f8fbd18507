//! Two processes, one store: the app and the iOS notification extension decrypt interleaved
//! batches for the same device. The cross-process lock and the generation counter make each
//! process reload state another process wrote, so no ratchet step is lost and no session breaks.
//!
//! The two-process test proves the contention instead of assuming it: both workers are alive at
//! once, their commits (ordered by the store generation each one left, from the `testing`
//! feature's phase markers) alternate between the two processes, a worker is seen waiting for the
//! lock, and when one worker is SIGKILLed mid-batch while holding the lock, the other one takes
//! the lock over and carries on, including with the batch the killed one never committed.
#![cfg(unix)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use to_device_crypto::fail_point::{Marker, Phase, PAUSE_AT_ENV, PHASE_MARKERS_ENV};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, Recipient, SimulatedDevice};
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{OlmMachine, StoreKey, ToDeviceOutcome};

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");

fn batch(
    senders: &mut [SimulatedDevice],
    to: &Recipient,
    first_seq: u64,
    size: usize,
) -> Vec<String> {
    (0..size)
        .map(|i| {
            let n = senders.len();
            senders[i % n]
                .encrypt(to, "m.room_key", json!({"seq": first_seq + i as u64}))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn two_long_lived_machines_on_one_store_never_use_a_stale_ratchet() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let open = || async {
        let store = SqliteStore::open(
            dir.path().join("shared.sqlite3"),
            key.clone(),
            Synchronous::Normal,
        )
        .unwrap();
        OlmMachine::open("@bob:example.org", "BOBPHONE", Arc::new(store))
            .await
            .unwrap()
    };
    let app = open().await;
    let extension = open().await;
    let keys = publish_machine_keys(&app, 3).await.unwrap();
    let to_bob = recipient_of(&app);
    let mut senders: Vec<SimulatedDevice> = (0..3)
        .map(|i| {
            let mut sender = SimulatedDevice::new(&format!("@s{i}:example.org"), "DEV");
            sender.create_session(&keys, Some(keys.one_time_keys[i].key));
            sender
        })
        .collect();
    let mut seq = 0;
    for round in 0..20 {
        // Alternate: each machine's cached sessions are stale after the other one's batch.
        let machine = if round % 2 == 0 { &app } else { &extension };
        let events = batch(&mut senders, &to_bob, seq, 15);
        seq += 15;
        for outcome in machine.receive_to_device_events(&events).await.unwrap() {
            assert!(
                matches!(outcome, ToDeviceOutcome::Decrypted(_)),
                "round {round}: {outcome:?}"
            );
        }
        if round == 5 {
            // The extension replies: that advances the ratchets, and the senders' next messages
            // need the extension's new ratchet keys, which the app's cache does not have.
            for sender in &mut senders {
                let reply = machine
                    .encrypt(&sender.published_keys(), "m.dummy", &[json!({})])
                    .await
                    .unwrap();
                sender
                    .decrypt(&reply[0])
                    .expect("the sender decrypts the reply");
            }
        }
    }
}

// ---- Two worker processes ------------------------------------------------------------------

/// Set in a worker process: the SQLite store directory (made by the CLI's `keys`) it opens.
const WORKER_ENV: &str = "TDC_TWO_PROCESSES_WORKER";
/// The name of the test below, which its worker processes run again in worker mode.
const TEST_NAME: &str = "two_worker_processes_contend_for_the_lock_and_survive_each_others_kill";
/// How long a worker waits between two batches, as an app waits for its next `/sync`: long
/// enough for the other worker, polling the lock every 5 ms, to take it.
const WORKER_PAUSE: Duration = Duration::from_millis(25);
const SENDERS: usize = 8;
/// Two messages per sender per batch: a worker that runs ahead skips at most 2 message keys per
/// batch of the other's, far from vodozemac's limit of 40 skipped keys per chain.
const BATCH_SIZE: usize = 16;
/// Contended batches per worker before the extension replies to the senders (pre-key messages),
/// and after (normal messages, on the ratchet the extension's reply started).
const PRE_KEY_BATCHES_PER_WORKER: usize = 8;
const NORMAL_BATCHES_PER_WORKER: usize = 6;
const BATCHES_PER_WORKER: usize = PRE_KEY_BATCHES_PER_WORKER + NORMAL_BATCHES_PER_WORKER;
/// The fewest hand-overs of the lock between the two workers the test accepts.
const MIN_ALTERNATIONS: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(120);
const SIGKILL: i32 = 9;
const RESULT_PREFIX: &str = "worker-result ";
const DONE_PREFIX: &str = "worker-done ";
const REPLIED_PREFIX: &str = "worker-replied ";

/// Worker mode: opens the store, then follows the commands on stdin until their end:
/// - `decrypt FILE`: decrypts the batch in FILE, prints one `worker-result` line per outcome,
///   acknowledges, prints `worker-done FILE` and waits [`WORKER_PAUSE`];
/// - `reply KEYS OUT`: encrypts an `m.dummy` for the device whose `/keys/upload` body is in KEYS
///   (on the session its messages created), writes the events to OUT, prints `worker-replied OUT`.
fn run_worker(store_dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key_hex = std::fs::read_to_string(store_dir.join("store.key")).unwrap();
    let key = StoreKey::from_hex(&key_hex).expect("the CLI's store key file");
    let store = SqliteStore::open(store_dir.join("store.sqlite3"), key, Synchronous::Normal)
        .expect("the worker opens the shared store");
    let machine = runtime
        .block_on(OlmMachine::open(common::BOB, "BOBPHONE", Arc::new(store)))
        .expect("the worker opens the machine");
    let mut stdout = std::io::stdout().lock();
    for command in std::io::stdin().lines() {
        let command = command.unwrap();
        if let Some(files) = command.strip_prefix("reply ") {
            let (keys, out) = files.split_once(' ').expect("reply KEYS OUT");
            let keys: Value =
                serde_json::from_str(&std::fs::read_to_string(keys).unwrap()).unwrap();
            let keys = to_device_crypto::keys::parse_keys_upload_body(&keys).unwrap();
            let reply = runtime
                .block_on(machine.encrypt(&keys, "m.dummy", &[json!({})]))
                .expect("the worker encrypts its reply");
            std::fs::write(out, Value::Array(reply).to_string()).unwrap();
            writeln!(stdout, "{REPLIED_PREFIX}{out}").unwrap();
            stdout.flush().unwrap();
            continue;
        }
        let path = command
            .strip_prefix("decrypt ")
            .expect("decrypt FILE or reply KEYS OUT");
        let events: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let raw: Vec<String> = events.iter().map(Value::to_string).collect();
        let outcomes = runtime
            .block_on(machine.receive_to_device_events(&raw))
            .expect("the worker's batch commits");
        let mut handled = Vec::new();
        for outcome in &outcomes {
            let line = match outcome {
                ToDeviceOutcome::Decrypted(event) => {
                    handled.push(event.id.clone());
                    json!({"seq": event.content["seq"], "pending": event.re_emitted})
                }
                ToDeviceOutcome::Failed(failed) => {
                    json!({"failed": failed.error.reason().analytics_name(), "error": failed.error.to_string()})
                }
                ToDeviceOutcome::Plaintext(event) => json!({"plaintext": event}),
            };
            writeln!(stdout, "{RESULT_PREFIX}{line}").unwrap();
        }
        stdout.flush().unwrap();
        runtime
            .block_on(machine.acknowledge(&handled))
            .expect("the worker acknowledges");
        writeln!(stdout, "{DONE_PREFIX}{path}").unwrap();
        stdout.flush().unwrap();
        std::thread::sleep(WORKER_PAUSE);
    }
}

/// A line from a worker, as the test reads it.
enum Line {
    Result(Value),
    Done(PathBuf),
    Replied(PathBuf),
    Marker(Marker),
    /// Anything else on stderr, kept for failure messages.
    Other(String),
}

struct Worker {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Worker {
    fn spawn(
        name: &'static str,
        store_dir: &Path,
        pause_at: Option<&str>,
        lines: &mpsc::Sender<(&'static str, Line)>,
    ) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
            .env(WORKER_ENV, store_dir)
            .env(PHASE_MARKERS_ENV, "1")
            .env_remove(PAUSE_AT_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pause_at) = pause_at {
            command.env(PAUSE_AT_ENV, pause_at);
        }
        let mut child = command.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let sender = lines.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                // The test harness writes `test <name> ... ` before the test runs, without a line
                // break: the worker's first line follows it.
                let parsed = if let Some((_, result)) = line.split_once(RESULT_PREFIX) {
                    Line::Result(serde_json::from_str(result).unwrap())
                } else if let Some((_, path)) = line.split_once(DONE_PREFIX) {
                    Line::Done(PathBuf::from(path))
                } else if let Some((_, path)) = line.split_once(REPLIED_PREFIX) {
                    Line::Replied(PathBuf::from(path))
                } else {
                    continue; // the test harness's own lines
                };
                if sender.send((name, parsed)).is_err() {
                    break;
                }
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sender = lines.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let parsed = match Marker::parse(&line) {
                    Some(marker) => Line::Marker(marker),
                    None => Line::Other(line),
                };
                if sender.send((name, parsed)).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self { name, child, stdin }
    }

    fn command(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("the worker's input is open");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    fn feed(&mut self, batch: &Path) {
        self.command(&format!("decrypt {}", batch.display()));
    }
}

/// What the test has seen of both workers.
#[derive(Default)]
struct Observed {
    delivered: BTreeSet<u64>,
    /// `(store generation after the commit, worker)` of every batch committed.
    commits: Vec<(u64, &'static str)>,
    lock_waits: Vec<&'static str>,
    decrypted: Vec<&'static str>,
    done: Vec<(&'static str, PathBuf)>,
    replies: Vec<PathBuf>,
    stderr: Vec<String>,
}

impl Observed {
    fn take(&mut self, worker: &'static str, line: Line) {
        match line {
            Line::Result(result) => {
                assert!(
                    result.get("failed").is_none() && result.get("plaintext").is_none(),
                    "{worker}: every event decrypts, but: {result}"
                );
                assert_eq!(result["pending"], false, "{worker}: {result}");
                let seq = result["seq"].as_u64().unwrap();
                assert!(
                    self.delivered.insert(seq),
                    "{worker}: message {seq} delivered twice"
                );
            }
            Line::Done(path) => self.done.push((worker, path)),
            Line::Replied(path) => self.replies.push(path),
            Line::Marker(Marker::LockWaiting) => self.lock_waits.push(worker),
            Line::Marker(Marker::Phase {
                phase: Phase::Committed,
                generation,
            }) => self.commits.push((
                generation.expect("a commit marker has its generation"),
                worker,
            )),
            Line::Marker(Marker::Phase {
                phase: Phase::Decrypted,
                ..
            }) => self.decrypted.push(worker),
            Line::Marker(Marker::Phase { .. }) => {}
            Line::Other(text) => self.stderr.push(format!("{worker}: {text}")),
        }
    }

    /// Reads lines until `until` holds, failing after [`TIMEOUT`].
    fn wait(
        &mut self,
        lines: &mpsc::Receiver<(&'static str, Line)>,
        what: &str,
        until: impl Fn(&Self) -> bool,
    ) {
        let started = Instant::now();
        while !until(self) {
            let left = TIMEOUT.checked_sub(started.elapsed()).unwrap_or_else(|| {
                panic!(
                    "timed out waiting for {what}; workers' stderr:\n{}",
                    self.stderr.join("\n")
                )
            });
            match lines.recv_timeout(left) {
                Ok((worker, line)) => self.take(worker, line),
                Err(error) => panic!(
                    "waiting for {what}: {error}; workers' stderr:\n{}",
                    self.stderr.join("\n")
                ),
            }
        }
    }

    fn count(list: &[&'static str], worker: &str) -> usize {
        list.iter().filter(|&&w| w == worker).count()
    }

    /// How many batches `worker` finished, counted only once their commit markers (on the other
    /// pipe) are in too.
    fn done_by(&self, worker: &str) -> usize {
        let done = self.done.iter().filter(|(w, _)| *w == worker).count();
        let committed = self.commits.iter().filter(|(_, w)| *w == worker).count();
        done.min(committed)
    }

    /// How many times the next commit (in store generation order) came from the other worker.
    fn alternations(&self) -> usize {
        let mut commits = self.commits.clone();
        commits.sort_unstable();
        commits.windows(2).filter(|w| w[0].1 != w[1].1).count()
    }
}

#[test]
fn two_worker_processes_contend_for_the_lock_and_survive_each_others_kill() {
    if let Some(store_dir) = std::env::var_os(WORKER_ENV) {
        return run_worker(Path::new(&store_dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("bob");
    let (to_bob, mut senders) = common::cli_bob_with_senders(BIN, &store_dir, SENDERS);
    let mut seq = 0u64;
    let mut batch_files = Vec::new();
    let mut next_batch = |senders: &mut [SimulatedDevice]| {
        let events = batch(senders, &to_bob, seq, BATCH_SIZE);
        seq += BATCH_SIZE as u64;
        let path = dir.path().join(format!("batch-{}.json", batch_files.len()));
        std::fs::write(&path, format!("[{}]", events.join(","))).unwrap();
        batch_files.push(path.clone());
        path
    };

    let (lines_tx, lines) = mpsc::channel();
    // The app pauses mid-batch (decrypted, not committed, holding the lock) in its batch after
    // the contended ones, to be killed there.
    let pause_at = format!("{}@{}", Phase::Decrypted.name(), BATCHES_PER_WORKER + 1);
    let mut app = Worker::spawn("app", &store_dir, Some(&pause_at), &lines_tx);
    let mut extension = Worker::spawn("extension", &store_dir, None, &lines_tx);
    drop(lines_tx);
    let mut seen = Observed::default();

    // 1. Contention: both workers get their batches at once and run side by side. Half-way, the
    // extension replies to every sender: their next (normal) messages need the ratchet it
    // started, which the app's cached sessions lack until it reloads what the extension wrote.
    let mut contend = |rounds: usize,
                       senders: &mut [SimulatedDevice],
                       app: &mut Worker,
                       extension: &mut Worker,
                       seen: &mut Observed| {
        let (app_done, extension_done) = (seen.done_by("app"), seen.done_by("extension"));
        for _ in 0..rounds {
            let path = next_batch(senders);
            app.feed(&path);
            let path = next_batch(senders);
            extension.feed(&path);
        }
        seen.wait(&lines, "both workers' batches", |seen| {
            seen.done_by("app") == app_done + rounds
                && seen.done_by("extension") == extension_done + rounds
        });
    };
    contend(
        PRE_KEY_BATCHES_PER_WORKER,
        &mut senders,
        &mut app,
        &mut extension,
        &mut seen,
    );
    for (i, sender) in senders.iter_mut().enumerate() {
        let keys = dir.path().join(format!("sender-{i}-keys.json"));
        let out = dir.path().join(format!("reply-{i}.json"));
        std::fs::write(
            &keys,
            json!({"device_keys": sender.device_keys()}).to_string(),
        )
        .unwrap();
        extension.command(&format!("reply {} {}", keys.display(), out.display()));
        seen.wait(&lines, "the extension's reply", |seen| {
            seen.replies.contains(&out)
        });
        let reply: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        sender
            .decrypt(&reply[0])
            .expect("the sender decrypts the extension's reply");
    }
    contend(
        NORMAL_BATCHES_PER_WORKER,
        &mut senders,
        &mut app,
        &mut extension,
        &mut seen,
    );
    let alternations = seen.alternations();
    let generations: BTreeSet<u64> = seen.commits.iter().map(|(g, _)| *g).collect();
    assert_eq!(
        generations.len(),
        seen.commits.len(),
        "two commits left the same generation: the lock did not serialise them"
    );
    let contended_waits = seen.lock_waits.len();

    // 2. The app is killed mid-batch while the extension waits for the lock.
    let killed_batch = next_batch(&mut senders);
    app.feed(&killed_batch);
    seen.wait(&lines, "the app paused mid-batch", |seen| {
        Observed::count(&seen.decrypted, "app") == BATCHES_PER_WORKER + 1
    });
    let waits_before = Observed::count(&seen.lock_waits, "extension");
    let path = next_batch(&mut senders);
    extension.feed(&path);
    seen.wait(&lines, "the extension waiting for the app's lock", |seen| {
        Observed::count(&seen.lock_waits, "extension") > waits_before
    });
    assert_eq!(
        app.child.try_wait().unwrap(),
        None,
        "{}: both workers are alive while one waits for the other",
        app.name
    );
    app.child.kill().unwrap();
    let status = app.child.wait().unwrap();
    assert_eq!(status.signal(), Some(SIGKILL), "the app died of {status}");
    drop(app.stdin.take());

    // 3. The extension carries on: its waiting batch, the batch the app never committed, more.
    extension.feed(&killed_batch);
    for _ in 0..3 {
        let path = next_batch(&mut senders);
        extension.feed(&path);
    }
    seen.wait(&lines, "the extension's remaining batches", |seen| {
        seen.done_by("extension") == BATCHES_PER_WORKER + 5
    });
    drop(extension.stdin.take());
    let output = extension.child.wait().unwrap();
    assert!(output.success(), "the extension ended with {output}");

    println!(
        "two processes: {} commits, the lock changed hands {alternations} times while both ran \
         ({contended_waits} waits for the lock), then {} waited for the app paused mid-batch, \
         which was SIGKILLed; {} took over and delivered all {} messages",
        seen.commits.len(),
        extension.name,
        extension.name,
        seen.delivered.len()
    );
    assert!(
        alternations >= MIN_ALTERNATIONS,
        "the lock changed hands only {alternations} times: the workers did not run side by side"
    );
    assert_eq!(
        seen.delivered,
        (0..seq).collect::<BTreeSet<u64>>(),
        "every message delivered exactly once"
    );
}
