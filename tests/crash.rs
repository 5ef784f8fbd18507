//! Crash test: four senders send 2,100 to-device messages in 21 `/sync` batches of 100 (pre-key
//! messages in the first 10 batches; normal messages after the receiver replies, in the last 11;
//! a few invalid events in each) to a receiving CLI process (built with the `testing` feature),
//! which is killed again and again while it decrypts; after each kill the same batch is fed again.
//!
//! Every batch gets, in both parts:
//! - one SIGKILL at each of the five phases (opened, decrypted, committed, printed, acknowledged):
//!   the CLI pauses at the phase (`TDC_PAUSE_AT`) and is killed when its marker appears;
//! - one fail point (`TDC_FAIL_POINT`, SIGABRT) at a phase that rotates with the batch number;
//! - SIGKILLs after random delays, attributed to the last phase marker the process wrote;
//! - a final clean run.
//!
//! A kill counts only when the process died of SIGKILL; every other run must exit 0 (a fail point
//! run: die of SIGABRT at its fail point), else the test fails with the run's stderr.
//!
//! Asserts: every valid message is delivered at least once, re-emissions happened and every
//! repeat is marked as one (`"pending": true`), no session ever breaks (no SessionWedged,
//! MissingSession, UnknownOneTimeKey or SessionCreation), every phase was killed and failed in
//! both parts, and over 200 SIGKILLs landed.
#![cfg(unix)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use to_device_crypto::fail_point::{
    Marker, Phase, FAIL_POINT_ENV, PAUSE_AT_ENV, PHASE_MARKERS_ENV,
};

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");
const SENDERS: usize = 4;
const BATCHES: usize = 21;
/// Batches before this one hold pre-key messages; then the receiver replies once per session.
const FIRST_NORMAL_BATCH: usize = 10;
const BATCH_SIZE: usize = 100;
const RANDOM_KILLS_PER_BATCH: usize = 6;
/// How long a run may take before the test gives up on it (a hung CLI must fail, not hang CI).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const BROKEN: [&str; 4] = [
    "ToDeviceFailedToDecrypt_SessionWedged",
    "ToDeviceFailedToDecrypt_MissingSession",
    "ToDeviceFailedToDecrypt_UnknownOneTimeKey",
    "ToDeviceFailedToDecrypt_SessionCreation",
];

/// The phases this test kills at: every phase of a run, except [`Phase::AnalyticsWritten`], which a
/// run reaches only with `--analytics-out` and a failure to report (these batches are all valid);
/// tests/analytics_cli.rs kills there and checks that no payload is lost.
const RESULT_PHASES: [Phase; 5] = [
    Phase::Opened,
    Phase::Decrypted,
    Phase::Committed,
    Phase::Printed,
    Phase::Acknowledged,
];

/// A small deterministic generator (xorshift64*): reproducible kill points without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    PreKey,
    Normal,
}

/// How one run of `decrypt` is meant to end.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Pause at the phase and SIGKILL the process when its marker appears.
    KillAt(Phase),
    /// SIGKILL after a delay (the run may finish first: then it must have exited 0).
    KillAfter(Duration),
    /// Abort at the phase's fail point.
    FailPoint(Phase),
    /// Run to the end.
    Clean,
}

/// What a run did.
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    /// The last phase whose marker the process wrote before it ended.
    last_phase: Option<Phase>,
}

impl Run {
    fn describe(&self, plan: Plan) -> String {
        format!(
            "{plan:?}: the CLI ended with {} (signal {:?}); its stderr:\n{}",
            self.status,
            self.status.signal(),
            self.stderr
        )
    }
}

