//! `demo`: Bob's phone receives three `/sync` batches of to-device traffic from eleven devices —
//! room keys after login, a server that redelivers, double-hands a one-time key and lies about
//! senders, a restored phone backup, a wedged session, a reinstalled app, old and hostile
//! clients — and reports every failure.
//!
//! Everything is what the shipped library does: Bob is an [`OlmMachine`] on an encrypted SQLite
//! store in a temporary directory, the peers are `OlmMachine`s that `encrypt` for him, the backup
//! is a copy of his store's files, the server's mistakes are edits of real events' JSON, and the
//! old and hostile clients write their own plaintexts on raw vodozemac ([`devices::RawClient`]).
//! Failures come from the same checks that run in production. stdout: the PostHog events, one
//! per line. stderr: a summary.

mod devices;

use std::collections::BTreeMap;

use devices::{back_up, claim, open_phone, publish_keys, Peer, RawClient, TempDir};
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use to_device_crypto::keys::PublishedKeys;
use to_device_crypto::{FailureStream, OlmMachine, StoreKey, ToDeviceOutcome};

const BOB: &str = "@bob:example.org";
const ALICE: &str = "@alice:example.org";

struct Tally {
    /// Per name: (failures, PostHog events after the reporting policy).
    failures: BTreeMap<&'static str, (usize, usize)>,
    decrypted: usize,
    plaintext: usize,
}

struct Bob {
    machine: OlmMachine,
    failures: FailureStream,
}

