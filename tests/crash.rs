//! Crash test: four senders send 2,000 to-device messages in /sync batches of 100 (pre-key
//! messages, then normal ones after the receiver replies half-way, plus a few invalid events) to a
//! receiving CLI process that is SIGKILLed at hundreds of random points and aborted at the
//! deterministic fail points; after each kill the same batch is fed again.
//!
//! Asserts: every valid message is delivered at least once, every repeat is marked as a
//! re-emission (`"pending": true`), and no session ever breaks (no SessionWedged, MissingSession,
//! UnknownOneTimeKey or SessionCreation).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");
const SENDERS: usize = 4;
const BATCHES: usize = 21;
const BATCH_SIZE: usize = 100;
const KILLS_PER_BATCH: usize = 12;
const BROKEN: [&str; 4] = [
    "ToDeviceFailedToDecrypt_SessionWedged",
    "ToDeviceFailedToDecrypt_MissingSession",
    "ToDeviceFailedToDecrypt_UnknownOneTimeKey",
    "ToDeviceFailedToDecrypt_SessionCreation",
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

#[derive(Default)]
struct Tally {
    kills: usize,
    fail_points: Vec<&'static str>,
    runs: usize,
    first_deliveries: HashMap<u64, usize>,
    re_emissions: usize,
}

impl Tally {
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
}

fn run_decrypt(
    store: &Path,
    batch: &Path,
    fail_point: Option<&str>,
    kill_after: Option<Duration>,
) -> (Option<i32>, Vec<u8>) {
    let mut command = Command::new(BIN);
    command
        .args([
            "decrypt",
            "--store",
            store.to_str().unwrap(),
            batch.to_str().unwrap(),
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(point) = fail_point {
        command.env("TDC_FAIL_POINT", point);
    }
    let mut child = command.spawn().unwrap();
    if let Some(delay) = kill_after {
        std::thread::sleep(delay);
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), output.stdout)
}

#[test]
fn killed_at_random_points_and_at_fail_points_no_message_is_lost_and_no_session_breaks() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let (to_bob, mut senders) = common::cli_bob_with_senders(BIN, &store, SENDERS);

    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let mut valid = 0u64;
    let mut typical = Duration::from_millis(200);
    let fail_points = ["before_commit", "after_commit", "after_print"];
    for batch_number in 0..BATCHES {
        if batch_number == BATCHES / 2 {
            // Half-way, the receiver replies once per session: the senders switch to normal messages.
            for sender in &mut senders {
                let keys_file = dir.path().join(format!("{}.json", sender.device_id()));
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
        let events: Vec<Value> = (0..BATCH_SIZE)
            .map(|i| {
                if i % 45 == 44 {
                    // A few invalid events: a Megolm event sent as to-device, and garbage.
                    return if i == 44 { json!({"type": "m.room.encrypted", "sender": "@x:y", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}) } else { json!(["not", "an", "event"]) };
                }
                let sender = &mut senders[(i + batch_number) % SENDERS];
                seq += 1;
                valid += 1;
                sender.encrypt(&to_bob, "m.room_key", json!({"seq": seq, "pad": "x".repeat(300)}))
            })
            .collect();
        let batch_file = dir.path().join(format!("batch-{batch_number}.json"));
        std::fs::write(&batch_file, serde_json::to_string(&events).unwrap()).unwrap();

        // Deterministic fail points on the first batches, then random SIGKILLs.
        if let Some(point) = fail_points.get(batch_number) {
            let (code, stdout) = run_decrypt(&store, &batch_file, Some(point), None);
            assert_ne!(code, Some(0), "fail point {point} must abort");
            tally.fail_points.push(point);
            tally.runs += 1;
            tally.read(&stdout);
        }
        let mut kills = 0;
        let mut attempts = 0;
        while kills < KILLS_PER_BATCH && attempts < 8 * KILLS_PER_BATCH {
            attempts += 1;
            let delay =
                Duration::from_micros(rng.next() % (typical.as_micros() as u64 * 6 / 5 + 1));
            let (code, stdout) = run_decrypt(&store, &batch_file, None, Some(delay));
            tally.runs += 1;
            tally.read(&stdout);
            if code.is_none() {
                kills += 1;
            }
        }
        tally.kills += kills;
        let clean_start = Instant::now();
        let (code, stdout) = run_decrypt(&store, &batch_file, None, None);
        typical = clean_start.elapsed();
        assert_eq!(code, Some(0));
        tally.runs += 1;
        tally.read(&stdout);
    }

    let delivered = (1..=valid)
        .filter(|s| tally.first_deliveries.contains_key(s))
        .count();
    let duplicated_unmarked = tally.first_deliveries.values().filter(|&&n| n > 1).count();
    println!(
        "crash test: {} runs, {} SIGKILLs, fail points hit: {:?}, delivered {delivered}/{valid}, re-emissions {}, {:.1} s",
        tally.runs,
        tally.kills,
        tally.fail_points,
        tally.re_emissions,
        started.elapsed().as_secs_f64()
    );
    assert!(tally.kills >= 200, "only {} kills landed", tally.kills);
    assert_eq!(tally.fail_points.len(), 3);
    assert_eq!(delivered as u64, valid, "a valid message was lost");
    assert_eq!(
        duplicated_unmarked, 0,
        "a repeat was not marked as a re-emission"
    );
}
