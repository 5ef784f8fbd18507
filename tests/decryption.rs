//! Success paths and the state rules: pre-key then normal messages, several sessions per sender,
//! out-of-order delivery, commits on plaintext failures, failed commits, and SQLite reopen.

mod common;

use std::sync::Arc;

use common::*;
use futures::StreamExt;
use serde_json::json;
use to_device_crypto::simulator::SimulatedDevice;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{FailureReason, MemoryStore, OlmMachine, StoreKey, ToDeviceOutcome};

#[tokio::test]
async fn pre_key_messages_then_normal_messages_decrypt() {
    let (bob, _store, keys) = bob_with_store().await;
    bob.receive_keys_query_response(
        &SimulatedDevice::new(ALICE, "ALICEPHONE").keys_query_response(),
    )
    .await
    .unwrap();
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE2");
    let to_bob = alice.create_session(&keys, None);
    // The first message creates the session; later pre-key messages reuse it.
    for seq in 0..3 {
        let event = alice.encrypt(&to_bob, "m.room_key", json!({"seq": seq}));
        assert_eq!(message_type(&event), 0);
        let decrypted = bob
            .decrypt_to_device_event(&event.to_string())
            .await
            .unwrap();
        assert_eq!(decrypted.event_type, "m.room_key");
        assert_eq!(decrypted.content["seq"], seq);
        assert_eq!(decrypted.sender, ALICE);
        assert_eq!(
            decrypted.sender_curve25519_key,
            alice.curve25519_key().to_base64()
        );
        assert_eq!(
            decrypted.sender_ed25519_key,
            alice.ed25519_key().to_base64()
        );
        assert_eq!(decrypted.sender_device_id.as_deref(), Some("ALICEPHONE2"));
        assert!(
            decrypted.sender_device_verified,
            "validated sender_device_keys"
        );
    }
    let reply = bob
        .encrypt(&alice.published_keys(), "m.dummy", &[json!({})])
        .await
        .unwrap();
    assert_eq!(
        message_type(&reply[0]),
        1,
        "Bob answers on the inbound session"
    );
    alice.decrypt(&reply[0]).unwrap();
    let normal = alice.encrypt(&to_bob, "m.room_key", json!({"seq": 3}));
    assert_eq!(message_type(&normal), 1);
    let decrypted = bob
        .decrypt_to_device_event(&normal.to_string())
        .await
        .unwrap();
    assert_eq!(decrypted.content["seq"], 3);
}

#[tokio::test]
async fn out_of_order_delivery_within_vodozemac_limits_decrypts() {
    let (bob, _store, keys) = bob_with_store().await;
    let (mut alice, to_bob) = established_peer(&bob, &keys, ALICE, "ALICEPHONE", 0).await;
    let events: Vec<_> = (0..30)
        .map(|seq| alice.encrypt(&to_bob, "m.room_key", json!({"seq": seq})))
        .collect();
    // Newest first, then the rest in a shuffled order.
    let order = [29, 0, 15, 3, 28, 1, 2, 14, 16, 27];
    for &i in &order {
        let decrypted = bob
            .decrypt_to_device_event(&events[i].to_string())
            .await
            .unwrap();
        assert_eq!(decrypted.content["seq"], i);
    }
}

