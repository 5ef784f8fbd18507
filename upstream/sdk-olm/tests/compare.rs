//! Side by side: the same traffic, aimed once at our crate (`to-device-crypto decrypt`) and once at
//! the patched matrix-sdk-crypto (`sdk-olm decrypt`), compared event by event.
//!
//! Each receiver is a separate device with its own store, so every event is made twice with the
//! same recipe, once for each. The senders are matrix-sdk-crypto itself (`sdk-olm encrypt`), our
//! crate (`to-device-crypto encrypt`) and raw vodozemac devices for what no well-behaved client
//! sends; the traffic covers pre-key and normal messages, device keys from `sender_device_keys` and
//! from `/keys/query`, the interop suite's adversarial corpus (docs/INTEROP.md) and restored
//! backups. Every event has an expected outcome, which both receivers must give, except for the
//! differences documented in docs/UPSTREAM.md:
//!
//! - a verbatim duplicate inside one batch: our outbox re-emits the result (`pending: true`),
//!   matrix-sdk-crypto fails it;
//! - a `ciphertext` map whose first entry is not ours: matrix-sdk-crypto only reads the first.
//!
//! The analytics payloads that pass the reporting policy (`--analytics-out`) are compared per
//! batch as well. Every failure name but `Store` (no fault can be injected into the SDK's store)
//! must come out of the SDK at least once; the coverage is written to `coverage.json` (checked
//! fresh; `TDC_BLESS=1` rewrites it), from which the README's failure table gets its
//! "patched matrix-sdk-crypto" column.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::*;
use to_device_analytics::FailureReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ours,
    Sdk,
}

/// A device behind one of the two CLIs.
#[derive(Clone)]
struct Cli {
    kind: Kind,
    dir: PathBuf,
    /// Its `/keys/upload` body.
    body: Value,
}

impl Cli {
    fn bin(kind: Kind) -> PathBuf {
        match kind {
            Kind::Ours => to_device_crypto(),
            Kind::Sdk => sdk_olm(),
        }
    }

    fn create(kind: Kind, dir: PathBuf, user_id: &str, device_id: &str) -> Self {
        let out = run(
            &Self::bin(kind),
            &[
                "keys",
                "--store",
                dir.to_str().unwrap(),
                "--user-id",
                user_id,
                "--device-id",
                device_id,
            ],
            "",
        );
        let body: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(one_time_keys(&body).len(), 25, "{kind:?}: 25 one-time keys");
        Self { kind, dir, body }
    }

    /// A copy of this device's store in `dir`: a backup, restored later.
    fn snapshot(&self, dir: PathBuf) -> Self {
        copy_dir(&self.dir, &dir);
        Self {
            dir,
            ..self.clone()
        }
    }

