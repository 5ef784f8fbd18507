//! The CLI for an engineer debugging "Unable to decrypt" (issue 20, items 8 and 9): why no
//! session recovery happened, "no unsent requests", failed lines that say who sent what,
//! `explain NAME`, `info --store DIR`, and help texts that do not contradict themselves.

mod cli_common;

use std::time::{Duration, Instant};

use cli_common::*;
use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::{parse_keys_upload_body, PublishedKeys};
use to_device_crypto::simulator::{tamper_with_body, Recipient, SimulatedDevice};
use to_device_crypto::FailureReason;

const MALLORY: &str = "@mallory:example.org";
const CAROL: &str = "@carol:example.net";

fn bob_published(cast: &Cast) -> PublishedKeys {
    parse_keys_upload_body(
        &serde_json::from_str(&std::fs::read_to_string(&cast.bob_keys).unwrap()).unwrap(),
    )
    .unwrap()
}

/// A simulated device with a session to Bob on his `otk`-th one-time key.
fn peer(cast: &Cast, user: &str, device: &str, otk: usize) -> (SimulatedDevice, Recipient) {
    let keys = bob_published(cast);
    let mut peer = SimulatedDevice::new(user, device);
    let to_bob = peer.create_session(&keys, Some(keys.one_time_keys[otk].key));
    (peer, to_bob)
}

fn room_key(n: usize) -> Value {
    json!({"room_id": "!r:example.org", "n": n})
}

fn as_input(events: &[Value]) -> String {
    Value::Array(events.to_vec()).to_string()
}

/// Bob decrypts; returns the lines and stderr.
fn bob_decrypts(cast: &Cast, input: &str, extra: &[&str]) -> (Vec<Value>, String) {
    let mut args = vec!["decrypt", "--store", path(&cast.bob)];
    args.extend_from_slice(extra);
    args.push("-");
    let output = run(&args, input);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}");
    (lines(&String::from_utf8(output.stdout).unwrap()), stderr)
}

#[test]
fn a_failure_from_an_unknown_device_says_why_no_session_was_requested() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let (mut mallory, to_bob) = peer(&cast, MALLORY, "MALLORYDEV", 0);
    // Without `sender_device_keys`: a device identified by them is remembered for recovery, and
    // this test is about a device Bob cannot know at all.
    let plaintext = mallory.plaintext(&to_bob, "m.room_key", room_key(0), false);
    let first = mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes());
    let plaintext = mallory.plaintext(&to_bob, "m.room_key", room_key(1), false);
    let wedged = tamper_with_body(mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes()));
    let requests_out = dir.path().join("requests.jsonl");
    let (out, stderr) = bob_decrypts(
        &cast,
        &as_input(&[first, wedged.clone()]),
        &["--requests-out", path(&requests_out)],
    );
    assert_eq!(out[0]["result"], "decrypted");
    assert_eq!(out[1]["name"], "ToDeviceFailedToDecrypt_SessionWedged");
    let mallory_key = mallory.curve25519_key().to_base64();
    let hint = stderr
        .lines()
        .find(|line| line.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no hint: {stderr}"));
    for expected in [
        MALLORY,
        mallory_key.as_str(),
        "SessionWedged",
        "does not know",
        "--device-keys",
    ] {
        assert!(hint.contains(expected), "{expected:?} missing: {hint}");
    }
    assert_eq!(std::fs::read_to_string(&requests_out).unwrap(), "");

    // `requests` says that there is nothing to send (stdout stays JSON lines: empty).
    let output = run(&["requests", "--store", path(&cast.bob)], "");
    assert!(output.status.success());
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no unsent requests"));

    // Following the hint: the device's keys (a bare signed device-keys object, next to another
    // device's /keys/upload body) and the same event again. Now a claim is queued, and said so.
    let mallory_file = dir.path().join("mallory-device.json");
    std::fs::write(&mallory_file, mallory.device_keys().to_string()).unwrap();
    let (out, stderr) = bob_decrypts(
        &cast,
        &as_input(&[wedged]),
        &[
            "--device-keys",
            path(&cast.alice_keys),
            "--device-keys",
            path(&mallory_file),
            "--requests-out",
            path(&requests_out),
        ],
    );
    assert_eq!(out[0]["name"], "ToDeviceFailedToDecrypt_SessionWedged");
    let requests = lines(&std::fs::read_to_string(&requests_out).unwrap());
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0]["body"],
        json!({"one_time_keys": {MALLORY: {"MALLORYDEV": "signed_curve25519"}}})
    );
    assert!(!stderr.contains("hint: "), "{stderr}");
    assert!(
        stderr.contains("note: ") && stderr.contains(requests[0]["request_id"].as_str().unwrap()),
        "{stderr}"
    );
    let listed = lines(&ok(&["requests", "--store", path(&cast.bob)], ""));
    assert_eq!(listed, requests);
}