/// Runs `decrypt` on `batch` according to `plan`, with phase markers on.
fn run_decrypt(store: &Path, batch: &Path, plan: Plan) -> Run {
    let mut command = Command::new(BIN);
    command
        .args([
            "decrypt",
            "--store",
            store.to_str().unwrap(),
            batch.to_str().unwrap(),
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .env_remove(FAIL_POINT_ENV)
        .env_remove(PAUSE_AT_ENV)
        .env(PHASE_MARKERS_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match plan {
        Plan::KillAt(phase) => {
            command.env(PAUSE_AT_ENV, phase.name());
        }
        Plan::FailPoint(phase) => {
            command.env(FAIL_POINT_ENV, phase.name());
        }
        Plan::KillAfter(_) | Plan::Clean => {}
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    // Both pipes are drained while the process runs: a full pipe would block it before it reaches
    // the phase it is to be killed at.
    let mut stdout = child.stdout.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr_lines = Vec::new();
    let mut last_phase = None;
    let mut note = |line: String, last_phase: &mut Option<Phase>| {
        if let Some(Marker::Phase { phase, .. }) = Marker::parse(&line) {
            *last_phase = Some(phase);
        }
        stderr_lines.push(line);
    };
    match plan {
        Plan::KillAt(target) => loop {
            let Some(left) = RUN_TIMEOUT.checked_sub(started.elapsed()) else {
                let _ = child.kill();
                panic!("{plan:?}: no {target} marker after {RUN_TIMEOUT:?}");
            };
            match lines.recv_timeout(left) {
                Ok(line) => {
                    note(line, &mut last_phase);
                    if last_phase == Some(target) {
                        child.kill().unwrap();
                        break;
                    }
                }
                // The process ended without reaching the phase: the checks below report it.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        },
        Plan::KillAfter(delay) => {
            std::thread::sleep(delay);
            let _ = child.kill();
        }
        Plan::FailPoint(_) | Plan::Clean => {}
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            panic!("{plan:?}: the CLI ran for over {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The writing ends are closed now: the readers finish.
    for line in lines.iter() {
        note(line, &mut last_phase);
    }
    Run {
        status,
        stdout: stdout_reader.join().unwrap(),
        stderr: stderr_lines.join("\n"),
        last_phase,
    }
}

#[derive(Default)]
struct Tally {
    runs: usize,
    /// SIGKILLs by part and by the last phase reached (`None`: before the store was open).
    kills: BTreeMap<(Part, Option<Phase>), usize>,
    /// Deterministic SIGKILLs (paused at the phase) by part and phase.
    kills_at_phase: BTreeMap<(Part, Phase), usize>,
    fail_points: BTreeMap<(Part, Phase), usize>,
    first_deliveries: HashMap<u64, usize>,
    re_emissions: usize,
}

impl Tally {
    fn total_kills(&self) -> usize {
        self.kills.values().sum()
    }

    /// Checks how the run ended against its plan and counts it.
    fn record(&mut self, part: Part, plan: Plan, run: &Run) {
        self.runs += 1;
        let killed = run.status.signal() == Some(SIGKILL);
        match plan {
            Plan::KillAt(phase) => {
                assert!(killed, "{}", run.describe(plan));
                assert_eq!(run.last_phase, Some(phase), "{}", run.describe(plan));
                *self.kills_at_phase.entry((part, phase)).or_default() += 1;
            }
            Plan::KillAfter(_) => {
                // The run may have finished before the kill: then it must have succeeded.
                assert!(killed || run.status.success(), "{}", run.describe(plan));
            }
            Plan::FailPoint(phase) => {
                assert_eq!(run.status.signal(), Some(SIGABRT), "{}", run.describe(plan));
                assert!(
                    run.stderr.contains(&format!("fail point {phase} hit")),
                    "{}",
                    run.describe(plan)
                );
                *self.fail_points.entry((part, phase)).or_default() += 1;
            }
            Plan::Clean => assert!(run.status.success(), "{}", run.describe(plan)),
        }
        if killed {
            *self.kills.entry((part, run.last_phase)).or_default() += 1;
        }
        self.read(&run.stdout);
    }

    fn read(&mut self, stdout: &[u8]) {
        for line in String::from_utf8_lossy(stdout).lines() {
            // A kill can cut the last line short: only whole lines reached the app.
            let Ok(line) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(name) = line["name"].as_str() {
                assert!(!BROKEN.contains(&name), "a session broke: {line}");
            }
            if line["result"] != "decrypted" {
                continue;
            }
            let seq = line["content"]["seq"]
                .as_u64()
                .expect("every valid message has a seq");
            if line["pending"] == true {
                self.re_emissions += 1;
            } else {
                *self.first_deliveries.entry(seq).or_default() += 1;
            }
            self.first_deliveries.entry(seq).or_default();
        }
    }

    fn print(&self, valid: u64, delivered: usize, unmarked_repeats: usize, started: Instant) {
        println!(
            "crash test, per part and phase: SIGKILLs while paused at the phase / all SIGKILLs \
             after its marker (random ones included) / fail points (SIGABRT)"
        );
        println!(
            "  {:<14} {:>18} {:>18}",
            "phase", "pre-key part", "normal part"
        );
        let phases = std::iter::once(None).chain(RESULT_PHASES.into_iter().map(Some));
        for phase in phases {
            let cell = |part| {
                let all = self.kills.get(&(part, phase)).copied().unwrap_or(0);
                match phase {
                    Some(phase) => {
                        let paused = self.kills_at_phase.get(&(part, phase)).unwrap_or(&0);
                        let aborted = self.fail_points.get(&(part, phase)).unwrap_or(&0);
                        format!("{paused} / {all} / {aborted}")
                    }
                    None => format!("- / {all} / -"),
                }
            };
            let label = phase.map_or("(not opened)", Phase::name);
            println!(
                "  {label:<14} {:>18} {:>18}",
                cell(Part::PreKey),
                cell(Part::Normal)
            );
        }
        println!(
            "crash test: {} runs, {} SIGKILLs, delivered {delivered}/{valid}, re-emissions {} marked and {unmarked_repeats} unmarked, {:.1} s",
            self.runs,
            self.total_kills(),
            self.re_emissions,
            started.elapsed().as_secs_f64()
        );
    }
}

/// The receiver replies once to each sender: from then on, the senders send normal messages.
fn reply_to_senders(
    dir: &Path,
    store: &Path,
    senders: &mut [to_device_crypto::simulator::SimulatedDevice],
) {
    for sender in senders {
        let keys_file = dir.join(format!("{}.json", sender.device_id()));
        std::fs::write(
            &keys_file,
            json!({"device_keys": sender.device_keys()}).to_string(),
        )
        .unwrap();
        let reply = Command::new(BIN)
            .args([
                "encrypt",
                "--store",
                store.to_str().unwrap(),
                "--recipient-keys",
                keys_file.to_str().unwrap(),
                "--type",
                "m.dummy",
                "--content",
                "{}",
            ])
            .output()
            .unwrap();
        assert!(
            reply.status.success(),
            "{}",
            String::from_utf8_lossy(&reply.stderr)
        );
        let reply: Vec<Value> = serde_json::from_slice(&reply.stdout).unwrap();
        sender
            .decrypt(&reply[0])
            .expect("the sender decrypts the reply");
    }
}

#[test]
fn killed_at_every_phase_and_at_random_points_no_message_is_lost_and_no_session_breaks() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let (to_bob, mut senders) = common::cli_bob_with_senders(BIN, &store, SENDERS);

    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let mut valid = 0u64;
    let mut typical = Duration::from_millis(200);
    for batch_number in 0..BATCHES {
        if batch_number == FIRST_NORMAL_BATCH {
            reply_to_senders(dir.path(), &store, &mut senders);
        }
        let part = if batch_number < FIRST_NORMAL_BATCH {
            Part::PreKey
        } else {
            Part::Normal
        };
        let events: Vec<Value> = (0..BATCH_SIZE)
            .map(|i| {
                if i % 45 == 44 {
                    // A few invalid events: a Megolm event sent as to-device, and garbage.
                    return if i == 44 { json!({"type": "m.room.encrypted", "sender": "@x:y", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}) } else { json!(["not", "an", "event"]) };
                }
                let sender = &mut senders[(i + batch_number) % SENDERS];
                seq += 1;
                valid += 1;
                let event = sender.encrypt(&to_bob, "m.room_key", json!({"seq": seq, "pad": "x".repeat(300)}));
                let expected_type = if part == Part::PreKey { 0 } else { 1 };
                assert_eq!(common::message_type(&event), expected_type, "{part:?} batch");
                event
            })
            .collect();
        let batch_file = dir.path().join(format!("batch-{batch_number}.json"));
        std::fs::write(&batch_file, serde_json::to_string(&events).unwrap()).unwrap();

        let mut plans: Vec<Plan> = RESULT_PHASES.into_iter().map(Plan::KillAt).collect();
        plans.push(Plan::FailPoint(
            RESULT_PHASES[batch_number % RESULT_PHASES.len()],
        ));
        for plan in plans {
            let run = run_decrypt(&store, &batch_file, plan);
            tally.record(part, plan, &run);
        }
        // Random kills on top, for variety: anywhere, including mid-phase.
        let mut random_kills = 0;
        let mut attempts = 0;
        while random_kills < RANDOM_KILLS_PER_BATCH && attempts < 8 * RANDOM_KILLS_PER_BATCH {
            attempts += 1;
            let delay =
                Duration::from_micros(rng.next() % (typical.as_micros() as u64 * 6 / 5 + 1));
            let plan = Plan::KillAfter(delay);
            let run = run_decrypt(&store, &batch_file, plan);
            tally.record(part, plan, &run);
            if run.status.signal() == Some(SIGKILL) {
                random_kills += 1;
            }
        }
        let clean_start = Instant::now();
        let run = run_decrypt(&store, &batch_file, Plan::Clean);
        typical = clean_start.elapsed();
        tally.record(part, Plan::Clean, &run);
    }

    let delivered = (1..=valid)
        .filter(|s| tally.first_deliveries.contains_key(s))
        .count();
    let duplicated_unmarked = tally.first_deliveries.values().filter(|&&n| n > 1).count();
    tally.print(valid, delivered, duplicated_unmarked, started);
    for part in [Part::PreKey, Part::Normal] {
        for phase in RESULT_PHASES {
            assert!(
                tally.kills_at_phase.get(&(part, phase)) >= Some(&1),
                "no SIGKILL at {phase} in the {part:?} part"
            );
            assert!(
                tally.fail_points.get(&(part, phase)) >= Some(&1),
                "no fail point at {phase} in the {part:?} part"
            );
        }
    }
    assert!(
        tally.total_kills() >= 200,
        "only {} kills landed",
        tally.total_kills()
    );
    assert_eq!(delivered as u64, valid, "a valid message was lost");
    assert!(
        tally.re_emissions > 0,
        "no result was ever re-emitted: the kills after a commit did not exercise the outbox"
    );
    assert_eq!(
        duplicated_unmarked, 0,
        "a repeat was not marked as a re-emission"
    );
}
