//! A fixed workload for profilers (`valgrind --tool=callgrind`, `perf record`): 20 batches of 100
//! normal ~1.2 KB messages from five senders into an in-memory machine (`PROFILE_BATCHES=n`
//! for more), all encrypted before the first is received.
//!
//! `cargo build --release --example profile_batch` then
//! `valgrind --tool=callgrind target/release/examples/profile_batch`.
//!
//! `PROFILE_WORKLOAD=first-pre-key` profiles bench row 3 instead: `PROFILE_MESSAGES=n` (at most
//! and by default 40) new senders' first pre-key messages, each decrypted with `decrypt_to_device_event` by an
//! in-memory machine; `PROFILE_WORKLOAD=first-pre-key-raw` does row 3's baseline on the same
//! number of messages (vodozemac's inbound session + one device-keys signature check). Their
//! difference from `PROFILE_MESSAGES=0`, divided by n, is the cost of one message.
//!
//! `PROFILE_WORKLOAD=floor` decrypts the same batches with raw vodozemac sessions (bench rows 1
//! and 2's floor: base64, Olm decode, `Session::decrypt`, a `serde_json` parse of the plaintext).
//! Every workload prints its receive time per message on stderr, so that a native profile of
//! one against the other (`perf record` of each, compared symbol by symbol) shows what the
//! machine adds to the floor.

use std::sync::Arc;

use serde_json::json;
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, SimulatedDevice};
use to_device_crypto::store::Synchronous;
use to_device_crypto::{
    CryptoStore, MemoryStore, OlmMachine, SqliteStore, StoreKey, ToDeviceOutcome,
};

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    match std::env::var("PROFILE_WORKLOAD").as_deref() {
        Ok("first-pre-key") => return runtime.block_on(first_pre_key_messages(false)),
        Ok("first-pre-key-raw") => return runtime.block_on(first_pre_key_messages(true)),
        Ok("floor") => return floor_batches(),
        _ => {}
    }
    runtime.block_on(async {
        // `PROFILE_STORE=sqlite` for the persisted path (synchronous=NORMAL, in a temporary dir).
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CryptoStore> = match std::env::var("PROFILE_STORE").as_deref() {
            Ok("sqlite") => Arc::new(
                SqliteStore::open(
                    dir.path().join("profile.sqlite3"),
                    StoreKey::generate().unwrap(),
                    Synchronous::Normal,
                )
                .unwrap(),
            ),
            _ => Arc::new(MemoryStore::new()),
        };
        let bob = OlmMachine::open("@bob:example.org", "BOB", store)
            .await
            .unwrap();
        let keys = publish_machine_keys(&bob, 5).await.unwrap();
        let to_bob = recipient_of(&bob);
        let mut senders = Vec::new();
        for (i, key) in keys.one_time_keys.iter().enumerate() {
            let mut sender = SimulatedDevice::new(&format!("@s{i}:example.org"), "DEV");
            sender.create_session(&keys, Some(key.key));
            let first = sender.encrypt(&to_bob, "m.dummy", json!({}));
            bob.decrypt_to_device_event(&first.to_string())
                .await
                .unwrap();
            let reply = bob
                .encrypt(&sender.published_keys(), "m.dummy", &[json!({})])
                .await
                .unwrap();
            sender.decrypt(&reply[0]).unwrap();
            senders.push(sender);
        }
        let content = room_key_content();
        let rounds = batches_to_profile();
        // Encrypt everything first so that a profile of the rest is the receiving side only.
        let batches: Vec<Vec<String>> = (0..rounds)
            .map(|_| {
                (0..100)
                    .map(|i| {
                        senders[i % 5]
                            .encrypt(&to_bob, "m.room_key", content.clone())
                            .to_string()
                    })
                    .collect()
            })
            .collect();
        let start = std::time::Instant::now();
        for batch in &batches {
            let outcomes = bob.receive_to_device_events(batch).await.unwrap();
            let ids: Vec<String> = outcomes
                .into_iter()
                .filter_map(|o| match o {
                    ToDeviceOutcome::Decrypted(event) => Some(event.id),
                    _ => None,
                })
                .collect();
            assert_eq!(ids.len(), 100);
            bob.acknowledge(&ids).await.unwrap();
        }
        print_per_message(start, rounds * 100);
    });
}