/// The keys of each kind of line, in the documented order (README, "The CLI").
const DECRYPTED_KEYS: [&str; 10] = [
    "content",
    "id",
    "index",
    "pending",
    "result",
    "sender",
    "sender_device_id",
    "sender_device_verified",
    "sender_key",
    "type",
];
const FAILED_KEYS: [&str; 7] = [
    "error",
    "index",
    "name",
    "result",
    "sender",
    "sender_key",
    "type",
];
const PLAINTEXT_KEYS: [&str; 5] = ["content", "index", "result", "sender", "type"];

/// The top-level keys of a JSON object line, in the order they appear in the text.
fn keys_in_order(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0;
    let mut chars = line.char_indices().peekable();
    let mut in_string = false;
    let mut start = 0;
    while let Some((i, c)) = chars.next() {
        match (in_string, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => {
                in_string = false;
                if depth == 1 && line[i + 1..].starts_with(':') {
                    keys.push(line[start..i].to_owned());
                }
            }
            (true, _) => {}
            (false, '"') => {
                in_string = true;
                start = i + 1;
            }
            (false, '{' | '[') => depth += 1,
            (false, '}' | ']') => depth -= 1,
            _ => {}
        }
    }
    keys
}

#[test]
fn failed_lines_say_who_sent_what_and_every_line_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let (mut mallory, to_bob) = peer(&cast, MALLORY, "MALLORYDEV", 0);
    let good = mallory.encrypt(&to_bob, "m.room_key", room_key(0));
    // Decrypts, then fails a check: the decrypted type is known.
    let mut plaintext = mallory.plaintext(&to_bob, "m.forwarded_room_key", room_key(1), true);
    plaintext["recipient"] = json!("@someone-else:example.org");
    let misdirected = mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes());
    // Fails before decryption: who sent it is known, what it is is not.
    let mut megolm = mallory.encrypt(&to_bob, "m.room_key", room_key(2));
    megolm["content"]["algorithm"] = json!("m.megolm.v1.aes-sha2");
    let plain = json!({"type": "m.dummy", "sender": MALLORY, "content": {}});
    let input = as_input(&[good.clone(), misdirected, megolm, plain, good]);
    let output = run(&["decrypt", "--store", path(&cast.bob), "-"], &input);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let out = lines(&text);
    let mallory_key = mallory.curve25519_key().to_base64();

    assert_eq!(
        out[1]["name"],
        "ToDeviceFailedToDecrypt_MismatchedRecipient"
    );
    assert_eq!(out[1]["sender"], MALLORY);
    assert_eq!(out[1]["sender_key"], mallory_key.as_str());
    assert_eq!(out[1]["type"], "m.forwarded_room_key");
    assert_eq!(
        out[2]["name"],
        "ToDeviceFailedToDecrypt_UnsupportedAlgorithm"
    );
    assert_eq!(out[2]["sender"], MALLORY);
    assert_eq!(out[2]["type"], Value::Null);
    // The same message twice in one batch: the second is the first's result again, same id.
    assert_eq!(out[4]["id"], out[0]["id"]);
    assert_eq!(
        (out[0]["pending"].clone(), out[4]["pending"].clone()),
        (json!(false), json!(true))
    );

    let raw: Vec<&str> = text.lines().collect();
    assert_eq!(keys_in_order(raw[0]), DECRYPTED_KEYS);
    assert_eq!(keys_in_order(raw[1]), FAILED_KEYS);
    assert_eq!(keys_in_order(raw[2]), FAILED_KEYS);
    assert_eq!(keys_in_order(raw[3]), PLAINTEXT_KEYS);
    assert_eq!(keys_in_order(raw[4]), DECRYPTED_KEYS);
}

