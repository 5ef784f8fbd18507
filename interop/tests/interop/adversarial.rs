//! Scenario 4: Adversarial inputs: mutated copies of the reference's events, and plaintexts crafted with
//! raw vodozemac (our `SimulatedDevice`), are classified with our analytics names; the same
//! mutation of an event for the reference is fed to the reference, and what it returns is
//! recorded next to ours (written to `adversarial-table.md` in the test's temp dir and printed;
//! docs/INTEROP.md carries a copy).
//!
//! Every mutation is applied to a fresh event that is never delivered intact (except for the
//! replay cases).

use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::PublishedKeys;
use to_device_crypto::simulator::{tamper_with_body, SimulatedDevice};
use to_device_crypto::ToDeviceOutcome;
use to_device_crypto_interop::RefOutcome;

use crate::common::*;

struct Row {
    case: &'static str,
    ours: String,
    reference: String,
    reference_log: String,
}

fn ours_label(outcome: &ToDeviceOutcome) -> String {
    match outcome {
        ToDeviceOutcome::Decrypted(e) if e.re_emitted => "Decrypted (re_emitted: true)".to_owned(),
        ToDeviceOutcome::Decrypted(_) => "Decrypted".to_owned(),
        ToDeviceOutcome::Plaintext(_) => "Plaintext".to_owned(),
        ToDeviceOutcome::Failed(f) => f.error.reason().analytics_name().to_owned(),
    }
}

/// The reference's log, reduced to what names the failure: the message of each WARN/ERROR line
/// without the span prefix and fields that hold random keys or ids.
fn log_summary(lines: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    for line in lines {
        let message = line.rsplit_once("}: ").map(|(_, m)| m).unwrap_or(line);
        let message = message
            .trim_start_matches("WARN ")
            .trim_start_matches("ERROR ");
        // Keep the error text (`error=...`) but drop key material and ids.
        let short: String = message
            .split_whitespace()
            .filter(|w| {
                !(w.starts_with("sender_key=")
                    || w.starts_with("session_id")
                    || w.starts_with("sender=")
                    || w.starts_with("message_id")
                    || w.starts_with("event_type="))
            })
            .collect::<Vec<_>>()
            .join(" ");
        let short = redact(&short);
        if !out.contains(&short) {
            out.push(short);
        }
    }
    out.join(" / ")
}

/// Replaces key material and session ids (runs of 40+ base64 characters) with `…`, and drops
/// serde_json's ` at line L column C` positions, so that the table is the same on every run.
fn redact(text: &str) -> String {
    let text = match text.find(" at line ") {
        Some(at) if text[at..].contains(" column ") => {
            let rest = &text[at + 9..];
            let end = rest
                .find(" column ")
                .map(|c| c + 8)
                .map(|c| {
                    c + rest[c..]
                        .find(|ch: char| !ch.is_ascii_digit())
                        .unwrap_or(rest.len() - c)
                })
                .unwrap_or(rest.len());
            format!("{}{}", &text[..at], &rest[end..])
        }
        _ => text.to_owned(),
    };
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once('\0')) {
        if is_b64(c) {
            run.push(c);
            continue;
        }
        if run.len() >= 40 {
            out.push('…');
        } else {
            out.push_str(&run);
        }
        run.clear();
        if c != '\0' {
            out.push(c);
        }
    }
    out
}

fn rekey_ciphertext(mut event: Value, to: &str) -> Value {
    let map = event["content"]["ciphertext"].as_object_mut().unwrap();
    let (_, entry) = map
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    map.clear();
    map.insert(to.to_owned(), entry);
    event
}

fn set_body(mut event: Value, body: &str) -> Value {
    let map = event["content"]["ciphertext"].as_object_mut().unwrap();
    for entry in map.values_mut() {
        entry["body"] = json!(body);
    }
    event
}

type Mutation = fn(Value, &str) -> Value;

