//! A fixed workload for profilers (`valgrind --tool=callgrind`, `perf record`): 20 batches of 100
//! normal ~1.2 KB messages from five senders into an in-memory machine (`PROFILE_BATCHES=n`
//! for more), all encrypted before the first is received.
//!
//! `cargo build --release --example profile_batch` then
//! `valgrind --tool=callgrind target/release/examples/profile_batch`.

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