#[test]
fn explain_prints_each_name_from_the_taxonomy() {
    for reason in FailureReason::ALL {
        let info = reason.info();
        let full = ok(&["explain", reason.analytics_name()], "");
        for part in [
            info.analytics_name,
            info.when,
            info.typical_root_cause,
            info.what_to_check,
        ] {
            assert!(
                full.contains(part),
                "{reason}: {part:?} missing from {full}"
            );
        }
        assert_eq!(ok(&["explain", reason.as_str()], ""), full);
        assert_eq!(ok(&["explain", &reason.as_str().to_lowercase()], ""), full);
        assert_eq!(
            full.contains("A new Olm session fixes it"),
            reason.needs_new_session(),
            "{full}"
        );
    }
    let listed = ok(&["explain"], "");
    assert_eq!(listed.lines().count(), FailureReason::ALL.len());
    for (line, reason) in listed.lines().zip(FailureReason::ALL) {
        assert!(line.starts_with(reason.analytics_name()), "{line}");
    }
    // An unknown name is a usage error that lists the valid names.
    let output = run(&["explain", "Wedged"], "");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for reason in FailureReason::ALL {
        assert!(stderr.contains(reason.as_str()), "{stderr}");
    }
}

fn snapshot(store: &std::path::Path) -> (Vec<String>, Vec<u8>) {
    (
        entries(store),
        std::fs::read(store.join("store.sqlite3")).unwrap(),
    )
}