fn envelope_mutations() -> Vec<(&'static str, Mutation, &'static str)> {
    vec![
        (
            "tampered body (last byte flipped)",
            |e, _| tamper_with_body(e),
            "ToDeviceFailedToDecrypt_SessionWedged",
        ),
        (
            "foreign algorithm (m.megolm.v1.aes-sha2)",
            |mut e, _| {
                e["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
                e
            },
            "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
        ),
        (
            "ciphertext keyed for another device's key",
            |e, other| rekey_ciphertext(e, other),
            "ToDeviceFailedToDecrypt_MissingCiphertext",
        ),
        (
            "envelope sender changed (@mallory)",
            |mut e, _| {
                e["sender"] = json!("@mallory:example.org");
                e
            },
            "ToDeviceFailedToDecrypt_MismatchedSender",
        ),
        (
            "body not base64",
            |e, _| set_body(e, "not base64!*"),
            "ToDeviceFailedToDecrypt_MalformedCiphertext",
        ),
        (
            "sender_key missing",
            |mut e, _| {
                e["content"].as_object_mut().unwrap().remove("sender_key");
                e
            },
            "ToDeviceFailedToDecrypt_MissingSenderKey",
        ),
    ]
}

/// A crafted plaintext: (case, how to change a correct plaintext — `None` means "not JSON",
/// expected name at ours).
type Craft = Option<fn(&mut Value, &SimulatedDevice)>;

fn crafted_cases() -> Vec<(&'static str, Craft, &'static str)> {
    vec![
        (
            "crafted: recipient is another user",
            Some(|p, _| p["recipient"] = json!("@someone-else:example.org")),
            "ToDeviceFailedToDecrypt_MismatchedRecipient",
        ),
        (
            "crafted: recipient_keys.ed25519 of another device",
            Some(|p, _| {
                p["recipient_keys"]["ed25519"] = json!(SimulatedDevice::new("@x:example.org", "X")
                    .ed25519_key()
                    .to_base64())
            }),
            "ToDeviceFailedToDecrypt_MismatchedKeys",
        ),
        (
            "crafted: plaintext not JSON",
            None,
            "ToDeviceFailedToDecrypt_JsonError",
        ),
        (
            "crafted: sender_device_keys with a bad signature",
            Some(|p, _| {
                let sigs = p["sender_device_keys"]["signatures"]
                    .as_object_mut()
                    .unwrap();
                let by_user = sigs.values_mut().next().unwrap().as_object_mut().unwrap();
                for sig in by_user.values_mut() {
                    let s = sig.as_str().unwrap();
                    let first = if s.starts_with('A') { "B" } else { "A" };
                    *sig = json!(format!("{first}{}", &s[1..]));
                }
            }),
            "ToDeviceFailedToDecrypt_InvalidSenderDeviceKeys",
        ),
    ]
}

/// Encrypts a crafted plaintext from a fresh simulated device (its own new session, on the
/// one-time key `key_index` of `keys`).
fn crafted_event(keys: &PublishedKeys, key_index: usize, craft: Craft) -> Value {
    let mut carol = SimulatedDevice::new("@carol:example.org", "CAROLDEV");
    let to = carol.create_session(keys, Some(keys.one_time_keys[key_index].key));
    match craft {
        Some(change) => {
            let mut plaintext = carol.plaintext(&to, TEST_TYPE, json!({"crafted": true}), true);
            change(&mut plaintext, &carol);
            carol.encrypt_raw(&to, plaintext.to_string().as_bytes())
        }
        None => carol.encrypt_raw(&to, b"this is not JSON"),
    }
}

#[tokio::test]
async fn mutations_are_classified_and_compared_with_the_reference() {
    let p = pair(true).await;
    // Establish normal messages in both directions.
    let first = p.alice_sends(&[json!({"setup": 0})]).await;
    let out = bob_receives(&p.bob, &first).await;
    decrypted(&out[0]);
    acknowledge(&p.bob, &out).await;
    p.bob_replies().await;
    let other_key = SimulatedDevice::new("@x:example.org", "X")
        .curve25519_key()
        .to_base64();
    let mut rows = Vec::new();

    // Replay: delivered intact, then again before and after acknowledging.
    {
        let theirs = p.alice_sends(&[json!({"case": "replay"})]).await;
        let out = bob_receives(&p.bob, &theirs).await;
        let id = decrypted(&out[0]).id.clone();
        let again = bob_receives(&p.bob, &theirs).await;
        assert!(matches!(&again[0], ToDeviceOutcome::Decrypted(e) if e.re_emitted && e.id == id));
        p.bob.acknowledge(&[id]).await.unwrap();
        let replayed = bob_receives(&p.bob, &theirs).await;
        assert_eq!(
            ours_label(&replayed[0]),
            "ToDeviceFailedToDecrypt_ReplayedMessage"
        );

        let mine = p.bob_sends(&[json!({"case": "replay"})]).await;
        let (first, _) = p.alice.receive_logged(&mine).await;
        assert!(
            matches!(first[..], [RefOutcome::Decrypted { .. }]),
            "{first:?}"
        );
        let (second, log) = p.alice.receive_logged(&mine).await;
        rows.push(Row {
            case: "redelivered before acknowledge",
            ours: ours_label(&again[0]),
            reference: second[0].label(),
            reference_log: log_summary(&log),
        });
        rows.push(Row {
            case: "replay (redelivered after acknowledge)",
            ours: ours_label(&replayed[0]),
            reference: second[0].label(),
            reference_log: log_summary(&log),
        });
    }

    for (case, mutate, expected) in envelope_mutations() {
        let theirs = p.alice_sends(&[json!({"case": case})]).await;
        let out = bob_receives(&p.bob, &[mutate(theirs[0].clone(), &other_key)]).await;
        let ours = ours_label(&out[0]);
        let mine = p.bob_sends(&[json!({"case": case})]).await;
        let (reference, log) = p
            .alice
            .receive_logged(&[mutate(mine[0].clone(), &other_key)])
            .await;
        rows.push(Row {
            case,
            ours,
            reference: reference
                .first()
                .map_or("(dropped)".to_owned(), RefOutcome::label),
            reference_log: log_summary(&log),
        });
        assert_eq!(rows.last().unwrap().ours, expected, "{case}");
    }

    let bob_keys = published(&p.bob_body);
    let alice_keys = published(&p.alice_body);
    for (n, (case, craft, expected)) in crafted_cases().into_iter().enumerate() {
        // One-time keys from the end: the first ones were used by Alice and Bob.
        let at_bob = crafted_event(&bob_keys, bob_keys.one_time_keys.len() - 1 - n, craft);
        let out = bob_receives(&p.bob, &[at_bob]).await;
        let at_alice = crafted_event(&alice_keys, alice_keys.one_time_keys.len() - 1 - n, craft);
        let (reference, log) = p.alice.receive_logged(&[at_alice]).await;
        rows.push(Row {
            case,
            ours: ours_label(&out[0]),
            reference: reference
                .first()
                .map_or("(dropped)".to_owned(), RefOutcome::label),
            reference_log: log_summary(&log),
        });
        assert_eq!(rows.last().unwrap().ours, expected, "{case}");
    }

    // Nothing mutated is accepted by either side (the redelivery before acknowledge is the one
    // intact event, re-emitted by ours and refused by the reference).
    for row in &rows {
        assert!(
            !row.reference.starts_with("Decrypted"),
            "the reference accepted: {}",
            row.case
        );
    }

    let mut table = String::from(
        "| input | ours (analytics name) | matrix-sdk-crypto 0.18: public result | matrix-sdk-crypto 0.18: its log (WARN/ERROR) |\n|---|---|---|---|\n",
    );
    for row in &rows {
        table.push_str(&format!(
            "| {} | `{}` | `{}` | {} |\n",
            row.case,
            row.ours,
            row.reference,
            row.reference_log.replace('|', "\\|")
        ));
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("adversarial-table.md");
    std::fs::write(&path, &table).unwrap();
    println!("{table}\n(written to {})", path.display());
    check_docs(&table);
}

/// docs/INTEROP.md carries the table between markers; `INTEROP_BLESS=1` rewrites it.
fn check_docs(table: &str) {
    const START: &str = "<!-- adversarial-table:start -->\n";
    const END: &str = "<!-- adversarial-table:end -->";
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/INTEROP.md");
    let Ok(text) = std::fs::read_to_string(&docs) else {
        panic!("{} is missing", docs.display());
    };
    let (Some(start), Some(end)) = (text.find(START), text.find(END)) else {
        panic!("{} lacks the adversarial-table markers", docs.display());
    };
    let current = &text[start + START.len()..end];
    if current == table {
        return;
    }
    if std::env::var_os("INTEROP_BLESS").is_some() {
        let updated = format!("{}{table}{}", &text[..start + START.len()], &text[end..]);
        std::fs::write(&docs, updated).unwrap();
    } else {
        panic!(
            "docs/INTEROP.md's adversarial table is stale; run `INTEROP_BLESS=1 cargo test` in interop/ \
             (or scripts/interop.sh --bless). Observed:\n{table}"
        );
    }
}
