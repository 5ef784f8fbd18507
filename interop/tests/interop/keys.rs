//! Scenario 1: Keys: our `/keys/upload` body is accepted by the reference (device and one-time key
//! signatures verify) and it establishes an Olm session to our device.

use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::parse_keys_upload_body;
use to_device_crypto_interop::{first_one_time_key, Reference};

use crate::common::*;

/// Replaces the (only) signature of a signed object with another valid-looking one.
fn corrupt_signature(mut object: Value) -> Value {
    let signatures = object["signatures"].as_object_mut().unwrap();
    let by_user = signatures
        .values_mut()
        .next()
        .unwrap()
        .as_object_mut()
        .unwrap();
    let signature = by_user.values_mut().next().unwrap();
    let mut text = signature.as_str().unwrap().to_owned();
    let first = if text.starts_with('A') { "B" } else { "A" };
    text.replace_range(0..1, first);
    *signature = json!(text);
    object
}

#[tokio::test]
async fn our_device_keys_pass_the_reference_keys_query_checks() {
    let (_bob, bob_body) = ours(5).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    alice.receive_device_keys(&bob_body["device_keys"]).await;
    assert!(
        alice.knows_device(BOB, BOB_DEVICE).await,
        "the reference stored our device"
    );

    // Control: the reference does check the signature (a corrupted one is rejected).
    let other = Reference::new(ALICE, "ALICEOTHER").await;
    other
        .receive_device_keys(&corrupt_signature(bob_body["device_keys"].clone()))
        .await;
    assert!(
        !other.knows_device(BOB, BOB_DEVICE).await,
        "a bad device signature must be rejected"
    );
}

#[tokio::test]
async fn the_reference_claims_our_one_time_key_and_sends_us_a_pre_key_message() {
    let (bob, bob_body) = ours(5).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    alice.receive_device_keys(&bob_body["device_keys"]).await;
    let (key_id, key) = first_one_time_key(&bob_body);
    assert!(key_id.starts_with("signed_curve25519:"), "{key_id}");
    assert!(
        alice
            .claim_and_create_session(BOB, BOB_DEVICE, &key_id, &key)
            .await,
        "the reference's /keys/claim asks for our device"
    );

    let (events, withheld) = alice
        .try_encrypt(BOB, BOB_DEVICE, TEST_TYPE, &json!({"hello": "bob"}))
        .await;
    assert!(withheld.is_empty(), "withheld: {withheld:?}");
    assert_eq!(events.len(), 1);
    let event = &events[0];
    let ours = bob.identity_keys().curve25519.to_base64();
    assert_eq!(event["type"], "m.room.encrypted");
    assert_eq!(event["sender"], ALICE);
    assert_eq!(
        event["content"]["algorithm"],
        "m.olm.v1.curve25519-aes-sha2"
    );
    assert_eq!(event["content"]["sender_key"], alice.curve25519());
    assert_eq!(
        message_type(event, &ours),
        0,
        "the first message is a pre-key message"
    );

    let outcome = bob
        .decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    assert_eq!(outcome.event_type, TEST_TYPE);
    assert_eq!(outcome.content, json!({"hello": "bob"}));
    assert_eq!(outcome.sender, ALICE);
    assert_eq!(outcome.sender_curve25519_key, alice.curve25519());
    assert_eq!(outcome.sender_ed25519_key, alice.ed25519());
    assert!(
        outcome.sender_device_verified,
        "validated through sender_device_keys"
    );
}

#[tokio::test]
async fn the_reference_rejects_a_one_time_key_with_a_bad_signature() {
    let (_bob, bob_body) = ours(5).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    alice.receive_device_keys(&bob_body["device_keys"]).await;
    let (key_id, key) = first_one_time_key(&bob_body);
    alice
        .claim_and_create_session(BOB, BOB_DEVICE, &key_id, &corrupt_signature(key))
        .await;
    let (events, withheld) = alice
        .try_encrypt(BOB, BOB_DEVICE, TEST_TYPE, &json!({"hello": "bob"}))
        .await;
    assert!(
        events.is_empty(),
        "no session may be created from a badly signed one-time key"
    );
    assert_eq!(withheld, ["m.no_olm"]);
}

#[tokio::test]
async fn the_reference_upload_body_passes_our_checks() {
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    let body = alice.keys_upload_body().await.unwrap();
    // parse_keys_upload_body verifies the device self-signature and every key signature.
    let keys = parse_keys_upload_body(&body).expect("the reference's keys verify at ours");
    assert_eq!(keys.device.user_id, ALICE);
    assert_eq!(keys.device.device_id, ALICE_DEVICE);
    assert_eq!(keys.device.curve25519.to_base64(), alice.curve25519());
    assert!(keys.one_time_keys.iter().filter(|k| !k.fallback).count() >= 1);
    // And a /keys/query response with it is stored by our machine.
    let (bob, _) = ours(1).await;
    let outcome = bob
        .receive_keys_query_response(&keys_query(&body["device_keys"]))
        .await
        .unwrap();
    assert_eq!((outcome.stored, outcome.rejected.len()), (1, 0));
}