#[tokio::test]
async fn several_sessions_with_one_sender_all_decrypt() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    // Alice creates a session, then (after losing it) a second one: Bob keeps both.
    let to_bob = alice.create_session(&keys, Some(keys.one_time_keys[0].key));
    let old = alice.encrypt(&to_bob, "m.dummy", json!({"session": 1}));
    alice.create_session(&keys, Some(keys.one_time_keys[1].key));
    let new = alice.encrypt(&to_bob, "m.dummy", json!({"session": 2}));
    let outcomes = bob
        .receive_to_device_events(&[new.to_string(), old.to_string()])
        .await
        .unwrap();
    for (outcome, session) in outcomes.iter().zip([2, 1]) {
        match outcome {
            ToDeviceOutcome::Decrypted(event) => assert_eq!(event.content["session"], session),
            other => panic!("expected a decrypted event, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_message_that_fails_a_plaintext_check_still_commits_its_session_and_hash() {
    let (bob, store, keys) = bob_with_store().await;
    let mut mallory = SimulatedDevice::new("@mallory:evil.example", "MALLORY");
    let to_bob = mallory.create_session(&keys, None);
    let mut plaintext = mallory.plaintext(&to_bob, "m.room_key", json!({}), true);
    plaintext["recipient"] = json!("@carol:example.org");
    let event = mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes());
    let error = bob
        .decrypt_to_device_event(&event.to_string())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), FailureReason::MismatchedRecipient);
    assert_eq!(store.session_count(), 1, "the new session was committed");
    assert_eq!(store.message_hash_count(), 1);
    // Re-delivery is a replay, never a false "wedged" or "unknown one-time key".
    let error = bob
        .decrypt_to_device_event(&event.to_string())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), FailureReason::ReplayedMessage);
    // And the session keeps working.
    let good = mallory.encrypt(&to_bob, "m.room_key", json!({"ok": 1}));
    assert!(bob.decrypt_to_device_event(&good.to_string()).await.is_ok());
}

#[tokio::test]
async fn a_repeat_is_re_emitted_while_pending_and_a_replay_once_acknowledged() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({})).to_string();
    let outcomes = bob
        .receive_to_device_events(&[&event, &event])
        .await
        .unwrap();
    let (ToDeviceOutcome::Decrypted(first), ToDeviceOutcome::Decrypted(repeat)) =
        (&outcomes[0], &outcomes[1])
    else {
        panic!("expected the result and its re-emission, got {outcomes:?}");
    };
    assert!(!first.re_emitted);
    assert!(repeat.re_emitted);
    assert_eq!(repeat.id, first.id);
    // Still pending in a later batch, and listed for the app.
    let later = bob.decrypt_to_device_event(&event).await.unwrap();
    assert!(later.re_emitted);
    let pending = bob.pending_decrypted_events().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].batch, pending[0].index),
        (1, 0),
        "original batch and index"
    );
    assert_eq!(pending[0].event.id, first.id);
    // Once acknowledged, a re-delivery is a replay.
    bob.acknowledge(std::slice::from_ref(&first.id))
        .await
        .unwrap();
    assert!(bob.pending_decrypted_events().await.unwrap().is_empty());
    let error = bob.decrypt_to_device_event(&event).await.unwrap_err();
    assert_eq!(error.reason(), FailureReason::ReplayedMessage);
}

#[tokio::test]
async fn a_failed_commit_changes_nothing_and_the_batch_can_be_retried() {
    let (bob, store, keys) = bob_with_store().await;
    let mut failures = bob.to_device_decryption_failure_stream();
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let batch: Vec<String> = (0..5)
        .map(|seq| {
            alice
                .encrypt(&to_bob, "m.room_key", json!({"seq": seq}))
                .to_string()
        })
        .collect();
    store.fail_next_save();
    let error = bob.receive_to_device_events(&batch).await.unwrap_err();
    assert!(error.to_string().contains("simulated"), "{error}");
    let item = failures.next().await.unwrap().unwrap();
    assert_eq!(item.reason, FailureReason::Store);
    assert_eq!(
        item.payload().unwrap().reason().analytics_name(),
        "ToDeviceFailedToDecrypt_Store"
    );
    assert_eq!(store.session_count(), 0);
    assert_eq!(store.message_hash_count(), 0);
    // The retry sees the one-time key unused and no hash: everything decrypts.
    let outcomes = bob.receive_to_device_events(&batch).await.unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ToDeviceOutcome::Decrypted(_))));
    assert_eq!(store.message_hash_count(), 5);
}

#[tokio::test]
async fn a_single_failed_decrypt_reports_a_store_error_as_store() {
    let (bob, store, keys) = bob_with_store().await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({})).to_string();
    store.fail_next_save();
    let error = bob.decrypt_to_device_event(&event).await.unwrap_err();
    assert_eq!(error.reason(), FailureReason::Store);
    assert!(bob.decrypt_to_device_event(&event).await.is_ok());
}

