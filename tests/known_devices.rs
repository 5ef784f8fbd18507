//! What the machine knows about other devices, and from where: `/keys/query` (trusted by the
//! plaintext checks; a known device's Ed25519 key cannot change) and verified
//! `sender_device_keys` (remembered for session recovery only, never as a known device).

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use to_device_crypto::simulator::SimulatedDevice;
use to_device_crypto::store::{CryptoStore, SqliteStore, Synchronous};
use to_device_crypto::{FailureReason, OlmMachine, RefusedKeyChange, StoreKey, ToDeviceOutcome};

fn failure(outcome: &ToDeviceOutcome) -> Option<FailureReason> {
    match outcome {
        ToDeviceOutcome::Failed(failed) => Some(failed.error.reason()),
        _ => None,
    }
}

fn verified(outcome: &ToDeviceOutcome) -> Option<bool> {
    match outcome {
        ToDeviceOutcome::Decrypted(event) => Some(event.sender_device_verified),
        _ => None,
    }
}

/// A `/keys/query` answer that gives a known device id another (validly self-signed) Ed25519
/// key is refused and reported; the known keys stay — also in the store — and keep deciding
/// `keys.ed25519`: Alice's messages are still accepted, and an impostor's claim is not.
#[tokio::test]
async fn a_known_devices_ed25519_key_cannot_change() {
    let (bob, store, keys) = bob_with_store().await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let outcome = bob
        .receive_keys_query_response(&alice.keys_query_response())
        .await
        .unwrap();
    assert_eq!((outcome.stored, outcome.refused_key_changes.len()), (1, 0));

    // Same user and device id, another account: what a lying server or a re-created device sends.
    let mut impostor = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let outcome = bob
        .receive_keys_query_response(&impostor.keys_query_response())
        .await
        .unwrap();
    assert_eq!(outcome.stored, 0);
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    assert_eq!(
        outcome.refused_key_changes,
        [RefusedKeyChange {
            user_id: ALICE.to_owned(),
            device_id: "ALICEPHONE".to_owned(),
            known_ed25519: alice.ed25519_key().to_base64(),
            received_ed25519: impostor.ed25519_key().to_base64(),
        }]
    );

    // Checked after a restart, so that the store is what answers.
    drop(bob);
    let bob = OlmMachine::open(BOB, "BOBPHONE", store).await.unwrap();
    let to_bob = alice.create_session(&keys, Some(keys.one_time_keys[0].key));
    let genuine = alice.plaintext(&to_bob, "m.dummy", json!({}), false);
    let genuine = alice.encrypt_raw(&to_bob, genuine.to_string().as_bytes());
    let to_bob = impostor.create_session(&keys, Some(keys.one_time_keys[1].key));
    let forged = impostor.plaintext(&to_bob, "m.dummy", json!({}), false);
    let forged = impostor.encrypt_raw(&to_bob, forged.to_string().as_bytes());
    let outcomes = bob
        .receive_to_device_events(&[genuine.to_string(), forged.to_string()])
        .await
        .unwrap();
    assert_eq!(verified(&outcomes[0]), Some(true), "{:?}", outcomes[0]);
    // The impostor's Curve25519 key is not Alice's: it is an unknown device without keys.
    assert_eq!(
        failure(&outcomes[1]),
        Some(FailureReason::MissingSigningKey)
    );
}

/// The server must not hand out other keys for our own device either.
#[tokio::test]
async fn keys_query_cannot_change_our_own_devices_keys() {
    let (bob, _store, _keys) = bob_with_store().await;
    let fake_bob = SimulatedDevice::new(BOB, "BOBPHONE");
    let outcome = bob
        .receive_keys_query_response(&fake_bob.keys_query_response())
        .await
        .unwrap();
    assert_eq!(outcome.stored, 0);
    assert_eq!(outcome.refused_key_changes.len(), 1);
    assert_eq!(
        outcome.refused_key_changes[0].known_ed25519,
        bob.identity_keys().ed25519.to_base64()
    );
    let ours = json!({"device_keys": {BOB: {"BOBPHONE": bob.device_keys().await}}});
    let outcome = bob.receive_keys_query_response(&ours).await.unwrap();
    assert_eq!((outcome.stored, outcome.refused_key_changes.len()), (1, 0));
}

