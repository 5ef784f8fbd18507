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
            bob.decrypt_to_device_event(&first.to_string()).await.unwrap();
            let reply = bob
                .encrypt(&sender.published_keys(), "m.dummy", &[json!({})])
                .await
                .unwrap();
            sender.decrypt(&reply[0]).unwrap();
            senders.push(sender);
        }
        let content = json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:example.org", "session_key": "A".repeat(360)});
        let rounds: usize = std::env::var("PROFILE_BATCHES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(20);
        // Encrypt everything first so that a profile of the rest is the receiving side only.
        let batches: Vec<Vec<String>> = (0..rounds)
            .map(|_| {
                (0..100)
                    .map(|i| senders[i % 5].encrypt(&to_bob, "m.room_key", content.clone()).to_string())
                    .collect()
            })
            .collect();
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
    if count > 0 {
        eprintln!(
            "{:.1} µs per message",
            start.elapsed().as_secs_f64() * 1e6 / count as f64
        );
    }
}
