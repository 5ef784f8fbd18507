//! sdk-olm on its own: the key bookkeeping, the input shapes, the output of events the SDK
//! rejects, the analytics file and the errors. (The comparison with our CLI is in compare.rs.)

mod support;

use serde_json::{json, Value};
use support::*;

fn keys(store: &str, extra: &[&str]) -> Value {
    let mut args = vec!["keys", "--store", store];
    args.extend_from_slice(extra);
    serde_json::from_str(run(&sdk_olm(), &args, "").trim()).unwrap()
}

#[test]
fn keys_creates_the_device_once_and_publishes_each_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("bob");
    let store = store.to_str().unwrap();

    let first = keys(
        store,
        &["--user-id", "@bob:example.org", "--device-id", "BOBDEV"],
    );
    assert_eq!(first["device_keys"]["user_id"], "@bob:example.org");
    assert_eq!(first["device_keys"]["device_id"], "BOBDEV");
    assert!(first["device_keys"]["signatures"]["@bob:example.org"]["ed25519:BOBDEV"].is_string());
    assert_eq!(one_time_keys(&first).len(), 25);
    for (id, key) in one_time_keys(&first) {
        assert!(id.starts_with("signed_curve25519:"), "{id}");
        assert!(key["signatures"]["@bob:example.org"]["ed25519:BOBDEV"].is_string());
    }
    assert_eq!(first["fallback_keys"].as_object().unwrap().len(), 1);

    // Published keys are not printed again; the device keys always are.
    let again = keys(store, &[]);
    assert_eq!(again["device_keys"], first["device_keys"]);
    assert!(
        again["one_time_keys"]
            .as_object()
            .is_none_or(|k| k.is_empty()),
        "{again}"
    );

    let more = keys(store, &["--one-time-keys", "3"]);
    let new_keys = one_time_keys(&more);
    assert_eq!(new_keys.len(), 3);
    assert!(new_keys.iter().all(|k| !one_time_keys(&first).contains(k)));

    let (ok, _, stderr) = run_status(
        &sdk_olm(),
        &[
            "keys",
            "--store",
            store,
            "--user-id",
            "@mallory:example.org",
        ],
        "",
    );
    assert!(!ok);
    assert!(
        stderr.contains("belongs to user id @bob:example.org, not @mallory:example.org"),
        "{stderr}"
    );
}

/// Alice (an sdk-olm device) and Bob's keys, and `count` events from Alice to Bob.
fn alice_to_bob(tmp: &std::path::Path, count: usize) -> (String, Vec<Value>) {
    let bob = tmp.join("bob");
    let bob_keys = keys(bob.to_str().unwrap(), &["--user-id", "@bob:example.org"]);
    let alice = tmp.join("alice");
    keys(
        alice.to_str().unwrap(),
        &["--user-id", "@alice:example.org"],
    );
    let keys_file = tmp.join("bob.keys.json");
    std::fs::write(&keys_file, bob_keys.to_string()).unwrap();
    let out = run(
        &sdk_olm(),
        &[
            "encrypt",
            "--store",
            alice.to_str().unwrap(),
            "--recipient-keys",
            keys_file.to_str().unwrap(),
            "--type",
            TEST_TYPE,
            "--content",
            r#"{"hello":"bob"}"#,
            "--count",
            &count.to_string(),
        ],
        "",
    );
    let events: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    (bob.to_str().unwrap().to_owned(), events)
}

#[test]
fn decrypt_reads_a_sync_response_and_json_lines_and_writes_what_the_policy_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let (bob, events) = alice_to_bob(tmp.path(), 3);
    let analytics = tmp.path().join("analytics.jsonl");
    let analytics_arg = analytics.to_str().unwrap();

    let sync = json!({ "next_batch": "s1", "to_device": { "events": events[..2] } });
    let out = lines(&run(
        &sdk_olm(),
        &[
            "decrypt",
            "--store",
            &bob,
            "--analytics-out",
            analytics_arg,
            "-",
        ],
        &sync.to_string(),
    ));
    assert_eq!(out.len(), 2);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["result"], "decrypted");
        assert_eq!(line["type"], TEST_TYPE);
        assert_eq!(line["sender"], "@alice:example.org");
        assert_eq!(line["content"], json!({ "hello": "bob", "seq": i }));
        assert_eq!(line["sender_device_verified"], true);
    }
    assert!(!analytics.exists() || std::fs::read_to_string(&analytics).unwrap().is_empty());

    // JSON lines, one of them not JSON, one an unreadable plaintext event, two replays.
    let input = format!(
        "{}\nnot json\n{}\n{}\n{}\n",
        events[2],
        json!({ "type": "m.room_key_request", "sender": "@alice:example.org", "content": { "action": 7 } }),
        events[0],
        events[1],
    );
    let out = lines(&run(
        &sdk_olm(),
        &["decrypt", "--store", &bob, "--analytics-out", analytics_arg],
        &input,
    ));
    let summary: Vec<(String, Value)> = out
        .iter()
        .map(|l| (l["result"].as_str().unwrap().to_owned(), l["name"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("decrypted".to_owned(), Value::Null),
            (
                "failed".to_owned(),
                json!("ToDeviceFailedToDecrypt_MalformedEvent")
            ),
            ("invalid".to_owned(), Value::Null),
            (
                "failed".to_owned(),
                json!("ToDeviceFailedToDecrypt_ReplayedMessage")
            ),
            (
                "failed".to_owned(),
                json!("ToDeviceFailedToDecrypt_ReplayedMessage")
            ),
        ]
    );
    assert!(
        out[3]["error"].as_str().unwrap().contains("replayed"),
        "{}",
        out[3]
    );
    // The policy reports one replay per sender key per hour, and knows nothing of the line that
    // never reached the SDK.
    let payloads = std::fs::read_to_string(&analytics).unwrap();
    assert_eq!(
        payloads,
        "{\"event\":\"Error\",\"properties\":{\"domain\":\"TO_DEVICE\",\"name\":\"ToDeviceFailedToDecrypt_ReplayedMessage\",\"cryptoSDK\":\"Rust\"}}\n"
    );
}

