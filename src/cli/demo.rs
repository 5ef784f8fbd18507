//! `demo`: Bob's phone receives three `/sync` batches of to-device traffic from seven devices —
//! room keys after login, a server that redelivers and double-hands a one-time key, a backup
//! restore, a wedged session, old and hostile clients — and reports every failure.
//!
//! Every event is real Olm traffic made with vodozemac; failures come from the same checks that
//! run in production. stdout: the PostHog events, one per line. stderr: a summary.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, SimulatedDevice};
use to_device_crypto::{FailureStream, MemoryStore, OlmMachine, ToDeviceOutcome};

const BOB: &str = "@bob:example.org";

struct Tally {
    /// Per name: (failures, PostHog events after the reporting policy).
    failures: BTreeMap<&'static str, (usize, usize)>,
    decrypted: usize,
    plaintext: usize,
}

struct Bob {
    machine: OlmMachine,
    store: Arc<MemoryStore>,
    failures: FailureStream,
}

impl Bob {
    async fn open(store: Arc<MemoryStore>) -> Result<Self, String> {
        let machine = OlmMachine::open(BOB, "BOBPHONE", store.clone())
            .await
            .map_err(|e| e.to_string())?;
        let failures = machine.to_device_decryption_failure_stream();
        Ok(Self {
            machine,
            store,
            failures,
        })
    }

    /// Feeds one `/sync` batch, prints the PostHog events it produced and tallies the outcomes.
    async fn sync(
        &mut self,
        label: &str,
        events: Vec<Value>,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let raw: Vec<String> = events.iter().map(Value::to_string).collect();
        let outcomes = self
            .machine
            .receive_to_device_events(&raw)
            .await
            .map_err(|e| e.to_string())?;
        let mut failed = 0;
        let mut handled = Vec::new();
        for outcome in &outcomes {
            match outcome {
                ToDeviceOutcome::Decrypted(event) => {
                    tally.decrypted += 1;
                    handled.push(event.id.clone());
                }
                ToDeviceOutcome::Plaintext(_) => tally.plaintext += 1,
                ToDeviceOutcome::Failed(_) => failed += 1,
            }
        }
        for _ in 0..failed {
            let item = self
                .failures
                .next()
                .now_or_never()
                .flatten()
                .ok_or("a failure was not published")?
                .map_err(|e| e.to_string())?;
            let counts = tally
                .failures
                .entry(item.reason.analytics_name())
                .or_default();
            counts.0 += 1;
            if let Some(payload) = item.payload() {
                println!("{}", payload.to_json());
                counts.1 += 1;
            }
        }
        // The app has handled the decrypted events: acknowledge them so that a redelivery is a
        // replay rather than a re-emission.
        self.machine
            .acknowledge(&handled)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("{label}: {} events, {} failed", outcomes.len(), failed);
        Ok(())
    }

    async fn reply_to(&self, peer: &mut SimulatedDevice) -> Result<(), String> {
        let reply = self
            .machine
            .encrypt(&peer.published_keys(), "m.dummy", &[json!({})])
            .await
            .map_err(|e| e.to_string())?;
        peer.decrypt(&reply[0])
            .ok_or("the peer could not decrypt Bob's reply")?;
        Ok(())
    }
}

fn room_key(seq: usize) -> Value {
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": "!project:example.org",
        "session_id": format!("megolm-session-{seq}"),
        "session_key": "AgAAAADemoSessionKeyNotARealKey".repeat(8),
    })
}

fn our_entry(event: &mut Value) -> &mut Value {
    event["content"]["ciphertext"]
        .as_object_mut()
        .and_then(|map| map.values_mut().next())
        .expect("a ciphertext entry")
}