#[tokio::test]
async fn plain_event_given_to_the_single_event_api_is_unsupported_algorithm() {
    let (bob, _store, _keys) = bob_with_store().await;
    let plain = json!({"type": "m.dummy", "sender": ALICE, "content": {}}).to_string();
    let error = bob.decrypt_to_device_event(&plain).await.unwrap_err();
    assert_eq!(error.reason(), FailureReason::UnsupportedAlgorithm);
}

#[tokio::test]
async fn oversized_and_deeply_nested_events_are_malformed() {
    let (bob, _store, _keys) = bob_with_store().await;
    let huge = format!(
        r#"{{"type":"m.room.encrypted","sender":"{ALICE}","content":{{"pad":"{}"}}}}"#,
        "a".repeat(300 * 1024)
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for event in [huge, deep] {
        let error = bob.decrypt_to_device_event(&event).await.unwrap_err();
        assert_eq!(error.reason(), FailureReason::MalformedEvent, "{error}");
    }
}

#[tokio::test]
async fn sqlite_state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let open = |key: StoreKey| {
        let path = path.clone();
        async move {
            let store = SqliteStore::open(&path, key, Synchronous::Normal).unwrap();
            OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
                .await
                .unwrap()
        }
    };
    let bob = open(key.clone()).await;
    let keys = publish(&bob, 5).await;
    let identity = bob.identity_keys();
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    bob.receive_keys_query_response(&alice.keys_query_response())
        .await
        .unwrap();
    let to_bob = alice.create_session(&keys, None);
    let first = alice.encrypt(&to_bob, "m.room_key", json!({"seq": 0}));
    bob.decrypt_to_device_event(&first.to_string())
        .await
        .unwrap();
    let reply = bob
        .encrypt(&alice.published_keys(), "m.dummy", &[json!({})])
        .await
        .unwrap();
    alice.decrypt(&reply[0]).unwrap();
    drop(bob);

    let bob = open(key.clone()).await;
    assert_eq!(bob.identity_keys(), identity, "same account");
    // The session, the hash and the known device all survived.
    let normal = alice.encrypt(&to_bob, "m.room_key", json!({"seq": 1}));
    let decrypted = bob
        .decrypt_to_device_event(&normal.to_string())
        .await
        .unwrap();
    assert_eq!(decrypted.sender_device_id.as_deref(), Some("ALICEPHONE"));
    // The first result was never acknowledged: it survived the restart in the outbox.
    let again = bob
        .decrypt_to_device_event(&first.to_string())
        .await
        .unwrap();
    assert!(again.re_emitted);
    assert_eq!(again.content["seq"], 0);
    let pending = pending_result_ids(&bob).await;
    assert_eq!(pending.len(), 2);
    bob.acknowledge(&pending).await.unwrap();
    let error = bob
        .decrypt_to_device_event(&first.to_string())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), FailureReason::ReplayedMessage);
    // The used one-time key stays used.
    let mut carol = SimulatedDevice::new(CAROL, "CAROLDEV");
    let carol_to_bob = carol.create_session(&keys, Some(keys.one_time_keys[0].key));
    let reuse = carol.encrypt(&carol_to_bob, "m.room_key", json!({}));
    let error = bob
        .decrypt_to_device_event(&reuse.to_string())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), FailureReason::UnknownOneTimeKey);
    drop(bob);

    // A wrong key is refused clearly and changes nothing.
    let before = std::fs::read(&path).unwrap();
    let error =
        SqliteStore::open(&path, StoreKey::generate().unwrap(), Synchronous::Normal).unwrap_err();
    assert!(
        matches!(error, to_device_crypto::StoreError::WrongStoreKey),
        "{error}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test]
async fn sqlite_file_never_holds_private_keys_or_plaintexts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let store = SqliteStore::open(&path, StoreKey::generate().unwrap(), Synchronous::Full).unwrap();
    let bob = OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .unwrap();
    let keys = publish(&bob, 3).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(
        &to_bob,
        "m.room_key",
        json!({"secret_marker": "SECRET-ROOM-KEY-MATERIAL"}),
    );
    bob.decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    drop(bob);
    let mut bytes = std::fs::read(&path).unwrap();
    if let Ok(wal) = std::fs::read(dir.path().join("store.sqlite3-wal")) {
        bytes.extend(wal);
    }
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(b"SECRET-ROOM-KEY-MATERIAL"));
    // Pickles are JSON with these field names: none appears in clear.
    assert!(!contains(b"signing_key"));
    assert!(!contains(b"sending_ratchet"));
}