impl Bob {
    fn new(machine: OlmMachine) -> Self {
        let failures = machine.to_device_decryption_failure_stream();
        Self { machine, failures }
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

    /// Bob replies to `peer` on their session: from then on the peer sends normal messages.
    async fn reply_to(&self, peer: &Peer) -> Result<(), String> {
        let reply = self
            .machine
            .encrypt(&peer.published_keys().await?, "m.dummy", &[json!({})])
            .await
            .map_err(|e| e.to_string())?;
        peer.receive(&reply[0]).await
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

fn room_keys(seqs: std::ops::Range<usize>) -> Vec<Value> {
    seqs.map(room_key).collect()
}

/// The ciphertext entry of a (single-recipient) event.
fn our_entry(event: &mut Value) -> Result<&mut Value, String> {
    event["content"]["ciphertext"]
        .as_object_mut()
        .and_then(|map| map.values_mut().next())
        .ok_or_else(|| "an encrypted event without a ciphertext entry".to_owned())
}

pub async fn run() -> Result<(), String> {
    let mut tally = Tally {
        failures: BTreeMap::new(),
        decrypted: 0,
        plaintext: 0,
    };
    let dir = TempDir::new()?;
    let store = dir.path().join("bob.sqlite3");
    let backup = dir.path().join("bob-backup.sqlite3");
    let key = StoreKey::generate().map_err(|e| e.to_string())?;
    let mut bob = Bob::new(open_phone(&store, &key, BOB).await?);
    let keys = publish_keys(&bob.machine, 40).await?;
    let bob_device = PublishedKeys {
        device: keys.device.clone(),
        one_time_keys: Vec::new(),
    };

    let alice = Peer::new(ALICE, "ALICEPHONE").await?;
    let carol = Peer::new("@carol:example.net", "CAROLLAPTOP").await?;
    let harry = Peer::new("@harry:example.org", "HARRYTABLET").await?;
    let mut gina = RawClient::new("@gina:oldserver.org");
    bob.machine
        .receive_keys_query_response(&alice.keys_query_response().await)
        .await
        .map_err(|e| e.to_string())?;

    // Batch 1, right after login: room keys from Alice (known device) and Carol (unknown, but
    // she sends sender_device_keys), an old client without sender_device_keys, a plain event.
    let mut batch = alice
        .send(&claim(&keys, 0)?, "m.room_key", &room_keys(0..30))
        .await?;
    batch.extend(
        carol
            .send(&claim(&keys, 1)?, "m.room_key", &room_keys(30..50))
            .await?,
    );
    gina.create_session(&claim(&keys, 2)?)?;
    for seq in 50..55 {
        let plaintext = gina.plaintext(&keys.device, "m.room_key", room_key(seq));
        batch.push(gina.encrypt(&keys.device, &plaintext)?);
    }
    let secret = gina.plaintext(&keys.device, "m.secret.send", json!({"request_id": "r1"}));
    batch.push(gina.encrypt(&keys.device, &secret)?);
    batch.push(
        json!({"type": "m.key.verification.request", "sender": ALICE,
               "content": {"from_device": "ALICEPHONE", "methods": ["m.sas.v1"]}}),
    );
    let first_alice_event = batch[0].clone();
    bob.sync("sync 1 (after login)", batch, &mut tally).await?;
    bob.reply_to(&alice).await?;
    // The phone is backed up between two syncs: a copy of the store's files.
    back_up(&store, &backup)?;

    // Batch 2: normal traffic, a server that redelivers and double-hands a one-time key, and
    // assorted broken senders.
    let mut batch = alice
        .send(&bob_device, "m.room_key", &room_keys(55..75))
        .await?;
    batch.push(
        harry
            .send_one(&claim(&keys, 3)?, "m.room_key", room_key(75))
            .await?,
    );
    batch.push(first_alice_event);
    // The server hands Dave the one-time key it already gave Alice.
    let dave = Peer::new("@dave:example.org", "DAVEPHONE").await?;
    batch.push(
        dave.send_one(&claim(&keys, 0)?, "m.room_key", room_key(76))
            .await?,
    );
    let mut megolm = carol
        .send_one(&bob_device, "m.room_key", room_key(77))
        .await?;
    megolm["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
    batch.push(megolm);
    let mut mangled = alice
        .send_one(&bob_device, "m.room_key", room_key(78))
        .await?;
    mangled["content"] = json!("<html>502 Bad Gateway</html>");
    batch.push(mangled);
    let mut keyless = carol
        .send_one(&bob_device, "m.room_key", room_key(79))
        .await?;
    if let Some(content) = keyless["content"].as_object_mut() {
        content.remove("sender_key");
    }
    batch.push(keyless);
    // Alice's tablet still encrypts for the phone Bob had before this one.
    let bob_old_install = OlmMachine::in_memory(BOB, "BOBOLDPHONE")
        .await
        .map_err(|e| e.to_string())?;
    let old_keys = publish_keys(&bob_old_install, 1).await?;
    let alice_tablet = Peer::new(ALICE, "ALICETABLET").await?;
    batch.push(
        alice_tablet
            .send_one(&claim(&old_keys, 0)?, "m.room_key", room_key(80))
            .await?,
    );
    let mut truncated = alice
        .send_one(&bob_device, "m.room_key", room_key(81))
        .await?;
    let entry = our_entry(&mut truncated)?;
    let body = entry["body"].as_str().unwrap_or_default().to_owned();
    entry["body"] = json!(format!("{}%%", &body[..body.len() / 2]));
    batch.push(truncated);
    bob.sync(
        "sync 2 (redelivery, server bugs, broken senders)",
        batch,
        &mut tally,
    )
    .await?;
    bob.reply_to(&harry).await?;

    // Bob restores his phone from the backup taken after sync 1: Harry's session is gone.
    drop(bob);
    let mut bob = Bob::new(open_phone(&backup, &key, BOB).await?);

    // Batch 3: the restored phone, a wedged session, a reinstalled app, and hostile or buggy
    // clients.
    let mut batch = harry
        .send(&bob_device, "m.room_key", &room_keys(82..85))
        .await?;
    batch.extend(
        alice
            .send(&bob_device, "m.room_key", &room_keys(85..90))
            .await?,
    );
    // 2,001 of Carol's messages expired on the server: her session is now too far ahead.
    carol
        .send(
            &bob_device,
            "m.dummy",
            &vec![json!({"expired": true}); 2001],
        )
        .await?;
    batch.extend(
        carol
            .send(&bob_device, "m.room_key", &room_keys(90..93))
            .await?,
    );
    // A pre-key message re-wrapped under another sender key.
    let frank = Peer::new("@frank:example.org", "FRANKPHONE").await?;
    let eve = Peer::new("@eve:evil.example", "EVE").await?;
    let mut rewrapped = frank
        .send_one(&claim(&keys, 4)?, "m.room_key", room_key(93))
        .await?;
    rewrapped["content"]["sender_key"] = json!(eve.machine.identity_keys().curve25519.to_base64());
    batch.push(rewrapped);
    // A server that claims Frank's message came from Alice.
    let mut misattributed = frank
        .send_one(&claim(&keys, 4)?, "m.room_key", room_key(94))
        .await?;
    misattributed["sender"] = json!(ALICE);
    batch.push(misattributed);
    // Alice reinstalled her app under the same device id: new keys that contradict the ones
    // Bob knows from /keys/query.
    let alice_reinstalled = Peer::new(ALICE, "ALICEPHONE").await?;
    batch.push(
        alice_reinstalled
            .send_one(&claim(&keys, 5)?, "m.room_key", room_key(95))
            .await?,
    );
    // A hostile client whose plaintexts name another recipient, or another recipient key.
    let mut mallory = RawClient::new("@mallory:evil.example");
    mallory.create_session(&claim(&keys, 6)?)?;
    let forgeries = [
        ("recipient", json!("@carol:example.net")),
        (
            "recipient_keys",
            json!({"ed25519": alice.machine.identity_keys().ed25519.to_base64()}),
        ),
    ];
    for (field, forged) in forgeries {
        let mut plaintext = mallory.plaintext(&keys.device, "m.room_key", room_key(96));
        plaintext[field] = forged;
        batch.push(mallory.encrypt(&keys.device, &plaintext)?);
    }
    // An old client's plaintext without the required `keys`.
    let mut no_keys = gina.plaintext(&keys.device, "m.room_key", room_key(97));
    if let Some(plaintext) = no_keys.as_object_mut() {
        plaintext.remove("keys");
    }
    batch.push(gina.encrypt(&keys.device, &no_keys)?);
    bob.sync(
        "sync 3 (restored backup, wedged session, hostile clients)",
        batch,
        &mut tally,
    )
    .await?;

    print_summary(&tally);
    Ok(())
}

fn print_summary(tally: &Tally) {
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
}
