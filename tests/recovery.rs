//! Recovery from wedged sessions with two real machines: A's session is corrupted (A restores an
//! old backup), B reports SessionWedged, B's outgoing requests claim a key of A's and send A an
//! encrypted m.dummy on a new session, and A's next messages decrypt at B.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::parse_keys_upload_body;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{
    FailureReason, MemoryStore, OlmMachine, OutgoingRequestKind, StoreKey, ToDeviceOutcome,
};

async fn keys_query_response(machine: &OlmMachine) -> Value {
    json!({"device_keys": {machine.user_id(): {machine.device_id(): machine.device_keys().await}}})
}

/// What the server answers to B's claim for A's device: one of A's freshly published keys.
async fn claim_response(a: &OlmMachine) -> Value {
    a.generate_one_time_keys(1).await.unwrap();
    let body = a.keys_for_upload().await.unwrap();
    a.mark_keys_as_published().await.unwrap();
    let (key_id, key) = body["one_time_keys"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    json!({"one_time_keys": {a.user_id(): {a.device_id(): {key_id.clone(): key.clone()}}}})
}

async fn sqlite_b(dir: &Path, key: &StoreKey) -> OlmMachine {
    let store = SqliteStore::open(dir.join("b.sqlite3"), key.clone(), Synchronous::Normal).unwrap();
    OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .unwrap()
}

async fn decrypt_one(machine: &OlmMachine, event: &Value) -> ToDeviceOutcome {
    let mut outcomes = machine
        .receive_to_device_events(&[event.to_string()])
        .await
        .unwrap();
    outcomes.pop().unwrap()
}

fn reason(outcome: &ToDeviceOutcome) -> Option<FailureReason> {
    match outcome {
        ToDeviceOutcome::Failed(failed) => Some(failed.error.reason()),
        _ => None,
    }
}

/// `b_queries_a`: whether B learns A's keys from /keys/query; if not, B knows A only from the
/// verified `sender_device_keys` of A's messages (remembered for recovery, across a restart).
async fn wedge_and_recover(restart_before_claim_response: bool, b_queries_a: bool) {
    let dir = tempfile::tempdir().unwrap();
    let b_key = StoreKey::generate().unwrap();
    let mut b = sqlite_b(dir.path(), &b_key).await;
    let a_store = Arc::new(MemoryStore::new());
    let a = OlmMachine::open(ALICE, "ALICEPHONE", a_store.clone())
        .await
        .unwrap();
    a.receive_keys_query_response(&keys_query_response(&b).await)
        .await
        .unwrap();
    if b_queries_a {
        b.receive_keys_query_response(&keys_query_response(&a).await)
            .await
            .unwrap();
    }
    let b_keys = publish(&b, 2).await;
    publish(&a, 2).await;

    // A and B talk: A's pre-key message, B's reply, then A's normal messages.
    let first = a
        .encrypt(&b_keys, "m.room_key", &[json!({"n": 0})])
        .await
        .unwrap();
    assert!(matches!(
        decrypt_one(&b, &first[0]).await,
        ToDeviceOutcome::Decrypted(_)
    ));
    let a_keys = parse_keys_upload_body(&json!({"device_keys": a.device_keys().await})).unwrap();
    let reply = b.encrypt(&a_keys, "m.dummy", &[json!({})]).await.unwrap();
    assert!(matches!(
        decrypt_one(&a, &reply[0]).await,
        ToDeviceOutcome::Decrypted(_)
    ));
    let backup = a_store.snapshot();
    for n in 1..4 {
        let event = a
            .encrypt(&b_keys, "m.room_key", &[json!({"n": n})])
            .await
            .unwrap();
        assert!(matches!(
            decrypt_one(&b, &event[0]).await,
            ToDeviceOutcome::Decrypted(_)
        ));
    }

    if !b_queries_a {
        // What B learned from A's sender_device_keys survives a restart.
        drop(b);
        b = sqlite_b(dir.path(), &b_key).await;
    }

    // A restores an old backup: its ratchet re-uses message keys B already consumed.
    drop(a);
    let a = OlmMachine::open(ALICE, "ALICEPHONE", Arc::new(backup))
        .await
        .unwrap();
    let stale = a
        .encrypt(&b_keys, "m.room_key", &[json!({"n": 4})])
        .await
        .unwrap();
    assert_eq!(
        reason(&decrypt_one(&b, &stale[0]).await),
        Some(FailureReason::SessionWedged)
    );
    let requests = b.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let claim_id = requests[0].request_id.clone();
    let OutgoingRequestKind::KeysClaim { body } = &requests[0].request else {
        panic!("expected a keys claim, got {:?}", requests[0]);
    };
    assert_eq!(
        body,
        &json!({"one_time_keys": {ALICE: {"ALICEPHONE": "signed_curve25519"}}})
    );

    // Within the hour, more wedged messages from A queue nothing new.
    let stale = a
        .encrypt(&b_keys, "m.room_key", &[json!({"n": 5})])
        .await
        .unwrap();
    assert_eq!(
        reason(&decrypt_one(&b, &stale[0]).await),
        Some(FailureReason::SessionWedged)
    );
    let again = b.outgoing_requests().await.unwrap();
    assert_eq!(again.len(), 1, "at most one recovery per device per hour");
    assert_eq!(
        again[0].request_id, claim_id,
        "an unsent request keeps its id"
    );

    if restart_before_claim_response {
        drop(b);
        b = sqlite_b(dir.path(), &b_key).await;
        assert_eq!(b.outgoing_requests().await.unwrap()[0].request_id, claim_id);
    }

    // The app sends the claim and feeds the response back: B queues an encrypted m.dummy.
    b.mark_request_as_sent(&claim_id, Some(&claim_response(&a).await))
        .await
        .unwrap();
    let requests = b.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let OutgoingRequestKind::ToDevice {
        event_type,
        txn_id,
        body,
    } = requests[0].request.clone()
    else {
        panic!("expected a to-device request");
    };
    assert_eq!(event_type, "m.room.encrypted");
    assert!(!txn_id.is_empty());
    let content = body["messages"][ALICE]["ALICEPHONE"].clone();
    let dummy = json!({"type": event_type, "sender": BOB, "content": content});
    match decrypt_one(&a, &dummy).await {
        ToDeviceOutcome::Decrypted(event) => {
            assert_eq!(event.event_type, "m.dummy");
            assert!(event.sender_device_verified);
        }
        other => panic!("A could not decrypt the m.dummy: {other:?}"),
    }
    b.mark_request_as_sent(&requests[0].request_id, None)
        .await
        .unwrap();
    assert!(b.outgoing_requests().await.unwrap().is_empty());

    // A's next messages use the new session and decrypt at B.
    for n in 6..9 {
        let event = a
            .encrypt(&b_keys, "m.room_key", &[json!({"n": n})])
            .await
            .unwrap();
        match decrypt_one(&b, &event[0]).await {
            ToDeviceOutcome::Decrypted(event) => assert_eq!(event.content["n"], n),
            other => panic!("message {n} after recovery: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_wedged_session_recovers_between_two_machines() {
    wedge_and_recover(false, true).await;
}

#[tokio::test]
async fn recovery_survives_a_restart_between_the_failure_and_the_claim_response() {
    wedge_and_recover(true, true).await;
}

/// The recovery issue asked for devices known from /keys/query *or from a verified
/// sender_device_keys*; only the former got a /keys/claim, so the latter stayed wedged.
#[tokio::test]
async fn a_device_known_only_from_sender_device_keys_recovers_across_restarts() {
    wedge_and_recover(true, false).await;
}

#[tokio::test]
async fn unknown_devices_and_other_failures_queue_no_recovery() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut stranger = to_device_crypto::simulator::SimulatedDevice::new(CAROL, "CAROLDEV");
    let to_bob = stranger.create_session(&keys, Some(keys.one_time_keys[0].key));
    // Unknown device: its wedged message cannot be recovered (we cannot claim its keys safely).
    let event = to_device_crypto::simulator::tamper_with_body(stranger.encrypt(
        &to_bob,
        "m.dummy",
        json!({}),
    ));
    bob.receive_to_device_events(&[event.to_string()])
        .await
        .unwrap();
    assert!(bob.outgoing_requests().await.unwrap().is_empty());
    // A malformed event from a known device is not a session problem.
    bob.receive_keys_query_response(&stranger.keys_query_response())
        .await
        .unwrap();
    bob.receive_to_device_events(&["{}"]).await.unwrap();
    assert!(bob.outgoing_requests().await.unwrap().is_empty());
    assert!(bob.mark_request_as_sent("nope", None).await.is_err());
}
