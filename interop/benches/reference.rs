//! Ours against the reference implementation on the workload of benches/ratios.rs row 1:
//! batches of 100 normal (type 1) Olm to-device messages, round-robin from 5 senders, each an
//! `m.room_key`-like event of ~500 bytes of content whose plaintext carries the sender's
//! `sender_device_keys` (~1.2 KB), sent by raw-vodozemac senders (`SimulatedDevice`).
//!
//! Two variants, because the reference does more with a real `m.room_key` than decrypt it:
//! - `m.room_key` with a *valid* Megolm session key (a fresh `GroupSession` per event; the
//!   reference rejects ratios.rs's placeholder key `"AAAA…"` as a JSON error): the reference also
//!   imports the room key (creates and stores an inbound group session), ours only decrypts and
//!   checks — the app imports the key afterwards;
//! - the same ~500-byte content under a custom event type: both sides decrypt and check only.
//!
//! Receivers: matrix-sdk-crypto 0.18 `OlmMachine::receive_sync_changes` (in-memory store), and our
//! `OlmMachine::receive_to_device_events` on an in-memory store and on SQLite (a tempdir,
//! synchronous=NORMAL, the commit included). Each round times one fresh batch per receiver;
//! medians over ROUNDS rounds are printed as µs/event with the ratios. Nothing is asserted: the
//! targets (ours ≥ 10× faster in memory, ≥ 5× with SQLite) are reported as met or not.
//!
//! Besides the human-readable tables, each result is printed as a machine-readable line that
//! `scripts/bench.sh` collects into its combined table (row 5):
//!
//! `@row<TAB>id<TAB>name<TAB>ours_us<TAB>base_us<TAB>base/ours<TAB>target` — ours = our receiver,
//! base = matrix-sdk-crypto, and the ratio is theirs ÷ ours (how many times faster we are).
//!
//! Row 8 (the CLI end to end, against matrix-sdk-crypto on 2,000 pre-key messages) is in
//! `cli_end_to_end.rs`; it needs the release CLI in `TDC_BENCH_CLI`.
//!
//! Run: `cargo bench --bench reference` in interop/ (release), or `scripts/interop.sh --bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::{parse_keys_upload_body, PublishedKeys};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, Recipient, SimulatedDevice};
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{MemoryStore, OlmMachine, StoreKey, ToDeviceOutcome};
use to_device_crypto_interop::{RefOutcome, Reference};

/// Row 8: the CLI end to end against matrix-sdk-crypto.
mod cli_end_to_end;

const BOB: &str = "@bob:example.org";
const SENDERS: usize = 5;
const BATCH: usize = 100;
const ROUNDS: usize = 30;

/// The same content as benches/ratios.rs: ~500 bytes; with `sender_device_keys` the plaintext
/// is ~1.2 KB.
fn room_key(seq: usize) -> Value {
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": "!benchmark-room:example.org",
        "session_id": format!("{seq:043}"),
        "session_key": "A".repeat(360),
    })
}

/// A real room key: a new outbound Megolm session's id and exported session key.
fn valid_room_key() -> Value {
    let session =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": "!benchmark-room:example.org",
        "session_id": session.session_id(),
        "session_key": session.session_key().to_base64(),
    })
}

#[derive(Clone, Copy)]
enum Kind {
    /// `m.room_key` with a valid session key.
    RoomKey,
    /// The ratios.rs content under a custom type.
    Custom,
}

impl Kind {
    fn event(self, i: usize) -> (&'static str, Value) {
        match self {
            Kind::RoomKey => ("m.room_key", valid_room_key()),
            Kind::Custom => ("org.example.bench", room_key(i)),
        }
    }
}

fn sender(i: usize) -> SimulatedDevice {
    SimulatedDevice::new(&format!("@sender{i}:example.org"), &format!("DEV{i}"))
}

/// Senders with normal-message sessions to our machine (pre-key message, then our reply).
async fn senders_for_ours(bob: &OlmMachine) -> (Vec<SimulatedDevice>, Recipient) {
    let keys = publish_machine_keys(bob, SENDERS).await.unwrap();
    let to_bob = recipient_of(bob);
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let mut s = sender(i);
        s.create_session(&keys, Some(keys.one_time_keys[i].key));
        let first = s.encrypt(&to_bob, "m.dummy", json!({}));
        bob.decrypt_to_device_event(&first.to_string())
            .await
            .unwrap();
        let reply = bob
            .encrypt(&s.published_keys(), "m.dummy", &[json!({})])
            .await
            .unwrap();
        s.decrypt(&reply[0]).expect("the sender decrypts our reply");
        senders.push(s);
    }
    (senders, to_bob)
}

