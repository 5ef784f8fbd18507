//! The fixture table: real Olm traffic for every classification rule, each with the one failure
//! name it must produce (literal strings on purpose: they are the public analytics contract).

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use to_device_crypto::simulator::{tamper_with_body, Recipient, SimulatedDevice};
use to_device_crypto::{FailureReason, OlmMachine, ToDeviceOutcome};

fn with_ciphertext(mut event: Value, change: impl FnOnce(&mut Value)) -> Value {
    let entry = event["content"]["ciphertext"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    change(entry);
    event
}

struct Fixture {
    label: &'static str,
    event: Value,
    expected: &'static str,
}

/// Builds the whole table against one Bob. Fixtures run in order, so later ones may rely on
/// earlier ones (the replay needs the original delivered first).
async fn fixture_table(
    bob: &OlmMachine,
    keys: &to_device_crypto::olm::device_keys::PublishedKeys,
) -> Vec<Fixture> {
    let mut table = Vec::new();
    let mut push = |label, event: Value, expected| {
        table.push(Fixture {
            label,
            event,
            expected,
        })
    };

    // Alice: known from /keys/query; her first message creates a session.
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    bob.receive_keys_query_response(&alice.keys_query_response())
        .await
        .unwrap();
    let to_bob = alice.create_session(keys, Some(keys.one_time_keys[0].key));
    let good = alice.encrypt(&to_bob, "m.room_key", json!({"session_id": "s1"}));

    push(
        "not a JSON object",
        json!(["m.room.encrypted"]),
        "ToDeviceFailedToDecrypt_MalformedEvent",
    );
    let mut no_content = good.clone();
    no_content.as_object_mut().unwrap().remove("content");
    push(
        "no content",
        no_content,
        "ToDeviceFailedToDecrypt_MalformedEvent",
    );
    let mut sender_number = good.clone();
    sender_number["sender"] = json!(42);
    push(
        "sender is a number",
        sender_number,
        "ToDeviceFailedToDecrypt_MalformedEvent",
    );
    let mut megolm = good.clone();
    megolm["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
    push(
        "megolm algorithm",
        megolm,
        "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
    );
    let mut no_algorithm = good.clone();
    no_algorithm["content"]
        .as_object_mut()
        .unwrap()
        .remove("algorithm");
    push(
        "no algorithm",
        no_algorithm,
        "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
    );
    let mut no_sender_key = good.clone();
    no_sender_key["content"]
        .as_object_mut()
        .unwrap()
        .remove("sender_key");
    push(
        "no sender_key",
        no_sender_key,
        "ToDeviceFailedToDecrypt_MissingSenderKey",
    );
    let mut bad_sender_key = good.clone();
    bad_sender_key["content"]["sender_key"] = json!("not-a-key");
    push(
        "invalid sender_key",
        bad_sender_key,
        "ToDeviceFailedToDecrypt_MissingSenderKey",
    );
    let mut ciphertext_string = good.clone();
    ciphertext_string["content"]["ciphertext"] = json!("abc");
    push(
        "ciphertext not an object",
        ciphertext_string,
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "body not base64",
        with_ciphertext(good.clone(), |e| e["body"] = json!("!!not base64!!")),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "message type 2",
        with_ciphertext(good.clone(), |e| e["type"] = json!(2)),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "our entry not an object",
        with_ciphertext(good.clone(), |e| *e = json!(["type", 1])),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "message type as a string",
        with_ciphertext(good.clone(), |e| e["type"] = json!("1")),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "message type 257 (wraps to 1 as a byte)",
        with_ciphertext(good.clone(), |e| e["type"] = json!(257)),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "no body",
        with_ciphertext(good.clone(), |e| {
            e.as_object_mut().unwrap().remove("body");
        }),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );
    push(
        "undecodable Olm message",
        with_ciphertext(good.clone(), |e| e["body"] = json!("AAAA")),
        "ToDeviceFailedToDecrypt_MalformedCiphertext",
    );

    // Ciphertext for another device of Bob's.
    let bob_laptop = OlmMachine::in_memory(BOB, "BOBLAPTOP").await.unwrap();
    let laptop_keys = publish(&bob_laptop, 1).await;
    let mut alice2 = SimulatedDevice::new(ALICE, "ALICETABLET");
    let to_laptop = alice2.create_session(&laptop_keys, None);
    push(
        "for another device",
        alice2.encrypt(&to_laptop, "m.dummy", json!({})),
        "ToDeviceFailedToDecrypt_MissingCiphertext",
    );

    // The intact pre-key message, then its replay.
    push("first pre-key message", good.clone(), "decrypted");
    push(
        "replayed pre-key message",
        good.clone(),
        "ToDeviceFailedToDecrypt_ReplayedMessage",
    );
    // A tampered pre-key message on the now existing session.
    let second_pre_key = alice.encrypt(&to_bob, "m.dummy", json!({}));
    push(
        "tampered pre-key, existing session",
        tamper_with_body(second_pre_key),
        "ToDeviceFailedToDecrypt_SessionWedged",
    );

    // Carol is handed the one-time key Alice already used.
    let mut carol = SimulatedDevice::new(CAROL, "CAROLDEV");
    let carol_to_bob = carol.create_session(keys, Some(keys.one_time_keys[0].key));
    push(
        "one-time key already used",
        carol.encrypt(&carol_to_bob, "m.dummy", json!({})),
        "ToDeviceFailedToDecrypt_UnknownOneTimeKey",
    );
    // A one-time key Bob never had.
    let mut dave = SimulatedDevice::new("@dave:example.org", "DAVEDEV");
    let dave_to_bob =
        dave.create_session(keys, Some(SimulatedDevice::new(BOB, "X").curve25519_key()));
    push(
        "one-time key never ours",
        dave.encrypt(&dave_to_bob, "m.dummy", json!({})),
        "ToDeviceFailedToDecrypt_UnknownOneTimeKey",
    );

    // Eve re-wraps a fresh pre-key message of Erin's under her own sender key.
    let mut erin = SimulatedDevice::new("@erin:example.org", "ERINDEV");
    let erin_to_bob = erin.create_session(keys, Some(keys.one_time_keys[1].key));
    let mut rewrapped = erin.encrypt(&erin_to_bob, "m.dummy", json!({}));
    rewrapped["content"]["sender_key"] = json!(SimulatedDevice::new("@eve:example.org", "EVE")
        .curve25519_key()
        .to_base64());
    push(
        "pre-key under another sender key",
        rewrapped,
        "ToDeviceFailedToDecrypt_SessionCreation",
    );

    // Normal message from a sender Bob has no session with: Frank's session lives on Bob's laptop,
    // and Frank's message is addressed to this phone's key.
    let (mut frank, _) = established_peer(
        &bob_laptop,
        &laptop_keys_with_more(&bob_laptop).await,
        "@frank:example.org",
        "FRANKDEV",
        0,
    )
    .await;
    let frank_to_phone = Recipient {
        curve25519: bob.identity_keys().curve25519,
        ..recipient(bob)
    };
    let normal = retarget(
        frank.encrypt(&recipient(&bob_laptop), "m.dummy", json!({})),
        &recipient(&bob_laptop),
        &frank_to_phone,
    );
    push(
        "normal message, no session",
        normal,
        "ToDeviceFailedToDecrypt_MissingSession",
    );

    // Plaintext checks, with sessions from fresh one-time keys.
    let mut gina = SimulatedDevice::new("@gina:example.org", "GINADEV");
    let gina_to_bob = gina.create_session(keys, Some(keys.one_time_keys[2].key));
    push(
        "plaintext not JSON",
        gina.encrypt_raw(&gina_to_bob, b"not json"),
        "ToDeviceFailedToDecrypt_JsonError",
    );
    let mut missing_keys = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    missing_keys
        .as_object_mut()
        .unwrap()
        .remove("recipient_keys");
    push(
        "plaintext lacks recipient_keys",
        gina.encrypt_raw(&gina_to_bob, missing_keys.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_JsonError",
    );
    let mut wrong_sender = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    wrong_sender["sender"] = json!("@mallory:example.org");
    push(
        "plaintext sender differs",
        gina.encrypt_raw(&gina_to_bob, wrong_sender.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MismatchedSender",
    );
    let mut wrong_recipient = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    wrong_recipient["recipient"] = json!("@someone-else:example.org");
    push(
        "plaintext recipient differs",
        gina.encrypt_raw(&gina_to_bob, wrong_recipient.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MismatchedRecipient",
    );
    let mut wrong_recipient_key = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    wrong_recipient_key["recipient_keys"]["ed25519"] =
        json!(bob_laptop.identity_keys().ed25519.to_base64());
    push(
        "recipient_keys of another device",
        gina.encrypt_raw(&gina_to_bob, wrong_recipient_key.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MismatchedKeys",
    );
    let mut forged_signing_key = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), false);
    forged_signing_key["keys"]["ed25519"] = json!(alice.ed25519_key().to_base64());
    push(
        "keys.ed25519 of another device, no sender_device_keys, unknown device",
        gina.encrypt_raw(&gina_to_bob, forged_signing_key.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MissingSigningKey",
    );
    let no_device_keys = gina.plaintext(&gina_to_bob, "m.secret.send", json!({}), false);
    push(
        "unknown device, no sender_device_keys, not a room key",
        gina.encrypt_raw(&gina_to_bob, no_device_keys.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MissingSigningKey",
    );
    let room_key_unverified = gina.plaintext(&gina_to_bob, "m.room_key", json!({}), false);
    push(
        "unknown device, m.room_key accepted unverified",
        gina.encrypt_raw(&gina_to_bob, room_key_unverified.to_string().as_bytes()),
        "decrypted",
    );
    let mut bad_signature = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    bad_signature["sender_device_keys"]["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
    push(
        "sender_device_keys signature broken",
        gina.encrypt_raw(&gina_to_bob, bad_signature.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_InvalidSenderDeviceKeys",
    );
    let mut other_users_keys = gina.plaintext(&gina_to_bob, "m.dummy", json!({}), true);
    other_users_keys["sender_device_keys"] = alice.device_keys();
    push(
        "sender_device_keys of another user",
        gina.encrypt_raw(&gina_to_bob, other_users_keys.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_InvalidSenderDeviceKeys",
    );
    push(
        "valid sender_device_keys",
        gina.encrypt(&gina_to_bob, "m.dummy", json!({"ok": true})),
        "decrypted",
    );

    // Alice is known from /keys/query: keys.ed25519 must be hers, sender_device_keys must agree.
    let mut alice_forged = alice.plaintext(&to_bob, "m.dummy", json!({}), false);
    alice_forged["keys"]["ed25519"] = json!(gina.ed25519_key().to_base64());
    push(
        "keys.ed25519 differs from /keys/query",
        alice.encrypt_raw(&to_bob, alice_forged.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_MismatchedKeys",
    );
    let impostor = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let mut contradicting = alice.plaintext(&to_bob, "m.dummy", json!({}), false);
    contradicting["sender_device_keys"] = impostor.device_keys();
    push(
        "sender_device_keys contradict /keys/query",
        alice.encrypt_raw(&to_bob, contradicting.to_string().as_bytes()),
        "ToDeviceFailedToDecrypt_InvalidSenderDeviceKeys",
    );
    table
}

async fn laptop_keys_with_more(
    laptop: &OlmMachine,
) -> to_device_crypto::olm::device_keys::PublishedKeys {
    publish(laptop, 2).await
}

/// Re-addresses an event's only ciphertext entry from `from` to `to`.
fn retarget(mut event: Value, from: &Recipient, to: &Recipient) -> Value {
    let map = event["content"]["ciphertext"].as_object_mut().unwrap();
    let entry = map.remove(&from.curve25519.to_base64()).unwrap();
    map.insert(to.curve25519.to_base64(), entry);
    event
}

#[tokio::test]
async fn fixture_table_classifies_every_rule() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut failures = bob.to_device_decryption_failure_stream();
    let validator = payload_validator();
    let table = fixture_table(&bob, &keys).await;
    let mut expected_failures = Vec::new();
    for fixture in &table {
        let outcome = bob
            .receive_to_device_events(&[fixture.event.to_string()])
            .await
            .unwrap();
        let got = match &outcome[0] {
            ToDeviceOutcome::Decrypted(event) => {
                // The app handled it: acknowledged results make a re-delivery a replay.
                bob.acknowledge(std::slice::from_ref(&event.id))
                    .await
                    .unwrap();
                "decrypted".to_owned()
            }
            ToDeviceOutcome::Plaintext(_) => "plaintext".to_owned(),
            ToDeviceOutcome::Failed(failed) => failed.error.reason().analytics_name().to_owned(),
        };
        assert_eq!(got, fixture.expected, "fixture {:?}", fixture.label);
        if fixture.expected != "decrypted" {
            expected_failures.push(fixture.expected);
        }
    }
    // Exactly one stream item per failed event, in order, each with a schema-valid payload.
    for expected in expected_failures {
        let item = failures.next().await.unwrap().unwrap();
        let payload = item.payload().expect("every distinct failure is reported");
        assert_eq!(payload.reason().analytics_name(), expected);
        let payload = payload.to_json();
        assert_schema_valid(&validator, &payload);
        // Privacy: nothing from the diagnostics (ids, keys, error text) reaches the payload.
        let identifiers = [&item.diagnostics.sender, &item.diagnostics.sender_key];
        for identifier in identifiers.into_iter().flatten() {
            assert!(
                !payload.contains(identifier.as_str()),
                "{payload} leaks {identifier}"
            );
        }
        assert!(
            !payload.contains(&item.diagnostics.error),
            "{payload} leaks the error text"
        );
        for leak in [
            BOB,
            ALICE,
            CAROL,
            "example.org",
            &bob.identity_keys().curve25519.to_base64(),
        ] {
            assert!(!payload.contains(leak), "{payload} leaks {leak}");
        }
    }
    // Every reason except Store is covered by the table.
    let covered: std::collections::HashSet<&str> = table.iter().map(|f| f.expected).collect();
    for reason in FailureReason::ALL {
        if reason != FailureReason::Store {
            assert!(
                covered.contains(reason.analytics_name()),
                "{reason} not covered"
            );
        }
    }
}

#[tokio::test]
async fn a_batch_reports_each_event_in_order_and_passes_plain_events_through() {
    let (bob, _store, keys) = bob_with_store().await;
    let mut failures = bob.to_device_decryption_failure_stream();
    let table = fixture_table(&bob, &keys).await;
    let mut events: Vec<String> = table.iter().map(|f| f.event.to_string()).collect();
    events.insert(
        3,
        json!({"type": "m.key.verification.request", "sender": ALICE, "content": {"x": 1}})
            .to_string(),
    );
    let outcomes = bob.receive_to_device_events(&events).await.unwrap();
    assert_eq!(outcomes.len(), events.len());
    assert!(matches!(&outcomes[3], ToDeviceOutcome::Plaintext(v) if v["content"]["x"] == 1));
    let mut failed_indices = Vec::new();
    for (index, outcome) in outcomes.iter().enumerate() {
        if let ToDeviceOutcome::Failed(_) = outcome {
            failed_indices.push(index);
        }
    }
    for index in failed_indices {
        let item = failures.next().await.unwrap().unwrap();
        assert_eq!(item.diagnostics.index, index);
    }
}
