//! Scenario 3: Us → them: events from our `encrypt` decrypt in the reference's `receive_sync_changes`,
//! and the reference identifies our device from our `sender_device_keys` (it never ran
//! /keys/query for us before the first batch).

use serde_json::{json, Value};
use to_device_crypto_interop::{RefOutcome, Reference};

use crate::common::*;

fn check(outcomes: &[RefOutcome], from: usize, bob_device_keys: &Value, bob_curve: &str) {
    for (i, outcome) in outcomes.iter().enumerate() {
        let RefOutcome::Decrypted {
            event,
            sender,
            sender_device,
            sender_curve25519,
        } = outcome
        else {
            panic!("event {i}: the reference failed: {outcome:?}");
        };
        assert_eq!(sender, BOB);
        assert_eq!(
            sender_device.as_deref(),
            Some(BOB_DEVICE),
            "our device identified"
        );
        assert_eq!(sender_curve25519, bob_curve);
        assert_eq!(event["type"], TEST_TYPE);
        assert_eq!(event["sender"], BOB);
        assert_eq!(event["content"]["seq"], from + i);
        assert_eq!(&event["sender_device_keys"], bob_device_keys);
    }
}

#[tokio::test]
async fn our_events_decrypt_in_the_reference() {
    let (bob, _) = ours(1).await;
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    let alice_body = alice.keys_upload_body().await.unwrap();
    let alice_keys = published(&alice_body);
    let bob_curve = bob.identity_keys().curve25519.to_base64();
    let bob_device_keys = bob.device_keys().await;
    assert!(!alice.knows_device(BOB, BOB_DEVICE).await);

    // Pre-key messages (our session is new; the reference has not replied yet).
    let contents: Vec<_> = (0..150).map(|seq| json!({"seq": seq})).collect();
    let events = bob
        .encrypt(&alice_keys, TEST_TYPE, &contents)
        .await
        .unwrap();
    for event in &events {
        assert_eq!(message_type(event, &alice.curve25519()), 0);
    }
    for (n, chunk) in events.chunks(100).enumerate() {
        let outcomes = alice.receive(chunk).await;
        assert_eq!(outcomes.len(), chunk.len());
        check(&outcomes, n * 100, &bob_device_keys, &bob_curve);
    }

    // The reference replies on the session we created; we decrypt it.
    alice.receive_device_keys(&bob_device_keys).await;
    let reply = alice
        .encrypt(BOB, BOB_DEVICE, TEST_TYPE, &[json!({"reply": true})])
        .await;
    assert_eq!(
        message_type(&reply[0], &bob_curve),
        1,
        "the reference reuses our session"
    );
    let out = bob_receives(&bob, &reply).await;
    assert_eq!(decrypted(&out[0]).content, json!({"reply": true}));

    // Now our messages are normal messages, and still decrypt there.
    let contents: Vec<_> = (150..300).map(|seq| json!({"seq": seq})).collect();
    let events = bob
        .encrypt(&alice_keys, TEST_TYPE, &contents)
        .await
        .unwrap();
    for event in &events {
        assert_eq!(message_type(event, &alice.curve25519()), 1);
    }
    for (n, chunk) in events.chunks(100).enumerate() {
        let outcomes = alice.receive(chunk).await;
        check(&outcomes, 150 + n * 100, &bob_device_keys, &bob_curve);
    }
}