/// Senders with normal-message sessions to the reference (pre-key message, then its reply; to
/// reply it must know their devices, so it gets them as a /keys/query response).
async fn senders_for_reference(reference: &Reference) -> (Vec<SimulatedDevice>, Recipient) {
    let body = reference.keys_upload_body().await.unwrap();
    let mut keys: PublishedKeys = parse_keys_upload_body(&body).unwrap();
    keys.one_time_keys.retain(|k| !k.fallback);
    let to_reference = Recipient::from_device(&keys.device);
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let mut s = sender(i);
        s.create_session(&keys, Some(keys.one_time_keys[i].key));
        reference.receive_device_keys(&s.device_keys()).await;
        let first = s.encrypt(&to_reference, "m.dummy", json!({}));
        let out = reference.receive(&[first]).await;
        assert!(matches!(out[..], [RefOutcome::Decrypted { .. }]), "{out:?}");
        let reply = reference
            .encrypt(s.user_id(), s.device_id(), "m.dummy", &[json!({})])
            .await;
        s.decrypt(&reply[0])
            .expect("the sender decrypts the reference's reply");
        senders.push(s);
    }
    (senders, to_reference)
}

fn batch_for(senders: &mut [SimulatedDevice], to: &Recipient, kind: Kind) -> Vec<Value> {
    (0..BATCH)
        .map(|i| {
            let (event_type, content) = kind.event(i);
            senders[i % SENDERS].encrypt(to, event_type, content)
        })
        .collect()
}

fn type_of(event: &Value, to: &Recipient) -> u64 {
    event["content"]["ciphertext"][to.curve25519.to_base64()]["type"]
        .as_u64()
        .unwrap()
}

async fn time_ours(bob: &OlmMachine, batch: &[String]) -> Duration {
    let start = Instant::now();
    let outcomes = bob.receive_to_device_events(batch).await.unwrap();
    let elapsed = start.elapsed();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ToDeviceOutcome::Decrypted(_))));
    // Handled: clear the outbox as an app would (not timed).
    let ids: Vec<String> = outcomes
        .into_iter()
        .filter_map(|o| match o {
            ToDeviceOutcome::Decrypted(e) => Some(e.id),
            _ => None,
        })
        .collect();
    bob.acknowledge(&ids).await.unwrap();
    elapsed
}

/// Times matrix-sdk-crypto's `receive_sync_changes` on `batch`, every event of which must decrypt.
async fn time_reference(
    reference: &Reference,
    batch: Vec<ruma::serde::Raw<ruma::events::AnyToDeviceEvent>>,
) -> Duration {
    let events = batch.len();
    let start = Instant::now();
    let outcomes = reference.receive_raw(batch).await;
    let elapsed = start.elapsed();
    assert_eq!(outcomes.len(), events);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, RefOutcome::Decrypted { .. })),
        "{:?}",
        outcomes[0]
    );
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn per_event(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / BATCH as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (memory, sqlite, reference) = rt.block_on(async {
        let memory = OlmMachine::open(BOB, "MEM", Arc::new(MemoryStore::new()))
            .await
            .unwrap();
        let store = SqliteStore::open(
            dir.path().join("bench.sqlite3"),
            StoreKey::generate().unwrap(),
            Synchronous::Normal,
        )
        .unwrap();
        let sqlite = OlmMachine::open(BOB, "SQL", Arc::new(store)).await.unwrap();
        let reference = Reference::new(BOB, "REF").await;
        (memory, sqlite, reference)
    });
    let (mut memory_senders, to_memory) = rt.block_on(senders_for_ours(&memory));
    let (mut sqlite_senders, to_sqlite) = rt.block_on(senders_for_ours(&sqlite));
    let (mut reference_senders, to_reference) = rt.block_on(senders_for_reference(&reference));

    let mut rows = Vec::new();
    for (kind, label) in [
        (Kind::RoomKey, "m.room_key with valid session keys"),
        (Kind::Custom, "custom type, ratios.rs content"),
    ] {
        let mut run = Run {
            memory: &memory,
            sqlite: &sqlite,
            reference: &reference,
            memory_senders: &mut memory_senders,
            sqlite_senders: &mut sqlite_senders,
            reference_senders: &mut reference_senders,
            to_memory: &to_memory,
            to_sqlite: &to_sqlite,
            to_reference: &to_reference,
        };
        rows.extend(run.measure(&rt, kind, label));
    }
    rows.extend(cli_end_to_end::measure(&rt));
    println!();
    for row in rows {
        println!("{row}");
    }
}

