//! Shared set-up: our machine (Bob) and a reference machine (Alice) that know each other.
#![allow(dead_code)]

use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::{parse_keys_upload_body, PublishedKeys};
use to_device_crypto::{DecryptedToDeviceEvent, FailureReason, OlmMachine, ToDeviceOutcome};
use to_device_crypto_interop::{first_one_time_key, RefOutcome, Reference};

pub const BOB: &str = "@bob:example.org";
pub const BOB_DEVICE: &str = "BOBPHONE";
pub const ALICE: &str = "@alice:example.org";
pub const ALICE_DEVICE: &str = "ALICEREF";
/// The event type of the test traffic: a custom type, so that both sides only decrypt it (no
/// room-key handling on the reference side).
pub const TEST_TYPE: &str = "org.example.interop";

/// Our machine with `one_time_keys` published; returns it and its `/keys/upload` body.
pub async fn ours(one_time_keys: usize) -> (OlmMachine, Value) {
    let bob = OlmMachine::in_memory(BOB, BOB_DEVICE).await.unwrap();
    let body = upload(&bob, one_time_keys).await;
    (bob, body)
}

/// Generates `count` one-time keys, returns the `/keys/upload` body and marks it published.
pub async fn upload(machine: &OlmMachine, count: usize) -> Value {
    machine.generate_one_time_keys(count).await.unwrap();
    let body = machine.keys_for_upload().await.expect("keys to upload");
    machine.mark_keys_as_published().await.unwrap();
    body
}

/// The reference's keys as our `encrypt` needs them.
pub fn published(upload_body: &Value) -> PublishedKeys {
    let mut keys = parse_keys_upload_body(upload_body).expect("the reference's upload body parses");
    keys.one_time_keys.retain(|k| !k.fallback);
    keys
}

/// A `/keys/query` response body for one device.
pub fn keys_query(device_keys: &Value) -> Value {
    let user = device_keys["user_id"].as_str().unwrap();
    let device = device_keys["device_id"].as_str().unwrap();
    json!({"device_keys": {user: {device: device_keys}}})
}

/// Both machines, and the reference with an Olm session to us (it claimed our first one-time
/// key). `bob_knows_alice`: whether we learn Alice's keys from `/keys/query` (otherwise only her
/// `sender_device_keys` can vouch for her).
pub struct Pair {
    pub bob: OlmMachine,
    pub bob_body: Value,
    pub alice: Reference,
    pub alice_body: Value,
}

pub async fn pair(bob_knows_alice: bool) -> Pair {
    let (bob, bob_body) = ours(5).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    let alice_body = alice
        .keys_upload_body()
        .await
        .expect("the reference uploads its keys");
    alice.receive_device_keys(&bob_body["device_keys"]).await;
    assert!(alice.knows_device(BOB, BOB_DEVICE).await);
    let (key_id, key) = first_one_time_key(&bob_body);
    assert!(
        alice
            .claim_and_create_session(BOB, BOB_DEVICE, &key_id, &key)
            .await
    );
    if bob_knows_alice {
        let outcome = bob
            .receive_keys_query_response(&keys_query(&alice_body["device_keys"]))
            .await
            .unwrap();
        assert_eq!(outcome.stored, 1, "{:?}", outcome.rejected);
    }
    Pair {
        bob,
        bob_body,
        alice,
        alice_body,
    }
}

impl Pair {
    pub fn alice_keys(&self) -> PublishedKeys {
        published(&self.alice_body)
    }

    /// Alice (reference) encrypts one event per content for Bob.
    pub async fn alice_sends(&self, contents: &[Value]) -> Vec<Value> {
        self.alice
            .encrypt(BOB, BOB_DEVICE, TEST_TYPE, contents)
            .await
    }

    /// Bob (ours) encrypts one event per content for Alice.
    pub async fn bob_sends(&self, contents: &[Value]) -> Vec<Value> {
        self.bob
            .encrypt(&self.alice_keys(), TEST_TYPE, contents)
            .await
            .unwrap()
    }

    /// Bob replies and Alice decrypts it: from then on both sides send normal messages.
    pub async fn bob_replies(&self) {
        let reply = self.bob_sends(&[json!({"reply": true})]).await;
        let out = self.alice.receive(&reply).await;
        assert!(matches!(out[..], [RefOutcome::Decrypted { .. }]), "{out:?}");
    }
}

/// The Olm message type (0 pre-key, 1 normal) of the entry for `curve25519` in an event.
pub fn message_type(event: &Value, curve25519: &str) -> u64 {
    event["content"]["ciphertext"][curve25519]["type"]
        .as_u64()
        .expect("an entry for the key")
}

pub fn decrypted(outcome: &ToDeviceOutcome) -> &DecryptedToDeviceEvent {
    match outcome {
        ToDeviceOutcome::Decrypted(event) => event,
        other => panic!("expected a decrypted event, got {other:?}"),
    }
}

pub fn reason(outcome: &ToDeviceOutcome) -> Option<FailureReason> {
    match outcome {
        ToDeviceOutcome::Failed(failed) => Some(failed.error.reason()),
        _ => None,
    }
}

/// Feeds events to our machine as one batch (raw JSON strings, as from `/sync`).
pub async fn bob_receives(bob: &OlmMachine, events: &[Value]) -> Vec<ToDeviceOutcome> {
    let raw: Vec<String> = events.iter().map(Value::to_string).collect();
    bob.receive_to_device_events(&raw).await.unwrap()
}

/// Acknowledges every decrypted result of `outcomes`.
pub async fn acknowledge(bob: &OlmMachine, outcomes: &[ToDeviceOutcome]) {
    let ids: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            ToDeviceOutcome::Decrypted(e) => Some(e.id.clone()),
            _ => None,
        })
        .collect();
    bob.acknowledge(&ids).await.unwrap();
}