#[tokio::test]
async fn keys_query_devices_with_bad_signatures_are_rejected() {
    let (bob, _store, _keys) = bob_with_store().await;
    let alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let mut body = alice.keys_query_response();
    body["device_keys"][ALICE]["FORGED"] = alice.device_keys();
    let carol = SimulatedDevice::new(CAROL, "CAROLDEV");
    let mut tampered = carol.device_keys();
    tampered["algorithms"] = json!([]);
    body["device_keys"][CAROL] = json!({"CAROLDEV": tampered});
    let outcome = bob.receive_keys_query_response(&body).await.unwrap();
    assert_eq!(outcome.stored, 1);
    assert_eq!(outcome.rejected.len(), 2, "{:?}", outcome.rejected);
    assert!(bob
        .receive_keys_query_response(&json!([1, 2]))
        .await
        .is_err());
}

#[tokio::test]
async fn a_new_device_starts_with_25_one_time_keys_and_tops_them_up_from_the_server_count() {
    let bob = OlmMachine::in_memory(BOB, "BOBPHONE").await.unwrap();
    // No call needed before the first upload (the same over FFI and from the CLI).
    let body = bob.keys_for_upload().await.unwrap();
    assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 25);
    assert_eq!(body["fallback_keys"].as_object().unwrap().len(), 1);
    assert!(body["device_keys"].is_object());
    // The server has none yet, but 25 wait to be uploaded: nothing to generate.
    assert_eq!(bob.receive_one_time_key_count(0, false).await.unwrap(), 0);
    bob.mark_keys_as_published().await.unwrap();
    assert!(
        bob.keys_for_upload().await.is_none(),
        "nothing left to upload"
    );
    // An existing device is not topped up on open, only from the server's count.
    let store = Arc::new(MemoryStore::new());
    let first = OlmMachine::open(BOB, "BOBPHONE", store.clone())
        .await
        .unwrap();
    first.mark_keys_as_published().await.unwrap();
    drop(first);
    let reopened = OlmMachine::open(BOB, "BOBPHONE", store).await.unwrap();
    assert!(reopened.keys_for_upload().await.is_none());
    assert_eq!(
        reopened.receive_one_time_key_count(0, false).await.unwrap(),
        25
    );
    assert_eq!(bob.receive_one_time_key_count(20, true).await.unwrap(), 5);
    let body = bob.keys_for_upload().await.unwrap();
    assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 5);
    assert!(
        body.get("device_keys").is_none(),
        "device keys were published"
    );
}