    fn file(&self, name: &str, value: &Value) -> PathBuf {
        let path = self.dir.with_extension(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path
    }

    /// One `/sync` batch; returns the output lines and the analytics payloads it appended.
    fn decrypt(&self, events: &[Value], device_keys: Option<&Value>) -> (Vec<Value>, Vec<String>) {
        let input = self.file("input.json", &Value::Array(events.to_vec()));
        let analytics = self.dir.with_extension("analytics.jsonl");
        let _ = std::fs::remove_file(&analytics);
        let mut args = vec![
            "decrypt".to_owned(),
            "--store".to_owned(),
            self.dir.to_str().unwrap().to_owned(),
            "--analytics-out".to_owned(),
            analytics.to_str().unwrap().to_owned(),
        ];
        if let Some(keys) = device_keys {
            args.push("--device-keys".to_owned());
            args.push(
                self.file("keys-query.json", keys)
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        args.push(input.to_str().unwrap().to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&Self::bin(self.kind), &args, "");
        let mut payloads: Vec<String> = std::fs::read_to_string(&analytics)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        payloads.sort();
        (lines(&out), payloads)
    }

    /// `count` events of `TEST_TYPE` for the device of `recipient` (a `/keys/upload` body).
    fn encrypt(&self, recipient: &Value, content: Value, count: usize) -> Vec<Value> {
        let keys = self.file("recipient.json", recipient);
        let content = content.to_string();
        let count = count.to_string();
        let out = run(
            &Self::bin(self.kind),
            &[
                "encrypt",
                "--store",
                self.dir.to_str().unwrap(),
                "--recipient-keys",
                keys.to_str().unwrap(),
                "--type",
                TEST_TYPE,
                "--content",
                &content,
                "--count",
                &count,
            ],
            "",
        );
        let events: Value = serde_json::from_str(out.trim()).unwrap();
        events.as_array().unwrap().clone()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A receiver and the one-time keys of its upload body not handed out yet.
struct Receiver {
    cli: Cli,
    unclaimed: Vec<(String, Value)>,
}

impl Receiver {
    fn new(cli: Cli) -> Self {
        let unclaimed = one_time_keys(&cli.body);
        Self { cli, unclaimed }
    }

    /// What a server hands out for one `/keys/claim`: the device keys and one fresh one-time key.
    fn claim(&mut self) -> (Value, (String, Value)) {
        let key = self.unclaimed.remove(0);
        (with_one_time_key(&self.cli.body, &key), key)
    }

    /// The device keys without one-time keys: for senders that already have a session.
    fn device_only(&self) -> Value {
        json!({ "device_keys": self.cli.body["device_keys"], "one_time_keys": {} })
    }

    fn curve25519(&self) -> String {
        curve25519_of(&self.cli.body)
    }
}

/// What an event must produce at both receivers.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Decrypted,
    Plaintext,
    Failed(FailureReason),
}

/// A documented exception to "both receivers give the expected outcome".
#[derive(Clone, Copy, Debug, PartialEq)]
enum Difference {
    None,
    /// A verbatim duplicate inside one batch: ours re-emits the pending result, the SDK fails it.
    DuplicateInBatch,
    /// Our entry is not the first of the `ciphertext` map: the SDK only reads the first.
    FirstCiphertextEntryOnly,
    /// A redelivered event that decrypted but failed a plaintext check: ours kept its message
    /// hash (`ReplayedMessage`), the SDK keeps hashes of successes only (`SessionWedged`).
    NoHashForPlaintextFailures,
}

struct Case {
    label: String,
    expect: Expect,
    difference: Difference,
}

/// One `/sync` batch, made twice: `events[0]` for our receiver, `events[1]` for the SDK's.
#[derive(Default)]
struct Batch {
    cases: Vec<Case>,
    events: [Vec<Value>; 2],
}

impl Batch {
    fn push(&mut self, label: &str, expect: Expect, events: [Value; 2]) {
        self.push_with(label, expect, Difference::None, events);
    }

    fn push_with(
        &mut self,
        label: &str,
        expect: Expect,
        difference: Difference,
        events: [Value; 2],
    ) {
        self.cases.push(Case {
            label: label.to_owned(),
            expect,
            difference,
        });
        let [ours, sdk] = events;
        self.events[0].push(ours);
        self.events[1].push(sdk);
    }
}

/// What the comparison looks at in an output line.
fn outcome(line: &Value) -> Value {
    match line["result"].as_str() {
        Some("decrypted") => {
            let mut content = line["content"].clone();
            // matrix-sdk-crypto imports the room key and hands the event on with its secret
            // zeroized (docs/UPSTREAM.md); the rest must be the same.
            if line["type"] == "m.room_key" {
                content["session_key"] = json!("(secret)");
            }
            // `id` is not compared: it is our outbox's, which sdk-olm derives from the envelope
            // (docs/UPSTREAM.md, "Allowed differences"); `format_of` checks its shape.
            json!({
            "result": if line["pending"] == json!(true) { "decrypted (re-emitted)" } else { "decrypted" },
            "type": line["type"],
            "sender": line["sender"],
            "content": content,
            "sender_key": line["sender_key"],
            "sender_device_id": line["sender_device_id"],
            "sender_device_verified": line["sender_device_verified"],
            })
        }
        // Neither `error` (each implementation words its own) nor `type`: the decrypted type of a
        // message that failed a plaintext check, which matrix-sdk-crypto drops with the plaintext.
        Some("failed") => json!({
            "result": "failed",
            "name": line["name"],
            "sender": line["sender"],
            "sender_key": line["sender_key"],
        }),
        Some("plaintext") => json!({
            "result": "plaintext",
            "type": line["type"],
            "sender": line["sender"],
            "content": line["content"],
        }),
        _ => line.clone(),
    }
}

/// The shape of an output line: its keys, and the types of those the comparison does not look at.
/// Both CLIs must print the same shape for every line ("exactly our decrypt format").
fn format_of(line: &Value) -> Value {
    let keys: Vec<&String> = line
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    let is_outbox_id = |id: &Value| {
        id.as_str().is_some_and(|id| {
            id.len() == 32
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    json!({
        "keys": keys,
        "id": line.get("id").map(is_outbox_id),
        "error": line.get("error").map(Value::is_string),
        "type of a failure": line.get("type").filter(|_| line["result"] == "failed").map(|t| t.is_string() || t.is_null()),
    })
}

fn matches(line: &Value, expect: &Expect) -> bool {
    match expect {
        Expect::Decrypted => line["result"] == "decrypted" && line["pending"] == json!(false),
        Expect::Plaintext => line["result"] == "plaintext",
        Expect::Failed(reason) => {
            line["result"] == "failed" && line["name"] == reason.analytics_name()
        }
    }
}

/// Everything the comparison saw, for the report and the coverage file.
#[derive(Default)]
struct Report {
    rows: Vec<String>,
    /// Per failure name: events the SDK failed with it.
    sdk_names: BTreeMap<String, usize>,
    compared: usize,
    differences: Vec<String>,
}

impl Report {
    /// Feeds `batch` to both receivers (with `device_keys` as a `/keys/query` response) and checks
    /// every event, then the analytics payloads.
    fn deliver(
        &mut self,
        step: &str,
        receivers: [&Cli; 2],
        batch: &Batch,
        device_keys: Option<&Value>,
    ) -> [Vec<Value>; 2] {
        let (ours, ours_payloads) = receivers[0].decrypt(&batch.events[0], device_keys);
        let (sdk, sdk_payloads) = receivers[1].decrypt(&batch.events[1], device_keys);
        assert_eq!(ours.len(), batch.cases.len(), "{step}: our output lines");
        assert_eq!(sdk.len(), batch.cases.len(), "{step}: sdk-olm output lines");
        for (i, case) in batch.cases.iter().enumerate() {
            assert_eq!(ours[i]["index"], json!(i), "{step}: our line order");
            assert_eq!(sdk[i]["index"], json!(i), "{step}: sdk-olm line order");
            let (o, s) = (outcome(&ours[i]), outcome(&sdk[i]));
            let context = format!(
                "{step} / {}:\n  ours: {}\n  sdk:  {}",
                case.label, ours[i], sdk[i]
            );
            if ours[i]["result"] == sdk[i]["result"] {
                assert_eq!(
                    format_of(&ours[i]),
                    format_of(&sdk[i]),
                    "the two lines differ in format: {context}"
                );
            }
            match case.difference {
                Difference::None => {
                    assert!(
                        matches(&ours[i], &case.expect),
                        "ours, expected {:?}: {context}",
                        case.expect
                    );
                    assert!(
                        matches(&sdk[i], &case.expect),
                        "sdk, expected {:?}: {context}",
                        case.expect
                    );
                    assert_eq!(o, s, "the two receivers differ: {context}");
                }
                Difference::DuplicateInBatch => {
                    assert_eq!(o["result"], "decrypted (re-emitted)", "{context}");
                    assert_eq!(s["result"], "failed", "{context}");
                    self.differences.push(format!(
                        "{step} / {}: ours {}, sdk {}",
                        case.label, o["result"], s["name"]
                    ));
                }
                Difference::NoHashForPlaintextFailures => {
                    assert!(matches(&ours[i], &case.expect), "{context}");
                    assert!(
                        matches(&sdk[i], &Expect::Failed(FailureReason::SessionWedged)),
                        "{context}"
                    );
                    self.differences.push(format!(
                        "{step} / {}: ours {}, sdk {}",
                        case.label, o["name"], s["name"]
                    ));
                }
                Difference::FirstCiphertextEntryOnly => {
                    assert!(matches(&ours[i], &Expect::Decrypted), "{context}");
                    assert!(
                        matches(&sdk[i], &Expect::Failed(FailureReason::MissingCiphertext)),
                        "{context}"
                    );
                    self.differences.push(format!(
                        "{step} / {}: ours decrypted, sdk {}",
                        case.label, s["name"]
                    ));
                }
            }
            // Coverage counts what the SDK produced where both receivers agreed.
            if let (Difference::None, Some(name)) = (case.difference, sdk[i]["name"].as_str()) {
                *self.sdk_names.entry(name.to_owned()).or_default() += 1;
            }
            self.compared += 1;
            self.rows.push(format!(
                "| {step} | {} | {} | {} |",
                case.label,
                label(&ours[i]),
                label(&sdk[i])
            ));
        }
        // The reporting policy gives the same payloads, unless the batch has a documented
        // difference (which can add or drop a failure).
        if batch.cases.iter().all(|c| c.difference == Difference::None) {
            assert_eq!(ours_payloads, sdk_payloads, "{step}: analytics payloads");
        }
        [ours, sdk]
    }
}

fn label(line: &Value) -> String {
    match line["result"].as_str() {
        Some("failed") => format!("`{}`", line["name"].as_str().unwrap_or("?")),
        Some("decrypted") if line["pending"] == json!(true) => "decrypted (re-emitted)".to_owned(),
        Some(other) => other.to_owned(),
        None => line.to_string(),
    }
}

fn flip_last_body_byte(mut event: Value) -> Value {
    let entry = event["content"]["ciphertext"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    let mut body = vodozemac::base64_decode(entry["body"].as_str().unwrap()).unwrap();
    *body.last_mut().unwrap() ^= 0x01;
    entry["body"] = json!(vodozemac::base64_encode(body));
    event
}

fn with_entry(mut event: Value, change: impl Fn(&mut Value)) -> Value {
    for entry in event["content"]["ciphertext"]
        .as_object_mut()
        .unwrap()
        .values_mut()
    {
        change(entry);
    }
    event
}

fn with_content(mut event: Value, change: impl Fn(&mut serde_json::Map<String, Value>)) -> Value {
    change(event["content"].as_object_mut().unwrap());
    event
}

/// Both receivers' versions of one recipe.
fn both(receivers: &mut [Receiver; 2], mut make: impl FnMut(&mut Receiver) -> Value) -> [Value; 2] {
    let [ours, sdk] = receivers;
    [make(ours), make(sdk)]
}

const BOB: &str = "@bob:example.org";

#[test]
fn the_patched_sdk_and_our_crate_agree_event_by_event() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let mut receivers = [
        Receiver::new(Cli::create(Kind::Ours, dir("bob-ours"), BOB, "BOBOURS")),
        Receiver::new(Cli::create(Kind::Sdk, dir("bob-sdk"), BOB, "BOBSDK")),
    ];
    let before_any_session = [
        receivers[0].cli.snapshot(dir("bob-ours-backup-0")),
        receivers[1].cli.snapshot(dir("bob-sdk-backup-0")),
    ];
    // Senders: matrix-sdk-crypto, our crate, and raw vodozemac.
    let alice = Cli::create(
        Kind::Sdk,
        dir("alice-sdk"),
        "@alice:example.org",
        "ALICESDK",
    );
    let carol = Cli::create(
        Kind::Ours,
        dir("carol-ours"),
        "@carol:example.org",
        "CAROLOURS",
    );
    let mut erin = RawDevice::new("@erin:example.org", "ERINRAW");
    let erin_body = erin.keys_upload_body(2);
    let mut frank = RawDevice::new("@frank:example.org", "FRANKRAW");
    let mut report = Report::default();
    let mut erin_keys: Vec<(String, Value)> = Vec::new();
    let mut alice_keys: Vec<(String, Value)> = Vec::new();

    // 1. Pre-key messages (type 0) on new sessions.
    let mut batch = Batch::default();
    let alice_first = both(&mut receivers, |r| {
        let (recipient, key) = r.claim();
        alice_keys.push(key);
        Value::Array(alice.encrypt(&recipient, json!({ "from": "alice", "step": 1 }), 2))
    });
    for n in 0..2 {
        batch.push(
            "matrix-sdk-crypto, pre-key message",
            Expect::Decrypted,
            alice_first.clone().map(|events| events[n].clone()),
        );
    }
    let carol_first = both(&mut receivers, |r| {
        Value::Array(carol.encrypt(&r.claim().0, json!({ "from": "carol", "step": 1 }), 2))
    });
    for n in 0..2 {
        batch.push(
            "our crate, pre-key message",
            Expect::Decrypted,
            carol_first.clone().map(|events| events[n].clone()),
        );
    }
    let erin_first = both(&mut receivers, |r| {
        let (recipient, key) = r.claim();
        erin.open_session(&recipient, &key);
        erin_keys.push(key);
        let plaintext = erin.plaintext(&recipient, TEST_TYPE, json!({ "from": "erin" }), true);
        erin.encrypt(&recipient, plaintext.to_string().as_bytes())
    });
    batch.push(
        "raw Olm with sender_device_keys, pre-key message",
        Expect::Decrypted,
        erin_first.clone(),
    );
    batch.push(
        "raw Olm, a second pre-key message on the same session",
        Expect::Decrypted,
        both(&mut receivers, |r| {
            let p = erin.plaintext(&r.cli.body, TEST_TYPE, json!({ "n": 2 }), true);
            erin.encrypt(&r.cli.body, p.to_string().as_bytes())
        }),
    );
    batch.push(
        "raw Olm, the first pre-key message of a session",
        Expect::Decrypted,
        both(&mut receivers, |r| {
            let (recipient, key) = r.claim();
            frank.open_session(&recipient, &key);
            let p = frank.plaintext(&recipient, TEST_TYPE, json!({}), true);
            frank.encrypt(&recipient, p.to_string().as_bytes())
        }),
    );
    batch.push(
        "unencrypted event",
        Expect::Plaintext,
        both(&mut receivers, |_| {
            json!({ "type": "org.example.plain", "sender": "@alice:example.org", "content": { "plain": true } })
        }),
    );
    report.deliver(
        "1 pre-key",
        [&receivers[0].cli, &receivers[1].cli],
        &batch,
        None,
    );
    for e in batch
        .events
        .iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.encrypted")
    {
        assert_eq!(message_type(e), 0, "step 1 sends pre-key messages");
    }
    let after_first_messages = [
        receivers[0].cli.snapshot(dir("bob-ours-backup-1")),
        receivers[1].cli.snapshot(dir("bob-sdk-backup-1")),
    ];

    // 2. Both receivers reply on the sessions the senders opened, so that the senders switch to
    // normal (type 1) messages.
    for r in &receivers {
        let to_alice = reply(&r.cli, &alice.body);
        let (lines, _) = alice.decrypt(&to_alice, None);
        assert!(
            lines.iter().all(|l| l["result"] == "decrypted"),
            "{lines:?}"
        );
        let to_carol = reply(&r.cli, &carol.body);
        let (lines, _) = carol.decrypt(&to_carol, None);
        assert!(
            lines.iter().all(|l| l["result"] == "decrypted"),
            "{lines:?}"
        );
        let to_erin = reply(&r.cli, &erin_body);
        assert_eq!(erin.receive(&to_erin).len(), 1);
    }

    // 3. Normal messages and the adversarial corpus; each mutation is applied to a fresh event
    // that is never delivered intact.
    let mut batch = Batch::default();
    let alice_normal = |r: &mut Receiver, step: &str| {
        let event = alice
            .encrypt(
                &r.device_only(),
                json!({ "from": "alice", "step": step }),
                1,
            )
            .remove(0);
        assert_eq!(
            message_type(&event),
            1,
            "alice sends normal messages after the reply"
        );
        event
    };
    let carol_normal = |r: &mut Receiver, step: &str| {
        let event = carol
            .encrypt(
                &r.device_only(),
                json!({ "from": "carol", "step": step }),
                1,
            )
            .remove(0);
        assert_eq!(
            message_type(&event),
            1,
            "carol sends normal messages after the reply"
        );
        event
    };
    let alice_3 = both(&mut receivers, |r| alice_normal(r, "3"));
    batch.push(
        "matrix-sdk-crypto, normal message",
        Expect::Decrypted,
        alice_3.clone(),
    );
    batch.push(
        "our crate, normal message",
        Expect::Decrypted,
        both(&mut receivers, |r| carol_normal(r, "3")),
    );
    batch.push(
        "raw Olm with sender_device_keys, normal message",
        Expect::Decrypted,
        both(&mut receivers, |r| {
            let p = erin.plaintext(&r.cli.body, TEST_TYPE, json!({ "n": 3 }), true);
            let event = erin.encrypt(&r.cli.body, p.to_string().as_bytes());
            assert_eq!(message_type(&event), 1);
            event
        }),
    );
    let tampered = both(&mut receivers, |r| {
        flip_last_body_byte(alice_normal(r, "tampered"))
    });
    batch.push(
        "tampered body (last byte flipped), normal message",
        Expect::Failed(FailureReason::SessionWedged),
        tampered.clone(),
    );
    batch.push(
        "tampered pre-key message on an existing session",
        Expect::Failed(FailureReason::SessionWedged),
        both(&mut receivers, |r| {
            let p = frank.plaintext(&r.cli.body, TEST_TYPE, json!({}), true);
            let event = frank.encrypt(&r.cli.body, p.to_string().as_bytes());
            assert_eq!(message_type(&event), 0);
            flip_last_body_byte(event)
        }),
    );
    batch.push(
        "foreign algorithm (m.megolm.v1.aes-sha2)",
        Expect::Failed(FailureReason::UnsupportedAlgorithm),
        both(&mut receivers, |r| {
            with_content(carol_normal(r, "x"), |c| {
                c.insert("algorithm".into(), json!("m.megolm.v1.aes-sha2"));
            })
        }),
    );
    let someone_else = RawDevice::new("@x:example.org", "X").curve25519();
    batch.push(
        "ciphertext keyed for another device's key",
        Expect::Failed(FailureReason::MissingCiphertext),
        both(&mut receivers, |r| {
            with_content(alice_normal(r, "x"), |c| {
                let entry = c["ciphertext"]
                    .as_object()
                    .unwrap()
                    .values()
                    .next()
                    .unwrap()
                    .clone();
                c.insert("ciphertext".into(), json!({ someone_else.as_str(): entry }));
            })
        }),
    );
    let forged_sender = both(&mut receivers, |r| {
        let mut event = alice_normal(r, "x");
        event["sender"] = json!("@mallory:example.org");
        event
    });
    batch.push(
        "envelope sender changed (@mallory)",
        Expect::Failed(FailureReason::MismatchedSender),
        forged_sender.clone(),
    );
    batch.push(
        "body not base64",
        Expect::Failed(FailureReason::MalformedCiphertext),
        both(&mut receivers, |r| {
            with_entry(carol_normal(r, "x"), |e| e["body"] = json!("not base64!*"))
        }),
    );
    batch.push(
        "message type 2",
        Expect::Failed(FailureReason::MalformedCiphertext),
        both(&mut receivers, |r| {
            with_entry(alice_normal(r, "x"), |e| e["type"] = json!(2))
        }),
    );
    batch.push(
        "body is base64 but not an Olm message",
        Expect::Failed(FailureReason::MalformedCiphertext),
        both(&mut receivers, |r| {
            with_entry(alice_normal(r, "x"), |e| e["body"] = json!("AAAA"))
        }),
    );
    batch.push(
        "sender_key missing",
        Expect::Failed(FailureReason::MissingSenderKey),
        both(&mut receivers, |r| {
            with_content(alice_normal(r, "x"), |c| {
                c.remove("sender_key");
            })
        }),
    );
    batch.push(
        "sender_key not a Curve25519 key",
        Expect::Failed(FailureReason::MissingSenderKey),
        both(&mut receivers, |r| {
            with_content(carol_normal(r, "x"), |c| {
                c.insert("sender_key".into(), json!("AAAA"));
            })
        }),
    );
    batch.push(
        "content not an object",
        Expect::Failed(FailureReason::MalformedEvent),
        both(&mut receivers, |r| {
            let mut event = alice_normal(r, "x");
            event["content"] = json!("not an object");
            event
        }),
    );
    batch.push(
        "event type missing",
        Expect::Failed(FailureReason::MalformedEvent),
        both(&mut receivers, |r| {
            let mut event = alice_normal(r, "x");
            event.as_object_mut().unwrap().remove("type");
            event
        }),
    );

    // Crafted plaintexts, each from a new raw device (one device per case, with a session to each
    // receiver on a fresh one-time key: pre-key messages).
    let mut craft = |label: &str,
                     expect: Expect,
                     sender_device_keys: bool,
                     event_type: &str,
                     change: &dyn Fn(&mut Value)| {
        let mut device = RawDevice::new("@grace:example.org", "GRACERAW");
        let events = both(&mut receivers, |r| {
            let (recipient, key) = r.claim();
            device.open_session(&recipient, &key);
            let mut plaintext = device.plaintext(
                &recipient,
                event_type,
                json!({ "crafted": true }),
                sender_device_keys,
            );
            change(&mut plaintext);
            match plaintext.as_str() {
                Some(raw) => device.encrypt(&recipient, raw.as_bytes()),
                None => device.encrypt(&recipient, plaintext.to_string().as_bytes()),
            }
        });
        batch.push(label, expect, events);
    };
    craft(
        "crafted: recipient is another user",
        Expect::Failed(FailureReason::MismatchedRecipient),
        true,
        TEST_TYPE,
        &|p| p["recipient"] = json!("@someone-else:example.org"),
    );
    craft(
        "crafted: recipient_keys.ed25519 of another device",
        Expect::Failed(FailureReason::MismatchedKeys),
        true,
        TEST_TYPE,
        &|p| {
            p["recipient_keys"]["ed25519"] = json!(RawDevice::new("@x:example.org", "X").ed25519())
        },
    );
    craft(
        "crafted: plaintext not JSON",
        Expect::Failed(FailureReason::JsonError),
        true,
        TEST_TYPE,
        &|p| *p = json!("this is not JSON"),
    );
    craft(
        "crafted: plaintext without recipient_keys",
        Expect::Failed(FailureReason::JsonError),
        true,
        TEST_TYPE,
        &|p| {
            p.as_object_mut().unwrap().remove("recipient_keys");
        },
    );
    craft(
        "crafted: sender_device_keys with a bad signature",
        Expect::Failed(FailureReason::InvalidSenderDeviceKeys),
        true,
        TEST_TYPE,
        &|p| {
            let signatures = p["sender_device_keys"]["signatures"]
                .as_object_mut()
                .unwrap();
            for signature in signatures
                .values_mut()
                .flat_map(|s| s.as_object_mut().unwrap().values_mut())
            {
                let s = signature.as_str().unwrap().to_owned();
                let first = if s.starts_with('A') { "B" } else { "A" };
                *signature = json!(format!("{first}{}", &s[1..]));
            }
        },
    );
    craft(
        "crafted: unknown device, no sender_device_keys",
        Expect::Failed(FailureReason::MissingSigningKey),
        false,
        TEST_TYPE,
        &|_| {},
    );
    let room_key = room_key_content("!room:example.org");
    craft(
        "crafted: unknown device, no sender_device_keys, m.room_key",
        Expect::Decrypted,
        false,
        "m.room_key",
        &|p| p["content"] = room_key.clone(),
    );
    // Devices known from `/keys/query` only (both receivers get the same response).
    let mut known = RawDevice::new("@heidi:example.org", "HEIDIRAW");
    let mut lying = RawDevice::new("@ivan:example.org", "IVANRAW");
    let keys_query_body = json!({ "device_keys": {
        known.user_id.as_str(): { known.device_id.as_str(): known.device_keys() },
        lying.user_id.as_str(): { lying.device_id.as_str(): lying.device_keys() },
    } });
    batch.push(
        "device known from /keys/query, no sender_device_keys",
        Expect::Decrypted,
        both(&mut receivers, |r| {
            let (recipient, key) = r.claim();
            known.open_session(&recipient, &key);
            let p = known.plaintext(&recipient, TEST_TYPE, json!({ "known": true }), false);
            known.encrypt(&recipient, p.to_string().as_bytes())
        }),
    );
    batch.push(
        "keys.ed25519 differs from the device's key from /keys/query",
        Expect::Failed(FailureReason::MismatchedKeys),
        both(&mut receivers, |r| {
            let (recipient, key) = r.claim();
            lying.open_session(&recipient, &key);
            let mut p = lying.plaintext(&recipient, TEST_TYPE, json!({}), false);
            p["keys"]["ed25519"] = json!(RawDevice::new("@x:example.org", "X").ed25519());
            lying.encrypt(&recipient, p.to_string().as_bytes())
        }),
    );
    // Session failures.
    let mut judy = RawDevice::new("@judy:example.org", "JUDYRAW");
    batch.push(
        "normal message from a device with no session",
        Expect::Failed(FailureReason::MissingSession),
        both(&mut receivers, |r| {
            normal_message_elsewhere(&mut judy, &r.curve25519())
        }),
    );
    batch.push(
        "normal message on a session the receiver does not have, from a known sender key",
        Expect::Failed(FailureReason::SessionWedged),
        both(&mut receivers, |r| {
            normal_message_elsewhere(&mut erin, &r.curve25519())
        }),
    );
    let mut mike = RawDevice::new("@mike:example.org", "MIKERAW");
    batch.push(
        "pre-key message re-wrapped under another sender key",
        Expect::Failed(FailureReason::SessionCreation),
        both(&mut receivers, |r| {
            let (recipient, key) = r.claim();
            mike.open_session(&recipient, &key);
            let p = mike.plaintext(&recipient, TEST_TYPE, json!({}), true);
            let mut event = mike.encrypt(&recipient, p.to_string().as_bytes());
            event["content"]["sender_key"] = json!(someone_else);
            event
        }),
    );
    // The server hands out a one-time key a second time, to matrix-sdk-crypto and to our crate.
    let dave = Cli::create(Kind::Sdk, dir("dave-sdk"), "@dave:example.org", "DAVESDK");
    let oscar = Cli::create(
        Kind::Ours,
        dir("oscar-ours"),
        "@oscar:example.org",
        "OSCAROURS",
    );
    let mut used = erin_keys.clone().into_iter();
    batch.push(
        "matrix-sdk-crypto, pre-key message on a one-time key already used",
        Expect::Failed(FailureReason::UnknownOneTimeKey),
        both(&mut receivers, |r| {
            dave.encrypt(
                &with_one_time_key(&r.cli.body, &used.next().unwrap()),
                json!({}),
                1,
            )
            .remove(0)
        }),
    );
    let mut used = alice_keys.clone().into_iter();
    batch.push(
        "our crate, pre-key message on a one-time key already used",
        Expect::Failed(FailureReason::UnknownOneTimeKey),
        both(&mut receivers, |r| {
            oscar
                .encrypt(
                    &with_one_time_key(&r.cli.body, &used.next().unwrap()),
                    json!({}),
                    1,
                )
                .remove(0)
        }),
    );
    report.deliver(
        "3 normal + corpus",
        [&receivers[0].cli, &receivers[1].cli],
        &batch,
        Some(&keys_query_body),
    );

    // 3b. The documented differences, in a batch of their own so that step 3's analytics compare.
    let mut batch = Batch::default();
    let duplicate = both(&mut receivers, |r| alice_normal(r, "3b"));
    batch.push(
        "matrix-sdk-crypto, normal message",
        Expect::Decrypted,
        duplicate.clone(),
    );
    batch.push_with(
        "the same event again in the same batch",
        Expect::Decrypted,
        Difference::DuplicateInBatch,
        duplicate,
    );
    batch.push_with(
        "ciphertext for two devices, ours not the first entry",
        Expect::Decrypted,
        Difference::FirstCiphertextEntryOnly,
        both(&mut receivers, |r| {
            let p = erin.plaintext(&r.cli.body, TEST_TYPE, json!({ "two": true }), true);
            let event = erin.encrypt(&r.cli.body, p.to_string().as_bytes());
            // Base64 '+' sorts before every other character, so this entry comes first.
            with_content(event, |c| {
                let ours = c["ciphertext"]
                    .as_object()
                    .unwrap()
                    .values()
                    .next()
                    .unwrap()
                    .clone();
                c["ciphertext"]
                    .as_object_mut()
                    .unwrap()
                    .insert(format!("{}A", "+".repeat(42)), ours);
            })
        }),
    );
    report.deliver(
        "3b documented differences",
        [&receivers[0].cli, &receivers[1].cli],
        &batch,
        None,
    );

    // 4. Redelivery in a later batch (the server resends, the app retries).
    let mut batch = Batch::default();
    batch.push(
        "redelivered normal message",
        Expect::Failed(FailureReason::ReplayedMessage),
        alice_3,
    );
    batch.push(
        "redelivered pre-key message",
        Expect::Failed(FailureReason::ReplayedMessage),
        erin_first,
    );
    batch.push(
        "redelivered failed event",
        Expect::Failed(FailureReason::SessionWedged),
        tampered,
    );

    report.deliver(
        "4 redelivery",
        [&receivers[0].cli, &receivers[1].cli],
        &batch,
        None,
    );
    let mut batch = Batch::default();
    batch.push_with(
        "redelivered event that decrypted but failed a plaintext check",
        Expect::Failed(FailureReason::ReplayedMessage),
        Difference::NoHashForPlaintextFailures,
        forged_sender,
    );
    report.deliver(
        "4b documented difference",
        [&receivers[0].cli, &receivers[1].cli],
        &batch,
        None,
    );

    // 5. Restored backups: from before any session, and from before the receivers replied.
    for (step, backups, expect) in [
        (
            "5 backup without sessions",
            &before_any_session,
            FailureReason::MissingSession,
        ),
        (
            "5 backup before the reply",
            &after_first_messages,
            FailureReason::SessionWedged,
        ),
    ] {
        let mut batch = Batch::default();
        batch.push(
            "matrix-sdk-crypto, normal message",
            Expect::Failed(expect),
            both(&mut receivers, |r| alice_normal(r, step)),
        );
        batch.push(
            "our crate, normal message",
            Expect::Failed(expect),
            both(&mut receivers, |r| carol_normal(r, step)),
        );
        // A backup is restored once: copy it, so that each step starts from the backup itself.
        let restored = backups.clone().map(|b| {
            let copy = PathBuf::from(format!("{}-restored-{}", b.dir.display(), step.len()));
            b.snapshot(copy)
        });
        report.deliver(step, [&restored[0], &restored[1]], &batch, None);
    }

    // Coverage: every name but Store came out of the SDK.
    let missing: Vec<_> = FailureReason::ALL
        .iter()
        .filter(|r| **r != FailureReason::Store)
        .filter(|r| !report.sdk_names.contains_key(r.analytics_name()))
        .collect();
    let table = format!(
        "| step | event | ours | patched matrix-sdk-crypto |\n|---|---|---|---|\n{}\n",
        report.rows.join("\n")
    );
    println!("{table}");
    println!(
        "documented differences:\n  {}",
        report.differences.join("\n  ")
    );
    println!("{} events compared", report.compared);
    assert!(
        missing.is_empty(),
        "names the SDK never produced: {missing:?}"
    );
    check_coverage_file(&report);
    check_docs_table(&table);
}

/// docs/UPSTREAM.md carries the table between markers; `TDC_BLESS=1` rewrites it.
fn check_docs_table(table: &str) {
    const START: &str = "<!-- comparison-table:start (generated by upstream/sdk-olm/tests/compare.rs; scripts/upstream.sh --bless) -->\n";
    const END: &str = "<!-- comparison-table:end -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/UPSTREAM.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (Some(start), Some(end)) = (text.find(START), text.find(END)) else {
        panic!("{} lacks the comparison-table markers", path.display());
    };
    let start = start + START.len();
    if std::env::var_os("TDC_BLESS").is_some() && text[start..end] != *table {
        std::fs::write(&path, format!("{}{table}{}", &text[..start], &text[end..])).unwrap();
        return;
    }
    assert!(
        text[start..end] == *table,
        "the comparison table in {} is stale: run `scripts/upstream.sh --bless`. Observed:\n{table}",
        path.display()
    );
}

/// A reply from `receiver` to the device of `sender_body`, on the session the sender opened.
fn reply(receiver: &Cli, sender_body: &Value) -> Vec<Value> {
    let device_only = json!({ "device_keys": sender_body["device_keys"], "one_time_keys": {} });
    let events = receiver.encrypt(&device_only, json!({ "reply": true }), 1);
    assert_eq!(
        message_type(&events[0]),
        1,
        "{:?} replies on the sender's session",
        receiver.kind
    );
    events
}

/// How the patched SDK hands each failure to the app: as `UnableToDecrypt` with a
/// `failure_reason`, or as `Invalid` with an item on the failure stream (patch 0004).
fn sdk_path(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::MalformedEvent
        | FailureReason::MissingSenderKey
        | FailureReason::MalformedCiphertext => "`Invalid` + stream",
        _ => "`UnableToDecrypt` + `failure_reason`",
    }
}

/// `coverage.json`: per failure name, how the patched SDK surfaces it and how many compared events
/// it failed with it. The README's failure table is generated from it.
fn check_coverage_file(report: &Report) {
    let mut coverage = serde_json::Map::new();
    for reason in FailureReason::ALL {
        let name = reason.analytics_name();
        let cell = match report.sdk_names.get(name) {
            Some(1) => format!("{} (1 event)", sdk_path(reason)),
            Some(n) => format!("{} ({n} events)", sdk_path(reason)),
            None if reason == FailureReason::Store => {
                "`UnableToDecrypt` + `failure_reason` on a store error; not compared (no fault injection)"
                    .to_owned()
            }
            None => "not produced".to_owned(),
        };
        coverage.insert(name.to_owned(), json!(cell));
    }
    let text = serde_json::to_string_pretty(&Value::Object(coverage)).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("coverage.json");
    if std::env::var_os("TDC_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        committed,
        text,
        "{} is stale: run `scripts/upstream.sh --bless`",
        path.display()
    );
}
