//! Scenario 2: They → us: hundreds of events encrypted by the reference decrypt at ours, pre-key
//! messages first, normal ones after our reply; the sender is vouched for by their
//! `sender_device_keys` alone (we never ran /keys/query for Alice).

use serde_json::json;

use crate::common::*;

async fn deliver_and_check(pair: &Pair, from: usize, count: usize, expected_type: u64) {
    let contents: Vec<_> = (from..from + count)
        .map(|seq| json!({"seq": seq, "pad": "x".repeat(200)}))
        .collect();
    let events = pair.alice_sends(&contents).await;
    assert_eq!(events.len(), count);
    let ours = pair.bob.identity_keys().curve25519.to_base64();
    for event in &events {
        assert_eq!(message_type(event, &ours), expected_type);
    }
    // At most 100 to-device events per /sync response, as a server sends them.
    for (chunk_index, chunk) in events.chunks(100).enumerate() {
        let outcomes = bob_receives(&pair.bob, chunk).await;
        assert_eq!(outcomes.len(), chunk.len());
        for (i, outcome) in outcomes.iter().enumerate() {
            let event = decrypted(outcome);
            let seq = from + chunk_index * 100 + i;
            assert_eq!(event.event_type, TEST_TYPE);
            assert_eq!(event.sender, ALICE);
            assert_eq!(event.content["seq"], seq);
            assert_eq!(event.sender_curve25519_key, pair.alice.curve25519());
            assert_eq!(event.sender_ed25519_key, pair.alice.ed25519());
            assert_eq!(event.sender_device_id.as_deref(), Some(ALICE_DEVICE));
            assert!(event.sender_device_verified, "sender_device_keys validated");
            assert!(!event.re_emitted);
        }
        acknowledge(&pair.bob, &outcomes).await;
    }
}

#[tokio::test]
async fn hundreds_of_reference_events_decrypt_at_ours() {
    let pair = pair(false).await;
    // Before we reply, every message of the reference is a pre-key message.
    deliver_and_check(&pair, 0, 150, 0).await;
    // Our reply (our `encrypt`), delivered to them through receive_sync_changes.
    pair.bob_replies().await;
    // From now on the reference sends normal messages.
    deliver_and_check(&pair, 150, 250, 1).await;
    assert!(pair
        .bob
        .pending_decrypted_events()
        .await
        .unwrap()
        .is_empty());
}