/// Large batches are parsed and checked against the store in chunks of 256 events: repeats and
/// replays are recognised across chunk boundaries and results keep their batch index.
#[tokio::test]
async fn repeats_and_replays_are_recognised_across_parse_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_sqlite_store(dir.path().join("chunks.sqlite3"));
    let bob = OlmMachine::open(BOB, "BOBDEVICE", Arc::new(store))
        .await
        .unwrap();
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let events: Vec<String> = (0..700)
        .map(|seq| {
            alice
                .encrypt(&to_bob, "m.room_key", json!({"seq": seq}))
                .to_string()
        })
        .collect();

    // First batch: 600 new events, then event 10 again at index 600 (a later chunk).
    let mut first: Vec<&str> = events[..600].iter().map(String::as_str).collect();
    first.push(&events[10]);
    let outcomes = bob.receive_to_device_events(&first).await.unwrap();
    let decrypted = |outcome: &ToDeviceOutcome| match outcome {
        ToDeviceOutcome::Decrypted(event) => event.clone(),
        other => panic!("expected a decrypted event, got {other:?}"),
    };
    assert!((0..600).all(|i| !decrypted(&outcomes[i]).re_emitted));
    assert!(decrypted(&outcomes[600]).re_emitted);
    assert_eq!(decrypted(&outcomes[600]).id, decrypted(&outcomes[10]).id);
    let pending = bob.pending_decrypted_events().await.unwrap();
    assert_eq!(pending.len(), 600);
    assert!(pending
        .iter()
        .enumerate()
        .all(|(i, p)| p.index == i as u64 && p.event.content["seq"] == i));

    // Acknowledge the first 300; the second batch puts new events first, then a pending one and
    // an acknowledged one in its second and third chunks.
    let acknowledged: Vec<String> = pending[..300].iter().map(|p| p.event.id.clone()).collect();
    bob.acknowledge(&acknowledged).await.unwrap();
    let mut second: Vec<&str> = events[600..700].iter().map(String::as_str).collect();
    second.extend(std::iter::repeat_n(events[650].as_str(), 200));
    second.push(&events[450]); // index 300: pending
    second.push(&events[5]); // index 301: acknowledged
    let outcomes = bob.receive_to_device_events(&second).await.unwrap();
    assert!(decrypted(&outcomes[299]).re_emitted);
    let pending_again = decrypted(&outcomes[300]);
    assert!(pending_again.re_emitted);
    assert_eq!(pending_again.content["seq"], 450);
    match &outcomes[301] {
        ToDeviceOutcome::Failed(failed) => {
            assert_eq!(failed.error.reason(), FailureReason::ReplayedMessage)
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// Fields that appear twice are refused where the checks read them (two parsers could pick
/// different copies), arrays are not objects, and a plaintext nests no deeper than an event may:
/// its `content` is stored one level deeper in the outbox and must read back.
#[tokio::test]
async fn repeated_fields_arrays_and_deep_plaintexts_are_refused() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let reason = |outcome: &ToDeviceOutcome| match outcome {
        ToDeviceOutcome::Failed(failed) => Some(failed.error.reason()),
        _ => None,
    };

    let good = alice.encrypt(&to_bob, "m.room_key", json!({})).to_string();
    let repeated_type = good.replacen('{', r#"{"type":"m.dummy","#, 1);
    let our_key = recipient(&bob).curve25519.to_base64();
    let repeated_entry_type = good.replacen(
        &format!(r#""{our_key}":{{"#),
        &format!(r#""{our_key}":{{"type":7,"#),
        1,
    );
    assert_ne!(repeated_entry_type, good);
    let as_array =
        r#"["m.room.encrypted","@alice:example.org",{"algorithm":"m.olm.v1.curve25519-aes-sha2"}]"#;
    let outcomes = bob
        .receive_to_device_events(&[&repeated_type, &repeated_entry_type, as_array])
        .await
        .unwrap();
    assert_eq!(reason(&outcomes[0]), Some(FailureReason::MalformedEvent));
    assert_eq!(
        reason(&outcomes[1]),
        Some(FailureReason::MalformedCiphertext)
    );
    assert_eq!(reason(&outcomes[2]), Some(FailureReason::MalformedEvent));

    let nested = |depth: usize| (0..depth).fold(json!(1), |inner, _| json!({ "x": inner }));
    let too_deep = alice.encrypt(&to_bob, "m.room_key", nested(70)).to_string();
    let deepest = alice.encrypt(&to_bob, "m.room_key", nested(62)).to_string();
    let outcomes = bob
        .receive_to_device_events(&[&too_deep, &deepest, &deepest])
        .await
        .unwrap();
    assert_eq!(reason(&outcomes[0]), Some(FailureReason::JsonError));
    let (ToDeviceOutcome::Decrypted(first), ToDeviceOutcome::Decrypted(again)) =
        (&outcomes[1], &outcomes[2])
    else {
        panic!("the deepest accepted content must decrypt and re-emit: {outcomes:?}");
    };
    assert!(!first.re_emitted && again.re_emitted);
    assert_eq!(again.content, nested(62));
    assert_eq!(bob.pending_decrypted_events().await.unwrap().len(), 1);
}
