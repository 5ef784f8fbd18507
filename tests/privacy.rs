//! Privacy property: random user ids, device ids, keys, contents and error-inducing texts pushed
//! through every failure path never appear in an analytics payload, and every payload validates
//! against the committed JSON Schema.

mod common;

use std::sync::Arc;

use common::*;
use futures::{FutureExt, StreamExt};
use proptest::prelude::*;
use serde_json::{json, Value};
use to_device_crypto::analytics::ReportingPolicy;
use to_device_crypto::simulator::{tamper_with_body, SimulatedDevice};
use to_device_crypto::{MemoryStore, OlmMachine};

#[derive(Debug, Clone)]
struct Secrets {
    user: String,
    device: String,
    content: String,
    forged_sender: String,
    algorithm: String,
    bad_key: String,
}

fn secrets() -> impl Strategy<Value = Secrets> {
    (
        "[a-z]{6,12}",
        "[a-z]{5,10}",
        "[A-Z]{8,12}",
        "[A-Za-z0-9]{10,30}",
        "[a-z]{6,12}",
        "[a-z]{8,14}\\.[a-z]{4,8}",
        "[A-Za-z0-9]{12,20}",
    )
        .prop_map(
            |(local, server, device, content, forged, algorithm, bad_key)| Secrets {
                user: format!("@{local}:{server}.org"),
                device,
                content,
                forged_sender: format!("@{forged}:{server}.net"),
                algorithm,
                bad_key,
            },
        )
}

/// Every failure path, with the secrets in every field an attacker or a bug could fill.
async fn payloads_for(secrets: &Secrets) -> (Vec<String>, Vec<String>) {
    let store = Arc::new(MemoryStore::new());
    let bob =
        OlmMachine::open_with_policy(BOB, "BOBPHONE", store, ReportingPolicy::every_message())
            .await
            .unwrap();
    let keys = publish(&bob, 6).await;
    let to_bob = recipient(&bob);
    let mut failures = bob.to_device_decryption_failure_stream();
    let mut peer = SimulatedDevice::new(&secrets.user, &secrets.device);
    peer.create_session(&keys, Some(keys.one_time_keys[0].key));
    let content = json!({"secret": secrets.content});
    let good = peer.encrypt(&to_bob, "m.room_key", content.clone());

    let mut events: Vec<Value> = Vec::new();
    events.push(json!(format!("{} {}", secrets.user, secrets.content)));
    let mut algorithm = good.clone();
    algorithm["content"]["algorithm"] = json!(secrets.algorithm);
    events.push(algorithm);
    let mut sender_key = good.clone();
    sender_key["content"]["sender_key"] = json!(secrets.bad_key);
    events.push(sender_key);
    let mut other_device = good.clone();
    let map = other_device["content"]["ciphertext"]
        .as_object_mut()
        .unwrap();
    let entry = map.values().next().unwrap().clone();
    map.clear();
    map.insert(secrets.bad_key.clone(), entry);
    events.push(other_device);
    let mut body = good.clone();
    body["content"]["ciphertext"][to_bob.curve25519.to_base64()]["body"] =
        json!(format!("!{}!", secrets.content));
    events.push(body);
    events.push(good.clone());
    events.push(good.clone()); // replay
    events.push(tamper_with_body(peer.encrypt(
        &to_bob,
        "m.room_key",
        content.clone(),
    )));
    let mut plaintexts = Vec::new();
    for (field, value) in [
        ("sender", json!(secrets.forged_sender)),
        ("recipient", json!(secrets.forged_sender)),
        ("recipient_keys", json!({"ed25519": secrets.bad_key})),
        ("keys", json!({"ed25519": secrets.bad_key})),
        ("type", json!(secrets.algorithm)),
    ] {
        let mut plaintext = peer.plaintext(&to_bob, "m.room_key", content.clone(), field != "type");
        plaintext[field] = value;
        plaintexts.push(plaintext.to_string());
    }
    let mut bad_device_keys = peer.plaintext(&to_bob, "m.room_key", content.clone(), true);
    bad_device_keys["sender_device_keys"]["user_id"] = json!(secrets.forged_sender);
    plaintexts.push(bad_device_keys.to_string());
    plaintexts.push(format!("{} {}", secrets.user, secrets.content));
    for plaintext in plaintexts {
        events.push(peer.encrypt_raw(&to_bob, plaintext.as_bytes()));
    }
    let mut reused = SimulatedDevice::new(&secrets.forged_sender, &secrets.device);
    reused.create_session(&keys, Some(keys.one_time_keys[0].key));
    events.push(reused.encrypt(&to_bob, "m.room_key", content.clone()));

    let raw: Vec<String> = events
        .iter()
        .map(|e| {
            e.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string())
        })
        .collect();
    bob.receive_to_device_events(&raw).await.unwrap();
    let mut payloads = Vec::new();
    let mut names = Vec::new();
    while let Some(Some(item)) = failures.next().now_or_never() {
        let item = item.unwrap();
        names.push(item.reason.as_str().to_owned());
        payloads.push(
            item.payload()
                .expect("every distinct failure is reported")
                .to_json(),
        );
    }
    (payloads, names)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn no_payload_carries_an_identifier_key_content_or_error_text(secrets in secrets()) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (payloads, names) = runtime.block_on(payloads_for(&secrets));
        // Enough paths are exercised for the property to mean something.
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        prop_assert!(distinct.len() >= 12, "only {:?}", distinct);
        let validator = payload_validator();
        for payload in &payloads {
            assert_schema_valid(&validator, payload);
            for secret in [&secrets.user, &secrets.device, &secrets.content, &secrets.forged_sender, &secrets.algorithm, &secrets.bad_key] {
                prop_assert!(!payload.contains(secret.as_str()), "{} leaks {}", payload, secret);
            }
            let local = secrets.user.trim_start_matches('@').split(':').next().unwrap();
            prop_assert!(!payload.contains(local));
        }
    }
}
