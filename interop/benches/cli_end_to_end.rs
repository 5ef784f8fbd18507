//! Row 8: our CLI end to end against matrix-sdk-crypto in memory, on the workload of issue 19:
//! EVENTS to-device events encrypted by one matrix-sdk-crypto 0.18 device, all pre-key messages of
//! one session (the sender never received a reply), each ~1.5 KB with `sender_device_keys`.
//!
//! - Ours: `to-device-crypto decrypt --store DIR FILE` as one process, on a store created by
//!   `to-device-crypto keys`, the events in one file; wall time from spawning the process to its
//!   exit, which includes process start, opening the store, the SQLite commit, printing every
//!   result (read by this process through a pipe) and the acknowledgement transaction.
//! - Theirs: `receive_sync_changes` of a fresh in-memory matrix-sdk-crypto machine on the same
//!   kind of events (its own sender's, encrypted for it), all in one call.
//!
//! Each round makes fresh receivers and senders for both sides, then times ours and theirs in
//! turn. The CLI is the release binary named by `TDC_BENCH_CLI` (scripts/bench.sh builds it);
//! without it the row is skipped.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use to_device_crypto_interop::{first_one_time_key, Reference};

use super::median;

const EVENTS: usize = 2_000;
const ROUNDS: usize = 5;
const BOB: &str = "@bob:example.org";
const EVENT_TYPE: &str = "org.example.bench";

fn content(seq: usize) -> Value {
    json!({
        "room_id": "!benchmark-room:example.org",
        "seq": seq,
        "session_key": "A".repeat(200),
    })
}

/// A fresh matrix-sdk-crypto sender with an outbound session to `device_id`, whose keys are
/// the `/keys/upload` body `keys`; returns EVENTS events it encrypted for that device.
async fn events_from_a_fresh_sender(round: usize, device_id: &str, keys: &Value) -> Vec<Value> {
    let alice = Reference::new(
        &format!("@alice{round}:example.org"),
        &format!("ALICE{round}"),
    )
    .await;
    alice.receive_device_keys(&keys["device_keys"]).await;
    let (key_id, signed_key) = first_one_time_key(keys);
    assert!(
        alice
            .claim_and_create_session(BOB, device_id, &key_id, &signed_key)
            .await
    );
    let contents: Vec<Value> = (0..EVENTS).map(content).collect();
    let events = alice.encrypt(BOB, device_id, EVENT_TYPE, &contents).await;
    assert_eq!(events.len(), EVENTS);
    events
}

fn message_types(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            let ciphertext = e["content"]["ciphertext"].as_object().unwrap();
            ciphertext.values().next().unwrap()["type"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn run_cli(cli: &Path, args: &[&str]) -> Vec<u8> {
    let output = Command::new(cli).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{cli:?} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// One round of ours: a new store and its keys (not timed), the events, then the timed run.
async fn time_ours(cli: &Path, dir: &Path, round: usize) -> (Duration, usize) {
    let store = dir.join(format!("bob{round}"));
    let store_arg = store.to_str().unwrap();
    let keys: Value = serde_json::from_slice(&run_cli(
        cli,
        &[
            "keys",
            "--store",
            store_arg,
            "--user-id",
            BOB,
            "--device-id",
            "BOBCLI",
        ],
    ))
    .unwrap();
    let events = events_from_a_fresh_sender(round, "BOBCLI", &keys).await;
    assert!(
        message_types(&events).iter().all(|&t| t == 0),
        "pre-key messages only"
    );
    let file = dir.join(format!("events{round}.json"));
    let text = serde_json::to_string(&events).unwrap();
    std::fs::write(&file, &text).unwrap();

    let start = Instant::now();
    let mut child = Command::new(cli)
        .args(["decrypt", "--store", store_arg, file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut printed)
        .unwrap();
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    assert!(status.success(), "decrypt failed: {status}");
    let needle = b"\"result\":\"decrypted\"".as_slice();
    let decrypted = printed
        .split(|&b| b == b'\n')
        .filter(|line| line.windows(needle.len()).any(|w| w == needle))
        .count();
    assert_eq!(decrypted, EVENTS, "every event decrypted");
    (elapsed, text.len() / EVENTS)
}

async fn time_reference(round: usize) -> Duration {
    let bob = Reference::new(BOB, "BOBREF").await;
    let keys = bob.keys_upload_body().await.unwrap();
    let events = events_from_a_fresh_sender(round, "BOBREF", &keys).await;
    assert!(message_types(&events).iter().all(|&t| t == 0));
    assert_eq!(events.len(), EVENTS);
    let raw = events
        .iter()
        .map(|e| serde_json::from_value(e.clone()).unwrap())
        .collect();
    super::time_reference(&bob, raw).await
}

/// Measures row 8 and returns its `@row` line, or `None` when `TDC_BENCH_CLI` is not set.
pub fn measure(rt: &tokio::runtime::Runtime) -> Option<String> {
    let Some(cli) = std::env::var_os("TDC_BENCH_CLI") else {
        println!("\nrow 8 (CLI end to end): skipped, TDC_BENCH_CLI is not set (scripts/bench.sh sets it)");
        return None;
    };
    let cli = Path::new(&cli);
    let dir = tempfile::tempdir().unwrap();
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut event_bytes = 0;
    for round in 0..ROUNDS {
        let (elapsed, bytes) = rt.block_on(time_ours(cli, dir.path(), round));
        event_bytes = bytes;
        let reference = rt.block_on(time_reference(round));
        ours.push(elapsed);
        theirs.push(reference);
        ratios.push(reference.as_secs_f64() / elapsed.as_secs_f64());
    }
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / EVENTS as f64;
    let (ours_us, theirs_us) = (per_event(median(ours)), per_event(median(theirs)));
    println!(
        "\nrow 8: {EVENTS} pre-key events of one matrix-sdk-crypto session, ~{event_bytes} B each, \
         {ROUNDS} rounds (medians)"
    );
    println!(
        "  {:<60} {:>10.2}",
        "ours: `to-device-crypto decrypt` process, end to end", ours_us
    );
    println!(
        "  {:<60} {:>10.2}",
        "matrix-sdk-crypto 0.18 receive_sync_changes (memory)", theirs_us
    );
    println!(
        "  reference / ours = {:.2}x (per round: {}; target >= 8x)",
        theirs_us / ours_us,
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Some(format!(
        "@row\t8-cli\t8 matrix-sdk-crypto (memory) ÷ our CLI end to end, {EVENTS} pre-key events\t\
         {ours_us:.3}\t{theirs_us:.3}\tbase/ours\t>= 8"
    ))
}
