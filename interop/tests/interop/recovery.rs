//! Scenario 5: Recovery of a wedged session between the reference (Alice) and ours (Bob).
//!
//! The reference's in-memory store cannot be cloned, so its "backup" is rebuilt from pickles with
//! the public store API (`Reference::snapshot` / `Reference::restore`): account, Olm sessions and
//! known devices, opened as a new `OlmMachine` — a restored old copy of its store.

use serde_json::{json, Value};
use to_device_crypto::store::MemoryStore;
use to_device_crypto::{FailureReason, OlmMachine, OutgoingRequestKind};
use to_device_crypto_interop::{first_one_time_key, RefOutcome, Reference};

use crate::common::*;

/// The `/sync` events a `/sendToDevice` body of ours delivers (one per recipient device).
fn to_device_events(sender: &str, event_type: &str, body: &Value) -> Vec<Value> {
    let mut events = Vec::new();
    for devices in body["messages"].as_object().unwrap().values() {
        for content in devices.as_object().unwrap().values() {
            events.push(json!({"type": event_type, "sender": sender, "content": content}));
        }
    }
    events
}

#[tokio::test]
async fn a_reference_restored_from_an_old_backup_is_unwedged_by_our_requests() {
    let p = pair(true).await;
    let bob_curve = p.bob.identity_keys().curve25519.to_base64();
    // A conversation: Alice's pre-key message, Bob's reply, then normal messages.
    let first = p.alice_sends(&[json!({"n": 0})]).await;
    let out = bob_receives(&p.bob, &first).await;
    decrypted(&out[0]);
    acknowledge(&p.bob, &out).await;
    p.bob_replies().await;

    // Alice's backup, then three more messages that Bob decrypts.
    let backup = p.alice.snapshot(&[&bob_curve], &[BOB]).await;
    let more = p
        .alice_sends(&[json!({"n": 1}), json!({"n": 2}), json!({"n": 3})])
        .await;
    let out = bob_receives(&p.bob, &more).await;
    assert!(out
        .iter()
        .all(|o| matches!(o, to_device_crypto::ToDeviceOutcome::Decrypted(_))));
    acknowledge(&p.bob, &out).await;

    // Alice restores the backup: her ratchet re-uses message keys Bob already consumed.
    let Pair {
        bob,
        alice,
        alice_body,
        ..
    } = p;
    drop(alice);
    let alice = Reference::restore(backup).await;
    let stale = alice
        .encrypt(BOB, BOB_DEVICE, TEST_TYPE, &[json!({"n": 4})])
        .await;
    assert_eq!(message_type(&stale[0], &bob_curve), 1);
    let out = bob_receives(&bob, &stale).await;
    assert_eq!(reason(&out[0]), Some(FailureReason::SessionWedged));

    // Our recovery: a /keys/claim for Alice's device …
    let requests = bob.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let OutgoingRequestKind::KeysClaim { body } = &requests[0].request else {
        panic!("expected a keys claim, got {:?}", requests[0]);
    };
    assert_eq!(
        body,
        &json!({"one_time_keys": {ALICE: {ALICE_DEVICE: "signed_curve25519"}}})
    );
    // … answered by the server with one of Alice's published one-time keys (signature checked
    // by us) …
    let (key_id, key) = first_one_time_key(&alice_body);
    let response = json!({"one_time_keys": {ALICE: {ALICE_DEVICE: {key_id: key}}}});
    bob.mark_request_as_sent(&requests[0].request_id, Some(&response))
        .await
        .unwrap();
    // … then an Olm-encrypted m.dummy on a new session, which the reference accepts.
    let requests = bob.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let OutgoingRequestKind::ToDevice {
        event_type, body, ..
    } = &requests[0].request
    else {
        panic!("expected a to-device request, got {:?}", requests[0]);
    };
    let dummy = to_device_events(BOB, event_type, body);
    assert_eq!(dummy.len(), 1);
    assert_eq!(
        message_type(&dummy[0], &alice.curve25519()),
        0,
        "a new session: pre-key"
    );
    let at_alice = alice.receive(&dummy).await;
    let [RefOutcome::Decrypted {
        event,
        sender_device,
        ..
    }] = &at_alice[..]
    else {
        panic!("the reference did not accept our m.dummy: {at_alice:?}");
    };
    assert_eq!(event["type"], "m.dummy");
    assert_eq!(sender_device.as_deref(), Some(BOB_DEVICE));
    bob.mark_request_as_sent(&requests[0].request_id, None)
        .await
        .unwrap();
    assert!(bob.outgoing_requests().await.unwrap().is_empty());

    // The reference now sends on the new session (normal messages: it received one on it), and
    // everything decrypts at ours again.
    let after = alice
        .encrypt(
            BOB,
            BOB_DEVICE,
            TEST_TYPE,
            &(5..25).map(|n| json!({"n": n})).collect::<Vec<_>>(),
        )
        .await;
    let out = bob_receives(&bob, &after).await;
    for (i, outcome) in out.iter().enumerate() {
        assert_eq!(decrypted(outcome).content["n"], 5 + i, "{outcome:?}");
    }
    assert!(after.iter().all(|e| message_type(e, &bob_curve) == 1));
}

/// The other direction, recorded: when *our* store is restored from an old copy, the reference
/// sees a wedged session but does not unwedge it — matrix-sdk-crypto only re-establishes a
/// session whose newest session with the device is older than an hour (its
/// `UNWEDGING_INTERVAL`), and a test cannot age a session through the public API. So the
/// recovery we test is the one ours drives (above).
#[tokio::test]
async fn the_reference_does_not_unwedge_a_session_younger_than_an_hour() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let bob = OlmMachine::open(BOB, BOB_DEVICE, store.clone())
        .await
        .unwrap();
    let bob_body = upload(&bob, 5).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    let alice_body = alice.keys_upload_body().await.unwrap();
    alice.receive_device_keys(&bob_body["device_keys"]).await;
    let alice_keys = published(&alice_body);
    // Bob talks first (his outbound session); Alice replies; then Bob's backup.
    let first = bob
        .encrypt(&alice_keys, TEST_TYPE, &[json!({"n": 0})])
        .await
        .unwrap();
    assert!(matches!(
        alice.receive(&first).await[..],
        [RefOutcome::Decrypted { .. }]
    ));
    let reply = alice
        .encrypt(BOB, BOB_DEVICE, TEST_TYPE, &[json!({"reply": 1})])
        .await;
    decrypted(&bob_receives(&bob, &reply).await[0]);
    let backup = store.snapshot();
    let more = bob
        .encrypt(&alice_keys, TEST_TYPE, &[json!({"n": 1}), json!({"n": 2})])
        .await
        .unwrap();
    assert!(alice
        .receive(&more)
        .await
        .iter()
        .all(|o| matches!(o, RefOutcome::Decrypted { .. })));

    drop(bob);
    let bob = OlmMachine::open(BOB, BOB_DEVICE, std::sync::Arc::new(backup))
        .await
        .unwrap();
    let stale = bob
        .encrypt(&alice_keys, TEST_TYPE, &[json!({"n": 3})])
        .await
        .unwrap();
    let out = alice.receive(&stale).await;
    assert_eq!(
        out,
        [RefOutcome::UnableToDecrypt("DecryptionFailure".to_owned())]
    );
    let user = ruma::UserId::parse(BOB).unwrap();
    let claim = alice
        .machine
        .get_missing_sessions([&*user].into_iter())
        .await
        .unwrap();
    assert!(
        claim.is_none(),
        "matrix-sdk-crypto 0.18 waits an hour before unwedging"
    );
    assert!(alice.take_to_device_events().await.is_empty());
}
