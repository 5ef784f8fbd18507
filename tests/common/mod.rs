//! Shared helpers for the integration tests: machines, simulated peers and schema validation.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::{json, Value};
use to_device_crypto::analytics::ReportingPolicy;
use to_device_crypto::olm::device_keys::PublishedKeys;
use to_device_crypto::simulator::{self, Recipient, SimulatedDevice};
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{MemoryStore, OlmMachine, StoreKey};

pub const BOB: &str = "@bob:example.org";
pub const ALICE: &str = "@alice:example.org";
pub const CAROL: &str = "@carol:example.net";

/// Bob's machine on a shared memory store, with 10 published one-time keys.
pub async fn bob_with_store() -> (OlmMachine, Arc<MemoryStore>, PublishedKeys) {
    let store = Arc::new(MemoryStore::new());
    // Every distinct failure reported, so that tests see one payload per failed message.
    let bob = OlmMachine::open_with_policy(
        BOB,
        "BOBPHONE",
        store.clone(),
        ReportingPolicy::every_message(),
    )
    .await
    .unwrap();
    let keys = publish(&bob, 10).await;
    (bob, store, keys)
}

/// Generates and publishes `count` one-time keys; returns them as a claimer sees them.
/// A new SQLite store at `path` with a fresh key (`synchronous=NORMAL`).
pub fn new_sqlite_store(path: impl AsRef<std::path::Path>) -> SqliteStore {
    SqliteStore::open(path, StoreKey::generate().unwrap(), Synchronous::Normal).unwrap()
}

pub async fn publish(machine: &OlmMachine, count: usize) -> PublishedKeys {
    simulator::publish_machine_keys(machine, count)
        .await
        .unwrap()
}

pub fn recipient(machine: &OlmMachine) -> Recipient {
    simulator::recipient_of(machine)
}

/// The ids of the results `machine` keeps for the app, not acknowledged yet.
pub async fn pending_result_ids(machine: &OlmMachine) -> Vec<String> {
    machine
        .pending_decrypted_events()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.event.id)
        .collect()
}

/// A peer with a session to Bob whose messages are now normal (type 1): it sent a pre-key
/// message, Bob decrypted it and replied.
pub async fn established_peer(
    bob: &OlmMachine,
    keys: &PublishedKeys,
    user: &str,
    device: &str,
    one_time_key_index: usize,
) -> (SimulatedDevice, Recipient) {
    let mut peer = SimulatedDevice::new(user, device);
    let to_bob = peer.create_session(keys, Some(keys.one_time_keys[one_time_key_index].key));
    let first = peer.encrypt(&to_bob, "m.dummy", json!({}));
    bob.decrypt_to_device_event(&first.to_string())
        .await
        .unwrap();
    let reply = bob
        .encrypt(&peer.published_keys(), "m.dummy", &[json!({})])
        .await
        .unwrap();
    peer.decrypt(&reply[0]).expect("the reply decrypts");
    (peer, to_bob)
}

pub fn message_type(event: &Value) -> u64 {
    event["content"]["ciphertext"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["type"]
        .as_u64()
        .unwrap()
}

/// The committed payload schema, compiled.
pub fn payload_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/to-device-error-event.schema.json"
    ))
    .unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

pub fn assert_schema_valid(validator: &jsonschema::Validator, payload: &str) {
    let value: Value = serde_json::from_str(payload).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{payload} is not schema-valid: {errors:?}"
    );
}

/// Creates Bob's device in a CLI store (`to-device-crypto keys` in its own process) and `senders`
/// simulated devices with a session to it, each on its own one-time key.
pub fn cli_bob_with_senders(
    bin: &str,
    store: &std::path::Path,
    senders: usize,
) -> (Recipient, Vec<SimulatedDevice>) {
    let output = std::process::Command::new(bin)
        .args([
            "keys",
            "--store",
            store.to_str().unwrap(),
            "--user-id",
            BOB,
            "--device-id",
            "BOBPHONE",
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let keys = to_device_crypto::olm::device_keys::parse_keys_upload_body(
        &serde_json::from_slice(&output.stdout).unwrap(),
    )
    .unwrap();
    let senders = (0..senders)
        .map(|i| {
            let mut sender =
                SimulatedDevice::new(&format!("@sender{i}:example.org"), &format!("DEV{i}"));
            sender.create_session(&keys, Some(keys.one_time_keys[i].key));
            sender
        })
        .collect();
    (Recipient::from_device(&keys.device), senders)
}
