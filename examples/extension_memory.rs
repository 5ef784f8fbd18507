//! The library's peak memory in a notification-extension-sized run, measured in a fresh process.
//!
//! `cargo run --release --example extension_memory` prints, for a batch of 20 and of 200
//! to-device events, the peak resident memory (Linux `VmHWM`) over the process's resident memory
//! just before the library was first used. Each measurement runs in its own process, the way the
//! iOS notification service extension starts: open the SQLite store (100 sessions, 50 known
//! devices), add a failure listener, decrypt one `/sync` batch (mostly `m.room_key`-sized
//! messages, one in ten failing), deliver its analytics, acknowledge its results.
//!
//! Sub-commands (used by the default run, which spawns itself): `setup DIR EVENTS` builds a store
//! and a batch in DIR; `measure DIR` measures one batch and prints `peak_kib baseline_kib`. An
//! argument `N` alone sets the runs per size (default 2); `EXTENSION_MEMORY_STOP=open` or
//! `=listener` stops each run after opening the store or adding the listener (a breakdown).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use to_device_crypto::ffi::{self, DecryptionFailureListener, PosthogErrorEvent};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, SimulatedDevice};
use to_device_crypto::store::Synchronous;
use to_device_crypto::{OlmMachine, SqliteStore, StoreKey};

const STORE_KEY: [u8; 32] = [42; 32];
const SESSIONS: usize = 100;
const KNOWN_DEVICES: usize = 50;
const BOB: &str = "@bob:example.org";
const DEVICE: &str = "BOBPHONE";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("setup") => setup(Path::new(&args[2]), args[3].parse().unwrap()),
        Some("measure") => measure(Path::new(&args[2])),
        _ => report(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2)),
    }
}

/// Status line `field` of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn report(runs: usize) {
    let exe = std::env::current_exe().unwrap();
    println!("| events | run | library peak over baseline | baseline RSS |");
    println!("|---:|---:|---:|---:|");
    for events in [20usize, 200] {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new(&exe)
            .args(["setup", dir.path().to_str().unwrap(), &events.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "setup failed");
        for run in 1..=runs {
            // Every run starts from the same store and batch.
            let copy = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
            }
            let output = Command::new(&exe)
                .args(["measure", copy.path().to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8(output.stdout).unwrap();
            let numbers: Vec<u64> = text
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect();
            let (peak, baseline) = (numbers[0], numbers[1]);
            println!(
                "| {events} | {run} | {:.2} MiB | {:.2} MiB |",
                peak as f64 / 1024.0,
                baseline as f64 / 1024.0
            );
        }
    }
}

fn store_path(dir: &Path) -> PathBuf {
    dir.join("store.sqlite3")
}

/// Builds the store (100 established sessions, 50 known devices) and the batch.
fn setup(dir: &Path, events: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = SqliteStore::open(
            store_path(dir),
            StoreKey::from_bytes(STORE_KEY),
            Synchronous::Normal,
        )
        .unwrap();
        let bob = OlmMachine::open(BOB, DEVICE, Arc::new(store)).await.unwrap();
        let to_bob = recipient_of(&bob);
        let mut senders = Vec::new();
        let mut device_keys = serde_json::Map::new();
        // An account holds at most 50 one-time keys: publish in rounds, each used at once.
        while senders.len() < SESSIONS {
            let keys = publish_machine_keys(&bob, SESSIONS - senders.len())
                .await
                .unwrap();
            for key in &keys.one_time_keys {
                if senders.len() == SESSIONS {
                    break;
                }
                let i = senders.len();
                let user = format!("@sender{i}:example.org");
                let mut sender = SimulatedDevice::new(&user, "PHONE");
                sender.create_session(&keys, Some(key.key));
                let first = sender.encrypt(&to_bob, "m.dummy", json!({}));
                bob.decrypt_to_device_event(&first.to_string()).await.unwrap();
                let reply = bob
                    .encrypt(&sender.published_keys(), "m.dummy", &[json!({})])
                    .await
                    .unwrap();
                sender.decrypt(&reply[0]).unwrap();
                if i < KNOWN_DEVICES {
                    device_keys.insert(user, json!({"PHONE": sender.device_keys()}));
                }
                senders.push(sender);
            }
        }
        let outcome = bob
            .receive_keys_query_response(&json!({ "device_keys": device_keys }))
            .await
            .unwrap();
        assert_eq!(outcome.stored, KNOWN_DEVICES);
        let pending: Vec<String> = bob
            .pending_decrypted_events()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.event.id)
            .collect();
        bob.acknowledge(&pending).await.unwrap();

        // A push's batch: room keys from the senders, one event in ten failing (a Megolm event
        // sent as to-device, from its own sender, so each produces a payload).
        let content = json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!room:example.org", "session_id": "S".repeat(43), "session_key": "A".repeat(360)});
        let batch: Vec<Value> = (0..events)
            .map(|n| {
                if n % 10 == 9 {
                    json!({"type": "m.room.encrypted", "sender": format!("@mallory{n}:x"), "content": {"algorithm": "m.megolm.v1.aes-sha2"}})
                } else {
                    senders[(n * 7) % SESSIONS].encrypt(&to_bob, "m.room_key", content.clone())
                }
            })
            .collect();
        std::fs::write(dir.join("batch.json"), serde_json::to_string(&batch).unwrap()).unwrap();
        let failures = batch.iter().filter(|e| e["content"]["ciphertext"].is_null());
        std::fs::write(dir.join("failures.txt"), failures.count().to_string()).unwrap();
    });
}

struct Forwarding(Mutex<Vec<PosthogErrorEvent>>);

impl DecryptionFailureListener for Forwarding {
    fn on_decryption_failure(&self, event: PosthogErrorEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// `EXTENSION_MEMORY_STOP=open|listener` ends the run after that step, for a breakdown.
fn stop_after(step: &str) -> bool {
    std::env::var("EXTENSION_MEMORY_STOP").as_deref() == Ok(step)
}

/// One extension run; prints `peak_kib baseline_kib` (peak over baseline).
fn measure(dir: &Path) {
    // The app's side, before the library is used: the batch as received, a runtime to call the
    // async API on.
    // (Nothing is parsed here: memory freed before the baseline would hide library allocations.)
    let batch = std::fs::read_to_string(dir.join("batch.json")).unwrap();
    let expected_failures: usize = std::fs::read_to_string(dir.join("failures.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = store_path(dir).to_str().unwrap().to_owned();
    let baseline = status_kib("VmRSS:");
    runtime.block_on(async {
        let bob = ffi::OlmMachine::open_sqlite(BOB.into(), DEVICE.into(), path, STORE_KEY.to_vec())
            .await
            .unwrap();
        if stop_after("open") {
            return;
        }
        let listener = Arc::new(Forwarding(Mutex::new(Vec::new())));
        let handle = bob.add_decryption_failure_listener(listener.clone());
        if stop_after("listener") {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        let results = bob.receive_sync(batch, Some("s1".into())).await.unwrap();
        let ids: Vec<String> = results
            .into_iter()
            .filter_map(|result| match result {
                ffi::ToDeviceResult::Decrypted { event } => Some(event.id),
                _ => None,
            })
            .collect();
        bob.acknowledge(ids).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stats: Value = serde_json::from_str(&bob.reporting_stats_json().await).unwrap();
            let delivered = listener.0.lock().unwrap().len();
            if delivered == expected_failures && stats["outbox"]["pending"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "analytics not delivered: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        handle.cancel();
    });
    println!("{} {}", status_kib("VmHWM:") - baseline, baseline);
}