struct Run<'a> {
    memory: &'a OlmMachine,
    sqlite: &'a OlmMachine,
    reference: &'a Reference,
    memory_senders: &'a mut Vec<SimulatedDevice>,
    sqlite_senders: &'a mut Vec<SimulatedDevice>,
    reference_senders: &'a mut Vec<SimulatedDevice>,
    to_memory: &'a Recipient,
    to_sqlite: &'a Recipient,
    to_reference: &'a Recipient,
}

impl Run<'_> {
    /// Prints the human-readable table of `kind` and returns its two `@row` lines.
    fn measure(&mut self, rt: &tokio::runtime::Runtime, kind: Kind, label: &str) -> [String; 2] {
        let (mut ours_memory, mut ours_sqlite, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        let mut plaintext_bytes = 0;
        for round in 0..ROUNDS {
            let batch = batch_for(self.memory_senders, self.to_memory, kind);
            assert!(
                batch.iter().all(|e| type_of(e, self.to_memory) == 1),
                "normal messages only"
            );
            let raw: Vec<String> = batch.iter().map(Value::to_string).collect();
            ours_memory.push(rt.block_on(time_ours(self.memory, &raw)));

            let batch = batch_for(self.sqlite_senders, self.to_sqlite, kind);
            let raw: Vec<String> = batch.iter().map(Value::to_string).collect();
            ours_sqlite.push(rt.block_on(time_ours(self.sqlite, &raw)));

            let batch = batch_for(self.reference_senders, self.to_reference, kind);
            assert!(
                batch.iter().all(|e| type_of(e, self.to_reference) == 1),
                "normal messages only"
            );
            if round == 0 {
                let (event_type, content) = kind.event(0);
                plaintext_bytes = self.reference_senders[0]
                    .plaintext(self.to_reference, event_type, content, true)
                    .to_string()
                    .len();
            }
            let raw = batch
                .iter()
                .map(|e| serde_json::from_value(e.clone()).unwrap())
                .collect();
            theirs.push(rt.block_on(time_reference(self.reference, raw)));
        }

        let (mem_us, sql_us, ref_us) = (
            per_event(median(ours_memory)),
            per_event(median(ours_sqlite)),
            per_event(median(theirs)),
        );
        let verdict = |ratio: f64, target: f64| if ratio >= target { "met" } else { "NOT met" };
        println!();
        println!(
            "{label}: {ROUNDS} rounds x batch of {BATCH} normal messages from {SENDERS} senders, \
         plaintext {plaintext_bytes} B with sender_device_keys (medians)"
        );
        println!("  {:<60} {:>10}", "receiver", "us/event");
        println!(
            "  {:<60} {:>10.1}",
            "matrix-sdk-crypto 0.18 receive_sync_changes (memory)", ref_us
        );
        println!(
            "  {:<60} {:>10.1}",
            "ours receive_to_device_events (memory)", mem_us
        );
        println!(
            "  {:<60} {:>10.1}",
            "ours receive_to_device_events (SQLite, NORMAL, incl. commit)", sql_us
        );
        let memory_ratio = ref_us / mem_us;
        let sqlite_ratio = ref_us / sql_us;
        println!(
            "  reference / ours (memory) = {memory_ratio:.1}x   (target >= 10x: {})",
            verdict(memory_ratio, 10.0)
        );
        println!(
            "  reference / ours (SQLite) = {sqlite_ratio:.1}x   (target >= 5x: {})",
            verdict(sqlite_ratio, 5.0)
        );
        let (id, what) = match kind {
            Kind::RoomKey => ("5-roomkey", "m.room_key"),
            Kind::Custom => ("5-custom", "custom type (decrypt only)"),
        };
        [
            ("memory", "memory", mem_us, ">= 10"),
            ("sqlite", "SQLite incl. commit", sql_us, ">= 5"),
        ]
        .map(|(suffix, store, ours_us, target)| {
            format!(
                "@row\t{id}-{suffix}\t5 matrix-sdk-crypto ÷ ours, {what}, {store}\t\
                 {ours_us:.3}\t{ref_us:.3}\tbase/ours\t{target}"
            )
        })
    }
}