#[test]
fn info_shows_what_the_store_holds_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    // Alice, known from her /keys/upload body: three events.
    let (out, _) = bob_decrypts(
        &cast,
        &cast.alice_to_bob(3, "known"),
        &["--device-keys", path(&cast.alice_keys)],
    );
    assert!(out.iter().all(|l| l["result"] == "decrypted"));
    // Carol, unknown: one event.
    let (mut carol, to_bob) = peer(&cast, CAROL, "CAROLDEV", 1);
    bob_decrypts(
        &cast,
        &as_input(&[carol.encrypt(&to_bob, "m.room_key", room_key(0))]),
        &[],
    );
    // Mallory, made known afterwards: one event, one wedged message, a queued claim.
    let (mut mallory, to_bob) = peer(&cast, MALLORY, "MALLORYDEV", 2);
    let wedged = tamper_with_body(mallory.encrypt(&to_bob, "m.room_key", room_key(1)));
    bob_decrypts(
        &cast,
        &as_input(&[
            mallory.encrypt(&to_bob, "m.room_key", room_key(0)),
            wedged.clone(),
        ]),
        &[],
    );
    let mallory_file = dir.path().join("mallory-device.json");
    std::fs::write(&mallory_file, mallory.keys_query_response().to_string()).unwrap();
    bob_decrypts(
        &cast,
        &as_input(&[wedged]),
        &["--device-keys", path(&mallory_file)],
    );
    // Two results printed but never acknowledged.
    let mut command = command(&["decrypt", "--store", path(&cast.bob), "-"]);
    command.env("TDC_FAIL_POINT", "after_print");
    let output = output_of(command, cast.alice_to_bob(2, "pending").as_bytes());
    let pending_ids: Vec<Value> = lines(&String::from_utf8(output.stdout).unwrap())
        .iter()
        .map(|l| l["id"].clone())
        .collect();
    assert_eq!(pending_ids.len(), 2);
    let requests = lines(&ok(&["requests", "--store", path(&cast.bob)], ""));
    assert_eq!(requests.len(), 1);

    let before = snapshot(&cast.bob);
    // Another process holds the store's write lock: info does not wait for it.
    let lock = std::fs::File::options()
        .write(true)
        .open(cast.bob.join("store.sqlite3.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let started = Instant::now();
    let info: Value =
        serde_json::from_str(&ok(&["info", "--json", "--store", path(&cast.bob)], "")).unwrap();
    let text = ok(&["info", "--store", path(&cast.bob)], "");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "info waited for the write lock"
    );
    drop(lock);
    assert_eq!(snapshot(&cast.bob), before, "info changed the store");

    let bob_keys: Value =
        serde_json::from_str(&std::fs::read_to_string(&cast.bob_keys).unwrap()).unwrap();
    let bob_curve = bob_keys["device_keys"]["keys"]["curve25519:BOBDEV"].clone();
    assert_eq!(info["user_id"], BOB);
    assert_eq!(info["device_id"], "BOBDEV");
    assert_eq!(info["curve25519"], bob_curve);
    assert_eq!(
        info["ed25519"],
        bob_keys["device_keys"]["keys"]["ed25519:BOBDEV"]
    );
    assert_eq!(info["device_keys_published"], true);
    let known: Vec<&str> = info["known_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(known.len(), 2, "{known:?}");
    assert!(known.contains(&"ALICEDEV") && known.contains(&"MALLORYDEV"));
    let sessions = info["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    let session_of = |key: &str| sessions.iter().find(|s| s["sender_key"] == key).unwrap();
    let alice = session_of(&cast.alice_curve25519());
    assert_eq!(
        (alice["user_id"].clone(), alice["sessions"].clone()),
        (json!(ALICE), json!(1))
    );
    let carol_sessions = session_of(&carol.curve25519_key().to_base64());
    assert_eq!(carol_sessions["user_id"], Value::Null, "an unknown device");
    assert_eq!(
        session_of(&mallory.curve25519_key().to_base64())["device_id"],
        "MALLORYDEV"
    );
    let total = &info["reporting"]["total"];
    assert_eq!(total["decrypted"], 3 + 1 + 1 + 2);
    assert_eq!(total["failures"]["SessionWedged"]["seen"], 2);
    let pending: Vec<Value> = info["pending_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    assert_eq!(pending, pending_ids);
    assert_eq!(info["requests"], Value::Array(requests.clone()));

    for expected in [
        bob_curve.as_str().unwrap(),
        "@alice:example.org ALICEDEV",
        "unknown device",
        "ToDeviceFailedToDecrypt_SessionWedged",
        pending_ids[0].as_str().unwrap(),
        requests[0]["request_id"].as_str().unwrap(),
        "keys_claim for @mallory:example.org MALLORYDEV",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
}

#[test]
fn help_texts_do_not_contradict_themselves() {
    for command in [
        "demo", "keys", "decrypt", "requests", "encrypt", "info", "explain", "schema",
    ] {
        let help = ok(&[command, "--help"], "");
        for line in help.lines() {
            let lower = line.to_lowercase();
            assert!(
                !(lower.contains("required") && lower.contains("default")),
                "`{command} --help` says both required and default: {line}"
            );
        }
    }
    let help = ok(&["requests", "--help"], "");
    let mark_sent = help
        .lines()
        .find(|line| line.trim_start().starts_with("--mark-sent"))
        .unwrap();
    assert!(mark_sent.contains("--response FILE"), "{mark_sent}");
}