/// Row 3's workload: new senders' first pre-key messages (an `m.room_key` with
/// `sender_device_keys`), all encrypted before the first is received; `raw` times row 3's
/// baseline on the same messages instead of the machine.
async fn first_pre_key_messages(raw: bool) {
    let count: usize = std::env::var("PROFILE_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40)
        .min(40); // the machine keeps its 50 newest unused one-time keys
    let bob = OlmMachine::open("@bob:example.org", "BOB", Arc::new(MemoryStore::new()))
        .await
        .unwrap();
    let keys = publish_machine_keys(&bob, count.max(1)).await.unwrap();
    let to_bob = recipient_of(&bob);
    let content = json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:example.org", "session_key": "A".repeat(360)});
    let mut raw_bob = vodozemac::olm::Account::new();
    raw_bob.generate_one_time_keys(count);
    let raw_keys: Vec<_> = raw_bob.one_time_keys().into_values().collect();
    let mut events = Vec::new();
    let mut raw_messages = Vec::new();
    for (i, raw_key) in raw_keys.iter().enumerate().take(count) {
        let mut sender = SimulatedDevice::new(&format!("@new{i}:example.org"), "NEWDEV");
        sender.create_session(&keys, Some(keys.one_time_keys[i].key));
        events.push(
            sender
                .encrypt(&to_bob, "m.room_key", content.clone())
                .to_string(),
        );
        let raw_sender = vodozemac::olm::Account::new();
        let mut session = raw_sender
            .create_outbound_session(
                vodozemac::olm::SessionConfig::version_1(),
                raw_bob.curve25519_key(),
                *raw_key,
            )
            .unwrap();
        let plaintext = sender.plaintext(&to_bob, "m.room_key", content.clone(), true);
        let vodozemac::olm::OlmMessage::PreKey(message) =
            session.encrypt(plaintext.to_string()).unwrap()
        else {
            unreachable!("a session that never received a message sends pre-key messages")
        };
        raw_messages.push((raw_sender.curve25519_key(), message, sender.device_keys()));
    }
    let start = std::time::Instant::now();
    if raw {
        for (sender_key, message, device_keys) in &raw_messages {
            raw_bob
                .create_inbound_session(
                    vodozemac::olm::SessionConfig::version_1(),
                    *sender_key,
                    message,
                )
                .unwrap();
            to_device_crypto::olm::device_keys::DeviceKeys::from_signed_json(device_keys).unwrap();
        }
    } else {
        for event in &events {
            bob.decrypt_to_device_event(event).await.unwrap();
        }
    }
    print_per_message(start, count);
}

/// Rows 1 and 2's floor on the batch workload: raw receivers, the same senders' normal messages.
fn floor_batches() {
    let rounds = batches_to_profile();
    let mut bob = SimulatedDevice::new("@bob:example.org", "BOB");
    let keys = to_device_crypto::keys::parse_keys_upload_body(&bob.publish_keys(5)).unwrap();
    let to_bob = to_device_crypto::simulator::Recipient::from_device(&keys.device);
    let mut senders = Vec::new();
    for (i, key) in keys.one_time_keys.iter().enumerate() {
        let mut sender = SimulatedDevice::new(&format!("@s{i}:example.org"), "DEV");
        sender.create_session(&keys, Some(key.key));
        bob.decrypt(&sender.encrypt(&to_bob, "m.dummy", json!({})))
            .unwrap();
        let reply = bob.encrypt(
            &to_device_crypto::simulator::Recipient::from_device(&sender.published_keys().device),
            "m.dummy",
            json!({}),
        );
        sender.decrypt(&reply).unwrap();
        senders.push(sender);
    }
    let content = room_key_content();
    let ours = to_bob.curve25519.to_base64();
    let batches: Vec<Vec<_>> = (0..rounds)
        .map(|_| {
            (0..100)
                .map(|i| {
                    let sender = &mut senders[i % 5];
                    // Through the same text as the machine's input, so that a profile of the
                    // two workloads differs only in how the messages are received.
                    let text = sender
                        .encrypt(&to_bob, "m.room_key", content.clone())
                        .to_string();
                    let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                    let entry = &event["content"]["ciphertext"][&ours];
                    (
                        sender.curve25519_key(),
                        entry["type"].as_u64().unwrap() as usize,
                        entry["body"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .collect();
    let start = std::time::Instant::now();
    for batch in &batches {
        for (sender_key, message_type, body) in batch {
            assert!(bob.decrypt_body(sender_key, *message_type, body).is_some());
        }
    }
    print_per_message(start, rounds * 100);
}

fn batches_to_profile() -> usize {
    std::env::var("PROFILE_BATCHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20)
}

fn room_key_content() -> serde_json::Value {
    json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:example.org", "session_key": "A".repeat(360)})
}

fn print_per_message(start: std::time::Instant, messages: usize) {
    if messages > 0 {
        eprintln!(
            "{:.2} µs per message",
            start.elapsed().as_secs_f64() * 1e6 / messages as f64
        );
    }
}
