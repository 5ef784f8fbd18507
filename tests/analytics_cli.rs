//! `decrypt --analytics-out` in real processes: a kill at any phase loses no payload, a huge batch
//! writes exactly what the policy allows, and two processes on one store report each failure once.
//!
//! Kills use the deterministic fail points (`TDC_FAIL_POINT`, see `src/fail_point.rs`): each
//! aborts the process at one phase exactly as a SIGKILL there would.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");
/// The claim lease of every run here: a killed run's payloads are free again this soon.
const LEASE_MS: u64 = 300;

fn decrypt(store: &Path, input: &Path, analytics: &Path, fail_point: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command
        .args([
            "decrypt",
            "--store",
            store.to_str().unwrap(),
            "--analytics-out",
            analytics.to_str().unwrap(),
            input.to_str().unwrap(),
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .env("TO_DEVICE_CRYPTO_ANALYTICS_LEASE_MS", LEASE_MS.to_string())
        .stdin(Stdio::null());
    match fail_point {
        Some(point) => command.env("TDC_FAIL_POINT", point),
        None => command.env_remove("TDC_FAIL_POINT"),
    };
    command.output().unwrap()
}

fn decrypt_ok(store: &Path, input: &Path, analytics: &Path) {
    let output = decrypt(store, input, analytics, None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn new_store(dir: &Path) -> std::path::PathBuf {
    let store = dir.join("bob");
    let output = Command::new(BIN)
        .args([
            "keys",
            "--store",
            store.to_str().unwrap(),
            "--user-id",
            common::BOB,
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .output()
        .unwrap();
    assert!(output.status.success());
    store
}

/// Payload names per count, read from an analytics file (every line must be a whole payload).
fn payloads(file: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let text = std::fs::read_to_string(file).unwrap_or_default();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line).expect("whole JSON lines only");
        *counts
            .entry(value["properties"]["name"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

fn line_count(file: &Path) -> usize {
    payloads(file).values().sum()
}

fn megolm_batch(dir: &Path, name: &str, senders: usize, per_sender: usize) -> std::path::PathBuf {
    let events: Vec<Value> = (0..senders * per_sender)
        .map(|n| json!({"type": "m.room.encrypted", "sender": format!("@s{}:x", n % senders), "content": {"algorithm": "m.megolm.v1.aes-sha2", "n": n}}))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(&events).unwrap()).unwrap();
    path
}

fn wait_for_lease() {
    std::thread::sleep(Duration::from_millis(LEASE_MS + 200));
}

#[test]
fn a_kill_at_any_phase_of_decrypt_loses_no_payload() {
    // Each phase: a run killed there, then runs until the payloads settled. Three senders, so
    // three payloads, whatever happens.
    let phases = [
        "before_commit",
        "after_commit",
        "analytics_written",
        "after_print",
    ];
    for phase in phases {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path());
        let batch = megolm_batch(dir.path(), "batch.json", 3, 2);
        let analytics = dir.path().join("analytics.jsonl");
        let killed = decrypt(&store, &batch, &analytics, Some(phase));
        assert!(!killed.status.success(), "{phase} must abort");
        // The server re-delivers the batch; the next runs (one right away, one after the killed
        // run's lease ended) deliver whatever the killed run left.
        decrypt_ok(&store, &batch, &analytics);
        wait_for_lease();
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, "[]").unwrap();
        decrypt_ok(&store, &empty, &analytics);
        let counts = payloads(&analytics);
        let written = counts["ToDeviceFailedToDecrypt_UnsupportedAlgorithm"];
        if phase == "analytics_written" {
            // The one window for a double report: written and flushed, not yet acknowledged.
            assert_eq!(written, 6, "{phase}: written again once the lease ended");
        } else {
            assert_eq!(written, 3, "{phase}: exactly once each");
        }
        // Nothing is left to deliver.
        decrypt_ok(&store, &empty, &analytics);
        assert_eq!(line_count(&analytics), written, "{phase}");
    }
}

#[test]
fn leftovers_of_earlier_runs_come_first_then_this_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let analytics = dir.path().join("analytics.jsonl");
    // Killed after committing a batch whose events are all Megolm (UnsupportedAlgorithm).
    let first = megolm_batch(dir.path(), "first.json", 2, 1);
    assert!(!decrypt(&store, &first, &analytics, Some("after_commit"))
        .status
        .success());
    wait_for_lease();
    // The next batch fails otherwise (MalformedEvent). The leftovers are on disk before that
    // batch is even committed (this run is killed just before its commit)...
    let second = dir.path().join("second.json");
    std::fs::write(&second, r#"[{"type": "m.room.encrypted"}]"#).unwrap();
    assert!(!decrypt(&store, &second, &analytics, Some("before_commit"))
        .status
        .success());
    assert_eq!(line_count(&analytics), 2);
    // ...and the batch's payload follows them.
    decrypt_ok(&store, &second, &analytics);
    let names: Vec<String> = std::fs::read_to_string(&analytics)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["properties"]["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
            "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
            "ToDeviceFailedToDecrypt_MalformedEvent"
        ]
    );
}

#[test]
fn a_huge_hostile_batch_writes_exactly_what_the_policy_allows_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let analytics = dir.path().join("analytics.jsonl");
    // 3,000 events with an unsupported algorithm from one sender: far beyond the failure
    // stream's 1,024, and one payload per (sender, key, name) per hour.
    let batch = megolm_batch(dir.path(), "hostile.json", 1, 3_000);
    decrypt_ok(&store, &batch, &analytics);
    assert_eq!(line_count(&analytics), 1);
    // 40 senders: the cap of 30 a minute.
    let batch = megolm_batch(dir.path(), "flood.json", 40, 50);
    decrypt_ok(&store, &batch, &analytics);
    assert_eq!(line_count(&analytics), 1 + 29);
}

#[test]
fn a_redelivered_batch_of_2000_replays_writes_one_payload_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let (to_bob, mut senders) = common::cli_bob_with_senders(BIN, &store, 4);
    let events: Vec<Value> = (0..2_000)
        .map(|seq| senders[seq % 4].encrypt(&to_bob, "m.dummy", json!({"seq": seq})))
        .collect();
    let batch = dir.path().join("batch.json");
    std::fs::write(&batch, serde_json::to_string(&events).unwrap()).unwrap();
    let analytics = dir.path().join("analytics.jsonl");
    decrypt_ok(&store, &batch, &analytics);
    assert_eq!(line_count(&analytics), 0, "everything decrypted");
    // The server lost its acknowledgement and sends the whole batch again.
    decrypt_ok(&store, &batch, &analytics);
    assert_eq!(
        payloads(&analytics),
        HashMap::from([("ToDeviceFailedToDecrypt_ReplayedMessage".to_owned(), 4)])
    );
}

#[test]
fn two_processes_report_a_failure_redelivered_from_the_extension_to_the_app_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let batch = megolm_batch(dir.path(), "batch.json", 2, 1);
    let extension_out = dir.path().join("extension.jsonl");
    let app_out = dir.path().join("app.jsonl");
    // The extension decrypts the push's batch and is killed before delivering its payloads.
    assert!(
        !decrypt(&store, &batch, &extension_out, Some("after_commit"))
            .status
            .success()
    );
    // The app gets the same events from /sync: already reported, and the extension's claim is
    // still live, so nothing is written yet.
    decrypt_ok(&store, &batch, &app_out);
    assert_eq!(line_count(&app_out), 0);
    // Once the claim ran out, the app's next run delivers the extension's payloads, once.
    wait_for_lease();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    decrypt_ok(&store, &empty, &app_out);
    decrypt_ok(&store, &empty, &extension_out);
    decrypt_ok(&store, &empty, &app_out);
    assert_eq!(line_count(&extension_out), 0);
    assert_eq!(
        payloads(&app_out),
        HashMap::from([("ToDeviceFailedToDecrypt_UnsupportedAlgorithm".to_owned(), 2)])
    );
}

#[test]
fn concurrent_processes_deliver_each_abandoned_payload_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    // 20 payloads abandoned by a killed run (20 senders, under the cap).
    let batch = megolm_batch(dir.path(), "batch.json", 20, 1);
    let unused = dir.path().join("unused.jsonl");
    assert!(!decrypt(&store, &batch, &unused, Some("after_commit"))
        .status
        .success());
    wait_for_lease();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    // Four processes start at once, each with its own file.
    let outs: Vec<_> = (0..4)
        .map(|i| dir.path().join(format!("out-{i}.jsonl")))
        .collect();
    let children: Vec<_> = outs
        .iter()
        .map(|out| {
            Command::new(BIN)
                .args([
                    "decrypt",
                    "--store",
                    store.to_str().unwrap(),
                    "--analytics-out",
                    out.to_str().unwrap(),
                    empty.to_str().unwrap(),
                ])
                .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
                .env_remove("TDC_FAIL_POINT")
                .env("TO_DEVICE_CRYPTO_ANALYTICS_LEASE_MS", "60000")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let total: usize = outs.iter().map(|out| line_count(out)).sum();
    assert_eq!(
        total, 20,
        "each abandoned payload delivered by exactly one process"
    );
}