#[test]
fn bad_input_and_arguments_fail_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    let store = store.to_str().unwrap();
    let not_keys = tmp.path().join("not-keys.json");
    std::fs::write(&not_keys, "{}").unwrap();
    for (args, stdin, message) in [
        (vec!["frobnicate"], "", "unknown command `frobnicate`"),
        (vec!["decrypt"], "", "--store is required"),
        (vec!["decrypt", "--store", store], "", "the input is empty"),
        (
            vec!["decrypt", "--store", store],
            r#"{"rooms":{}}"#,
            "without `to_device.events`",
        ),
        (
            vec!["decrypt", "--store", store, "/nonexistent/input.json"],
            "",
            "cannot read input /nonexistent/input.json",
        ),
        (
            vec![
                "encrypt",
                "--store",
                store,
                "--recipient-keys",
                not_keys.to_str().unwrap(),
                "--type",
                "t",
                "--content",
                "{}",
            ],
            "",
            "is not a /keys/upload body",
        ),
        (
            vec!["keys", "--store", store, "--one-time-keys", "51"],
            "",
            "an Olm account holds at most 50",
        ),
    ] {
        let (ok, _, stderr) = run_status(&sdk_olm(), &args, stdin);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn encrypt_claims_a_one_time_key_only_without_a_session() {
    let tmp = tempfile::tempdir().unwrap();
    let bob = tmp.path().join("bob");
    let bob_keys = keys(
        bob.to_str().unwrap(),
        &["--user-id", "@bob:example.org", "--one-time-keys", "1"],
    );
    let keys_file = tmp.path().join("bob.keys.json");
    std::fs::write(&keys_file, bob_keys.to_string()).unwrap();
    let without_keys = tmp.path().join("bob.device-keys.json");
    std::fs::write(
        &without_keys,
        json!({ "device_keys": bob_keys["device_keys"], "one_time_keys": {} }).to_string(),
    )
    .unwrap();
    let encrypt = |store: &str, keys: &std::path::Path| {
        run_status(
            &sdk_olm(),
            &[
                "encrypt",
                "--store",
                tmp.path().join(store).to_str().unwrap(),
                "--recipient-keys",
                keys.to_str().unwrap(),
                "--type",
                TEST_TYPE,
                "--content",
                "{}",
            ],
            "",
        )
    };
    // Without a session and without a one-time key there is nothing to encrypt with.
    let (ok, _, stderr) = encrypt("alice", &without_keys);
    assert!(!ok);
    assert!(
        stderr.contains("no one-time key in the keys file"),
        "{stderr}"
    );
    // The first run claims Bob's only one-time key; later runs reuse the session.
    let (ok, out, stderr) = encrypt("alice", &keys_file);
    assert!(ok, "{stderr}");
    let first: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    let (ok, out, stderr) = encrypt("alice", &without_keys);
    assert!(ok, "{stderr}");
    let second: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    // Another device given the same key, as a server handing it out twice: Bob fails it.
    let (ok, out, _) = encrypt("carol", &keys_file);
    assert!(ok);
    let carol: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    let out = lines(&run(
        &sdk_olm(),
        &["decrypt", "--store", bob.to_str().unwrap()],
        &json!([first[0], second[0], carol[0]]).to_string(),
    ));
    assert_eq!(out[0]["result"], "decrypted", "{}", out[0]);
    assert_eq!(out[1]["result"], "decrypted", "{}", out[1]);
    assert_eq!(out[2]["name"], "ToDeviceFailedToDecrypt_UnknownOneTimeKey");
}
