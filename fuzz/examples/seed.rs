//! Writes the fuzz seeds: real to-device events (pre-key, normal, crafted failures) for a recorded
//! machine, `/keys/query` and `/keys/upload` bodies, and `/sync`-shaped CLI inputs.
//!
//! `cargo run --example seed -- [OUT_DIR]` (default `fuzz/seeds`). OUT_DIR/state.json is the
//! recorded machine the `decrypt` target is built with: regenerating it invalidates old `decrypt`
//! corpora (they were encrypted for the previous machine's keys).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::parse_keys_upload_body;
use to_device_crypto::olm::envelope::MessageHash;
use to_device_crypto::simulator::{recipient_of, tamper_with_body, SimulatedDevice};
use to_device_crypto::{CryptoStore, MemoryStore, OlmMachine};
use vodozemac::Curve25519PublicKey;

const BOB: &str = "@bob:example.org";

fn hash_of(event: &Value) -> String {
    let content = &event["content"];
    let sender_key =
        Curve25519PublicKey::from_base64(content["sender_key"].as_str().unwrap()).unwrap();
    let entry = content["ciphertext"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    let message_type = u8::try_from(entry["type"].as_u64().unwrap()).unwrap();
    let body = vodozemac::base64_decode(entry["body"].as_str().unwrap()).unwrap();
    let message = vodozemac::olm::OlmMessage::from_parts(message_type.into(), &body).unwrap();
    MessageHash::replay_key(&sender_key, &message, &body).to_hex()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/seeds").to_owned()),
    );
    let store = Arc::new(MemoryStore::new());
    let bob = OlmMachine::open(BOB, "BOBFUZZ", store.clone())
        .await
        .unwrap();
    bob.generate_one_time_keys(20).await.unwrap();
    let upload = bob.keys_for_upload().await.unwrap();
    bob.mark_keys_as_published().await.unwrap();
    let keys = parse_keys_upload_body(&upload).unwrap();
    let otk = |i: usize| Some(keys.one_time_keys[i].key);
    let fallback = keys
        .one_time_keys
        .iter()
        .find(|k| k.fallback)
        .map(|k| k.key)
        .expect("a fallback key");
    let to_bob = recipient_of(&bob);

    // Alice is known from /keys/query; Alice and Carol have sessions whose messages are normal.
    let mut alice = SimulatedDevice::new("@alice:example.org", "ALICEPHONE");
    let mut carol = SimulatedDevice::new("@carol:example.net", "CAROLDEV");
    let keys_query = json!({"device_keys": {
        "@alice:example.org": {"ALICEPHONE": alice.device_keys()},
        "@carol:example.net": {"CAROLDEV": carol.device_keys()},
    }});
    bob.receive_keys_query_response(&alice.keys_query_response())
        .await
        .unwrap();
    let mut hashes = Vec::new();
    let mut first_messages = Vec::new();
    for (peer, index) in [(&mut alice, 0), (&mut carol, 1)] {
        peer.create_session(&keys, otk(index));
        let first = peer.encrypt(&to_bob, "m.dummy", json!({}));
        bob.decrypt_to_device_event(&first.to_string())
            .await
            .unwrap();
        hashes.push(hash_of(&first));
        let reply = bob
            .encrypt(&peer.published_keys(), "m.dummy", &[json!({})])
            .await
            .unwrap();
        peer.decrypt(&reply[0]).expect("the reply decrypts");
        first_messages.push(first);
    }

    // Record the machine now: everything below is new to it.
    let account = store.load_account().await.unwrap().unwrap();
    let mut sessions = Vec::new();
    for peer in [&alice, &carol] {
        for s in store
            .load_sessions(&peer.curve25519_key().to_base64())
            .await
            .unwrap()
        {
            sessions.push(
                json!({"sender_key": s.sender_key, "session_id": s.session_id,
                                 "pickle": s.pickle, "last_used": s.last_used}),
            );
        }
    }
    let devices: Vec<Value> = store
        .load_devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| json!({"user_id": d.user_id, "device_id": d.device_id, "json": d.json}))
        .collect();

    let mut events: Vec<(&str, Value)> = Vec::new();
    events.push((
        "alice-normal-room-key",
        alice.encrypt(
            &to_bob,
            "m.room_key",
            json!({"session_id": "s1", "room_id": "!r:example.org"}),
        ),
    ));
    events.push((
        "alice-normal-dummy",
        alice.encrypt(&to_bob, "m.dummy", json!({})),
    ));
    events.push((
        "carol-normal-secret",
        carol.encrypt(&to_bob, "m.secret.send", json!({"secret": "x"})),
    ));
    events.push((
        "alice-tampered",
        tamper_with_body(alice.encrypt(&to_bob, "m.dummy", json!({}))),
    ));
    events.push(("alice-replayed-pre-key", first_messages[0].clone()));
    let mut dave = SimulatedDevice::new("@dave:example.org", "DAVEDEV");
    dave.create_session(&keys, otk(2));
    events.push((
        "dave-pre-key",
        dave.encrypt(&to_bob, "m.room_key", json!({"session_id": "s2"})),
    ));
    events.push((
        "dave-pre-key-2",
        dave.encrypt(&to_bob, "m.dummy", json!({})),
    ));
    let mut erin = SimulatedDevice::new("@erin:example.org", "ERINDEV");
    erin.create_session(&keys, Some(fallback));
    events.push((
        "erin-pre-key-fallback",
        erin.encrypt(&to_bob, "m.dummy", json!({})),
    ));
    let mut frank = SimulatedDevice::new("@frank:example.org", "FRANKDEV");
    frank.create_session(&keys, otk(0)); // Alice already used it.
    events.push((
        "frank-used-one-time-key",
        frank.encrypt(&to_bob, "m.dummy", json!({})),
    ));
    let mut rewrapped = {
        let mut eve = SimulatedDevice::new("@eve:example.org", "EVEDEV");
        eve.create_session(&keys, otk(3));
        eve.encrypt(&to_bob, "m.dummy", json!({}))
    };
    rewrapped["content"]["sender_key"] = json!(frank.curve25519_key().to_base64());
    events.push(("pre-key-under-another-sender-key", rewrapped));

    // Crafted plaintexts under real Olm (Gina, one-time key 4).
    let mut gina = SimulatedDevice::new("@gina:example.org", "GINADEV");
    gina.create_session(&keys, otk(4));
    let base = |g: &SimulatedDevice, t: &str, sdk: bool| g.plaintext(&to_bob, t, json!({}), sdk);
    let mut crafted: Vec<(&str, Vec<u8>)> = vec![("plaintext-not-json", b"not json".to_vec())];
    let mut p = base(&gina, "m.dummy", true);
    p.as_object_mut().unwrap().remove("recipient_keys");
    crafted.push(("plaintext-no-recipient-keys", p.to_string().into_bytes()));
    let mut p = base(&gina, "m.dummy", true);
    p["sender"] = json!("@mallory:example.org");
    crafted.push(("plaintext-wrong-sender", p.to_string().into_bytes()));
    let mut p = base(&gina, "m.dummy", true);
    p["recipient"] = json!("@someone:example.org");
    crafted.push(("plaintext-wrong-recipient", p.to_string().into_bytes()));
    let mut p = base(&gina, "m.dummy", true);
    p["recipient_keys"]["ed25519"] = json!(alice.ed25519_key().to_base64());
    crafted.push(("plaintext-wrong-recipient-key", p.to_string().into_bytes()));
    let mut p = base(&gina, "m.dummy", false);
    p["keys"]["ed25519"] = json!(alice.ed25519_key().to_base64());
    crafted.push(("plaintext-forged-signing-key", p.to_string().into_bytes()));
    crafted.push((
        "plaintext-unverified-room-key",
        base(&gina, "m.room_key", false).to_string().into_bytes(),
    ));
    let mut p = base(&gina, "m.dummy", true);
    p["sender_device_keys"]["algorithms"] = json!([]);
    crafted.push((
        "plaintext-broken-device-keys-signature",
        p.to_string().into_bytes(),
    ));
    let mut p = base(&gina, "m.dummy", true);
    p["sender_device_keys"] = alice.device_keys();
    crafted.push((
        "plaintext-other-users-device-keys",
        p.to_string().into_bytes(),
    ));
    let mut p = base(&gina, "m.dummy", true);
    p["content"] = json!("not an object");
    crafted.push(("plaintext-content-not-object", p.to_string().into_bytes()));
    crafted.push((
        "plaintext-valid",
        base(&gina, "m.dummy", true).to_string().into_bytes(),
    ));
    for (label, plaintext) in crafted {
        events.push((label, gina.encrypt_raw(&to_bob, &plaintext)));
    }
    let mut p = alice.plaintext(&to_bob, "m.dummy", json!({}), false);
    p["keys"]["ed25519"] = json!(gina.ed25519_key().to_base64());
    events.push((
        "alice-keys-differ-from-keys-query",
        alice.encrypt_raw(&to_bob, p.to_string().as_bytes()),
    ));

    // Envelope-level failures and a plain event.
    let good = alice.encrypt(&to_bob, "m.dummy", json!({}));
    let mut other_device = good.clone();
    let entry = other_device["content"]["ciphertext"]
        .as_object_mut()
        .unwrap();
    let value = entry.remove(&to_bob.curve25519.to_base64()).unwrap();
    entry.insert(gina.curve25519_key().to_base64(), value);
    events.push(("for-another-device", other_device));
    let mut megolm = good.clone();
    megolm["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
    events.push(("megolm-algorithm", megolm));
    events.push(("plain-event", json!({"type": "m.key.verification.request", "sender": "@alice:example.org", "content": {"x": 1}})));

    let decrypt_dir = out.join("decrypt");
    let _ = std::fs::remove_dir_all(&decrypt_dir);
    for (i, (label, event)) in events.iter().enumerate() {
        write(
            &decrypt_dir,
            &format!("{i:02}-{label}.json"),
            &event.to_string(),
        );
    }
    let state = json!({
        "user_id": BOB, "device_id": "BOBFUZZ", "account_pickle": account.pickle,
        "sessions": sessions, "devices": devices, "message_hashes": hashes,
        "templates": events.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
    });
    write(
        &out,
        "state.json",
        &serde_json::to_string_pretty(&state).unwrap(),
    );

    // /keys/query and /keys/upload bodies.
    let kq = out.join("keys_query");
    write(&kq, "two-users.json", &keys_query.to_string());
    let mut bad = keys_query.clone();
    bad["device_keys"]["@alice:example.org"]["ALICEPHONE"]["keys"]["ed25519:ALICEPHONE"] =
        json!(carol.ed25519_key().to_base64());
    bad["device_keys"]["@carol:example.net"]["OTHERID"] = carol.device_keys();
    write(
        &kq,
        "bad-signature-and-mismatched-id.json",
        &bad.to_string(),
    );
    write(
        &kq,
        "with-failures.json",
        &json!({"device_keys": {"@x:y": {"D": alice.device_keys()}}, "failures": {"y": {}}})
            .to_string(),
    );
    let ku = out.join("keys_upload");
    write(&ku, "machine.json", &upload.to_string());
    write(
        &ku,
        "simulated.json",
        &SimulatedDevice::new("@hank:example.org", "HANK")
            .publish_keys(3)
            .to_string(),
    );
    write(
        &ku,
        "device-keys-only.json",
        &json!({"device_keys": bob.device_keys().await}).to_string(),
    );

    // CLI inputs: a /sync response, an array, JSON lines, a single event.
    let si = out.join("sync_input");
    let few: Vec<Value> = events.iter().take(3).map(|(_, e)| e.clone()).collect();
    write(
        &si,
        "sync.json",
        &json!({"next_batch": "s72594_4483_1934", "to_device": {"events": few}}).to_string(),
    );
    write(&si, "array.json", &Value::Array(few.clone()).to_string());
    write(
        &si,
        "lines.jsonl",
        &format!("{}\nnot json\n{}\n", few[0], few[1]),
    );
    write(&si, "single.json", &few[2].to_string());
    eprintln!(
        "wrote {} decrypt seeds and the recorded machine to {}",
        events.len(),
        out.display()
    );
}