/// A device known only from a verified `sender_device_keys` is remembered for recovery — in
/// the store, apart from `/keys/query` devices — but it is not a known device for the plaintext
/// checks: without `sender_device_keys`, its next message is still `MissingSigningKey` (as in
/// matrix-sdk-crypto). A `/keys/query` answer for it replaces the remembered entry.
#[tokio::test]
async fn sender_device_keys_teach_recovery_not_the_plaintext_checks() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let store = Arc::new(
        SqliteStore::open(dir.path().join("bob.sqlite3"), key, Synchronous::Normal).unwrap(),
    );
    let bob = OlmMachine::open(BOB, "BOBPHONE", store.clone())
        .await
        .unwrap();
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let mut send = |event_type: &str, with_keys: bool| {
        let plaintext = alice.plaintext(&to_bob, event_type, json!({}), with_keys);
        alice
            .encrypt_raw(&to_bob, plaintext.to_string().as_bytes())
            .to_string()
    };
    let events = [
        send("m.dummy", true),
        send("m.dummy", false),
        send("m.room_key", false),
    ];
    let outcomes = bob.receive_to_device_events(&events).await.unwrap();
    assert_eq!(verified(&outcomes[0]), Some(true), "{:?}", outcomes[0]);
    assert_eq!(
        failure(&outcomes[1]),
        Some(FailureReason::MissingSigningKey),
        "a remembered device is not a known device"
    );
    assert_eq!(
        verified(&outcomes[2]),
        Some(false),
        "room keys from unknown devices, unverified"
    );
    let remembered = store.load_recovery_devices().await.unwrap();
    assert_eq!(remembered.len(), 1);
    assert_eq!(
        (
            remembered[0].user_id.as_str(),
            remembered[0].device_id.as_str()
        ),
        (ALICE, "ALICEPHONE")
    );
    assert!(store.load_devices().await.unwrap().is_empty());

    // /keys/query is the authority: it replaces the remembered entry, and now the checks know
    // Alice without sender_device_keys.
    bob.receive_keys_query_response(&alice.keys_query_response())
        .await
        .unwrap();
    assert!(store.load_recovery_devices().await.unwrap().is_empty());
    assert_eq!(store.load_devices().await.unwrap().len(), 1);
    let mut send = |event_type: &str, with_keys: bool| {
        let plaintext = alice.plaintext(&to_bob, event_type, json!({}), with_keys);
        alice
            .encrypt_raw(&to_bob, plaintext.to_string().as_bytes())
            .to_string()
    };
    let outcomes = bob
        .receive_to_device_events(&[send("m.dummy", false), send("m.dummy", true)])
        .await
        .unwrap();
    assert_eq!(verified(&outcomes[0]), Some(true), "{:?}", outcomes[0]);
    assert_eq!(verified(&outcomes[1]), Some(true), "{:?}", outcomes[1]);
    assert!(
        store.load_recovery_devices().await.unwrap().is_empty(),
        "a device known from /keys/query is not remembered again"
    );
}

/// The FFI adapter hands apps the same verdicts: stored, rejected, and refused key changes with
/// both keys.
#[tokio::test]
async fn ffi_apps_see_refused_key_changes() {
    use to_device_crypto::ffi;
    let bob = ffi::OlmMachine::open_in_memory(BOB.into(), "BOBPHONE".into())
        .await
        .unwrap();
    let alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let outcome = bob
        .receive_keys_query(alice.keys_query_response().to_string())
        .await
        .unwrap();
    assert_eq!(
        (
            outcome.stored,
            outcome.rejected.len(),
            outcome.refused_key_changes.len()
        ),
        (1, 0, 0)
    );
    let impostor = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let outcome = bob
        .receive_keys_query(impostor.keys_query_response().to_string())
        .await
        .unwrap();
    assert_eq!(outcome.stored, 0);
    assert_eq!(
        outcome.refused_key_changes,
        [ffi::RefusedKeyChangeFfi {
            user_id: ALICE.to_owned(),
            device_id: "ALICEPHONE".to_owned(),
            known_ed25519: alice.ed25519_key().to_base64(),
            received_ed25519: impostor.ed25519_key().to_base64(),
        }]
    );
    // The count-only call agrees.
    assert_eq!(
        bob.receive_keys_query_response(alice.keys_query_response().to_string())
            .await
            .unwrap(),
        1
    );
}