pub async fn run() -> Result<(), String> {
    let mut tally = Tally {
        failures: BTreeMap::new(),
        decrypted: 0,
        plaintext: 0,
    };
    let mut bob = Bob::open(Arc::new(MemoryStore::new())).await?;
    let keys = publish_machine_keys(&bob.machine, 40).await?;
    let otk = |i: usize| Some(keys.one_time_keys[i].key);
    let to_bob = recipient_of(&bob.machine);

    let mut alice = SimulatedDevice::new("@alice:example.org", "ALICEPHONE");
    let mut carol = SimulatedDevice::new("@carol:example.net", "CAROLLAPTOP");
    let mut gina = SimulatedDevice::new("@gina:oldserver.org", "GINALEGACY");
    let mut harry = SimulatedDevice::new("@harry:example.org", "HARRYTABLET");
    bob.machine
        .receive_keys_query_response(&alice.keys_query_response())
        .await
        .map_err(|e| e.to_string())?;

    // Batch 1, right after login: room keys from Alice (known device) and Carol (unknown, but
    // she sends sender_device_keys), an old client without sender_device_keys, a plain event.
    alice.create_session(&keys, otk(0));
    carol.create_session(&keys, otk(1));
    gina.create_session(&keys, otk(2));
    let mut batch = Vec::new();
    for seq in 0..30 {
        batch.push(alice.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    for seq in 30..50 {
        batch.push(carol.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    for seq in 50..55 {
        let plaintext = gina.plaintext(&to_bob, "m.room_key", room_key(seq), false);
        batch.push(gina.encrypt_raw(&to_bob, plaintext.to_string().as_bytes()));
    }
    let secret = gina.plaintext(&to_bob, "m.secret.send", json!({"request_id": "r1"}), false);
    batch.push(gina.encrypt_raw(&to_bob, secret.to_string().as_bytes()));
    batch.push(
        json!({"type": "m.key.verification.request", "sender": "@alice:example.org",
                      "content": {"from_device": "ALICEPHONE", "methods": ["m.sas.v1"]}}),
    );
    let first_alice_event = batch[0].clone();
    bob.sync("sync 1 (after login)", batch, &mut tally).await?;
    bob.reply_to(&mut alice).await?;
    let backup = bob.store.snapshot();

    // Batch 2: normal traffic, a server that redelivers and double-hands a one-time key, and
    // assorted broken senders.
    harry.create_session(&keys, otk(3));
    let mut batch = Vec::new();
    for seq in 55..75 {
        batch.push(alice.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    batch.push(harry.encrypt(&to_bob, "m.room_key", room_key(75)));
    batch.push(first_alice_event);
    let mut dave = SimulatedDevice::new("@dave:example.org", "DAVEPHONE");
    dave.create_session(&keys, otk(0));
    batch.push(dave.encrypt(&to_bob, "m.room_key", room_key(76)));
    let mut megolm = carol.encrypt(&to_bob, "m.room_key", room_key(77));
    megolm["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
    batch.push(megolm);
    let mut mangled = alice.encrypt(&to_bob, "m.room_key", room_key(78));
    mangled["content"] = json!("<html>502 Bad Gateway</html>");
    batch.push(mangled);
    let mut keyless = carol.encrypt(&to_bob, "m.room_key", room_key(79));
    keyless["content"]
        .as_object_mut()
        .map(|c| c.remove("sender_key"));
    batch.push(keyless);
    let bob_old_install = OlmMachine::in_memory(BOB, "BOBOLDPHONE")
        .await
        .map_err(|e| e.to_string())?;
    let old_keys = publish_machine_keys(&bob_old_install, 1).await?;
    let mut alice_tablet = SimulatedDevice::new("@alice:example.org", "ALICETABLET");
    let to_old = alice_tablet.create_session(&old_keys, None);
    batch.push(alice_tablet.encrypt(&to_old, "m.room_key", room_key(80)));
    let mut truncated = alice.encrypt(&to_bob, "m.room_key", room_key(81));
    let entry = our_entry(&mut truncated);
    let body = entry["body"].as_str().unwrap_or_default().to_owned();
    entry["body"] = json!(format!("{}%%", &body[..body.len() / 2]));
    batch.push(truncated);
    bob.sync(
        "sync 2 (redelivery, server bugs, broken senders)",
        batch,
        &mut tally,
    )
    .await?;
    bob.reply_to(&mut harry).await?;

    // Bob restores his phone from the backup taken after sync 1: Harry's session is gone.
    bob = Bob::open(Arc::new(backup)).await?;

    // Batch 3: the restored phone, a wedged session, and hostile or buggy clients.
    let mut batch = Vec::new();
    for seq in 82..85 {
        batch.push(harry.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    for seq in 85..90 {
        batch.push(alice.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    // 2,001 of Carol's messages expired on the server: her session is now too far ahead.
    for seq in 0..2001 {
        carol.encrypt(&to_bob, "m.dummy", json!({ "expired": seq }));
    }
    for seq in 90..93 {
        batch.push(carol.encrypt(&to_bob, "m.room_key", room_key(seq)));
    }
    let mut frank = SimulatedDevice::new("@frank:example.org", "FRANKPHONE");
    frank.create_session(&keys, otk(4));
    let mut rewrapped = frank.encrypt(&to_bob, "m.room_key", room_key(93));
    let eve = SimulatedDevice::new("@eve:evil.example", "EVE");
    rewrapped["content"]["sender_key"] = json!(eve.curve25519_key().to_base64());
    batch.push(rewrapped);
    let mut mallory = SimulatedDevice::new("@mallory:evil.example", "MALLORY");
    mallory.create_session(&keys, otk(5));
    let forgeries: [(&str, Value); 4] = [
        ("sender", json!("@alice:example.org")),
        ("recipient", json!("@carol:example.net")),
        (
            "recipient_keys",
            json!({"ed25519": alice.ed25519_key().to_base64()}),
        ),
        ("sender_device_keys", {
            let mut keys = mallory.device_keys();
            keys["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
            keys
        }),
    ];
    for (field, forged) in forgeries {
        let mut plaintext = mallory.plaintext(&to_bob, "m.room_key", room_key(94), true);
        plaintext[field] = forged;
        batch.push(mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes()));
    }
    let mut no_keys = gina.plaintext(&to_bob, "m.room_key", room_key(95), false);
    no_keys.as_object_mut().map(|p| p.remove("keys"));
    batch.push(gina.encrypt_raw(&to_bob, no_keys.to_string().as_bytes()));
    bob.sync(
        "sync 3 (restored backup, wedged session, hostile clients)",
        batch,
        &mut tally,
    )
    .await?;

    eprintln!();
    eprintln!(
        "{:<48} {:>8} {:>8}",
        "PostHog event name", "failures", "reported"
    );
    eprintln!("{}", "-".repeat(66));
    for (name, (failures, reported)) in &tally.failures {
        eprintln!("{name:<48} {failures:>8} {reported:>8}");
    }
    eprintln!("{}", "-".repeat(66));
    let failures: usize = tally.failures.values().map(|(f, _)| f).sum();
    let reported: usize = tally.failures.values().map(|(_, r)| r).sum();
    eprintln!("{:<48} {failures:>8} {reported:>8}", "all failures");
    eprintln!("{:<48} {:>8}", "decrypted", tally.decrypted);
    eprintln!(
        "{:<48} {:>8}",
        "plain to-device events passed through", tally.plaintext
    );
    eprintln!(
        "(reporting policy: at most one PostHog event per message and per sender, sender key and name per hour; at most 30 per minute)"
    );
    Ok(())
}
