//! The CLI end to end, in separate processes: `keys` → another device's `encrypt` → `decrypt`,
//! the demo, and clean errors.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{assert_schema_valid, payload_validator};
use serde_json::Value;
use to_device_crypto::FailureReason;

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let output = run(args, stdin);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?} failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8(output.stdout).unwrap()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn demo_prints_only_schema_valid_payloads_covering_every_non_store_name() {
    let output = run(&["demo"], None);
    assert!(output.status.success());
    let validator = payload_validator();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut names = HashSet::new();
    for line in stdout.lines() {
        assert_schema_valid(&validator, line);
        let value: Value = serde_json::from_str(line).unwrap();
        names.insert(value["properties"]["name"].as_str().unwrap().to_owned());
    }
    for reason in FailureReason::ALL {
        if reason != FailureReason::Store {
            assert!(
                names.contains(reason.analytics_name()),
                "demo lacks {reason}"
            );
        }
    }
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("decrypted"), "{stderr}");
    assert!(
        stderr.contains("ToDeviceFailedToDecrypt_SessionWedged"),
        "{stderr}"
    );
}

#[test]
fn keys_encrypt_decrypt_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let bob_store = dir.path().join("bob");
    let alice_store = dir.path().join("alice");
    let bob_keys = dir.path().join("bob-keys.json");
    let keys = ok(
        &[
            "keys",
            "--store",
            path(&bob_store),
            "--user-id",
            "@bob:example.org",
            "--device-id",
            "BOBDEV",
        ],
        None,
    );
    let body: Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 25);
    std::fs::write(&bob_keys, &keys).unwrap();
    assert!(
        bob_store.join("store.key").exists(),
        "a key file is created on first use"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bob_store.join("store.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let alice_args = [
        "encrypt",
        "--create",
        "--store",
        path(&alice_store),
        "--user-id",
        "@alice:example.org",
        "--device-id",
        "ALICEDEV",
        "--recipient-keys",
        path(&bob_keys),
        "--type",
        "m.room_key",
        "--content",
        r#"{"room_id":"!r:example.org"}"#,
        "--count",
        "20",
    ];
    let events = ok(&alice_args, None);
    let events: Vec<Value> = serde_json::from_str(&events).unwrap();
    assert_eq!(events.len(), 20);

    let input = dir.path().join("events.json");
    std::fs::write(&input, serde_json::to_string(&events).unwrap()).unwrap();
    let analytics = dir.path().join("analytics.jsonl");
    let out = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&bob_store),
            "--analytics-out",
            path(&analytics),
            path(&input),
        ],
        None,
    ));
    assert_eq!(out.len(), 20);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["result"], "decrypted", "{line}");
        assert_eq!(line["type"], "m.room_key");
        assert_eq!(line["sender"], "@alice:example.org");
        assert_eq!(line["content"]["seq"], i);
        assert_eq!(line["sender_device_verified"], true);
    }
    assert_eq!(std::fs::read_to_string(&analytics).unwrap_or_default(), "");

    // The same events again, as JSON lines from stdin: every one is a replay.
    let jsonl: String = events.iter().map(|e| format!("{e}\n")).collect();
    let out = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&bob_store),
            "--analytics-out",
            path(&analytics),
            "-",
        ],
        Some(&jsonl),
    ));
    assert!(out
        .iter()
        .all(|l| l["name"] == "ToDeviceFailedToDecrypt_ReplayedMessage"));
    // The default policy reports one payload per (sender, sender key, name) per hour: 20 replays
    // from Alice's device are one PostHog event.
    let validator = payload_validator();
    let payloads = std::fs::read_to_string(&analytics).unwrap();
    assert_eq!(
        payloads.lines().collect::<Vec<_>>(),
        [
            r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_ReplayedMessage","cryptoSDK":"Rust"}}"#
        ]
    );
    for line in payloads.lines() {
        assert_schema_valid(&validator, line);
    }
    // Delivered once more in a new process: the same failures, no new payload (the
    // once-per-message marks and the policy state are persisted).
    let again = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&bob_store),
            "--analytics-out",
            path(&analytics),
            "-",
        ],
        Some(&jsonl),
    ));
    assert!(again
        .iter()
        .all(|l| l["name"] == "ToDeviceFailedToDecrypt_ReplayedMessage"));
    assert_eq!(std::fs::read_to_string(&analytics).unwrap(), payloads);

    // A second encrypt reuses the session (no new one-time key) and Bob decrypts it; a /sync
    // response is accepted as input too, with a plain event passed through.
    let more: Vec<Value> =
        serde_json::from_str(&ok(&alice_args[..alice_args.len() - 2], None)).unwrap();
    let sync = serde_json::json!({"next_batch": "s2", "to_device": {"events": [more[0], {"type": "m.dummy", "sender": "@alice:example.org", "content": {}}, "not an object"]}});
    let out = lines(&ok(
        &["decrypt", "--store", path(&bob_store)],
        Some(&sync.to_string()),
    ));
    assert_eq!(out[0]["result"], "decrypted");
    assert_eq!(out[1]["result"], "plaintext");
    assert_eq!(out[2]["name"], "ToDeviceFailedToDecrypt_MalformedEvent");
}

#[test]
fn errors_are_clear_and_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let missing = dir.path().join("missing.json");
    let cases: Vec<Vec<&str>> = vec![
        vec!["decrypt", "--store", path(&store), path(&missing)],
        vec![
            "encrypt",
            "--store",
            path(&store),
            "--recipient-keys",
            path(&missing),
            "--type",
            "m.dummy",
            "--content",
            "{}",
        ],
    ];
    for args in cases {
        let output = run(&args, None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr.starts_with("error: ") || stderr.contains("\nerror: "),
            "{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{stderr}"
        );
    }
    // A wrong store key is refused with a clear message.
    ok(
        &[
            "keys",
            "--store",
            path(&store),
            "--user-id",
            "@bob:example.org",
            "--device-id",
            "BOBDEV",
        ],
        None,
    );
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "00".repeat(32)).unwrap();
    let output = run(
        &[
            "keys",
            "--store",
            path(&store),
            "--store-key-file",
            path(&wrong),
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("store key does not match"));
    // Empty input.
    let output = run(&["decrypt", "--store", path(&store)], Some("  "));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("input is empty"));
}

#[test]
fn a_wedged_session_is_recovered_from_the_shell() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let (alice, bob) = (d("alice"), d("bob"));
    let bob_keys = ok(
        &[
            "keys",
            "--store",
            path(&bob),
            "--user-id",
            "@bob:example.org",
            "--device-id",
            "BOBDEV",
        ],
        None,
    );
    std::fs::write(d("bob-keys.json"), &bob_keys).unwrap();
    let alice_keys: Value = serde_json::from_str(&ok(
        &[
            "keys",
            "--store",
            path(&alice),
            "--user-id",
            "@alice:example.org",
            "--device-id",
            "ALICEDEV",
        ],
        None,
    ))
    .unwrap();
    std::fs::write(d("alice-keys.json"), alice_keys.to_string()).unwrap();
    let query = serde_json::json!({"device_keys": {"@alice:example.org": {"ALICEDEV": alice_keys["device_keys"]}}});
    std::fs::write(d("alice-query.json"), query.to_string()).unwrap();
    let encrypt_to_bob = |n: &str| -> String {
        ok(
            &[
                "encrypt",
                "--store",
                path(&alice),
                "--recipient-keys",
                path(&d("bob-keys.json")),
                "--type",
                "m.room_key",
                "--content",
                &format!(r#"{{"n":{n}}}"#),
            ],
            None,
        )
    };
    let decrypt_at = |store: &Path, events: &str, extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["decrypt", "--store", path(store)];
        args.extend_from_slice(extra);
        args.push("-");
        lines(&ok(&args, Some(events)))
    };

    // Alice's pre-key message, Bob's reply, then a normal message.
    let out = decrypt_at(
        &bob,
        &encrypt_to_bob("0"),
        &["--device-keys", path(&d("alice-query.json"))],
    );
    assert_eq!(out[0]["result"], "decrypted");
    let reply = ok(
        &[
            "encrypt",
            "--store",
            path(&bob),
            "--recipient-keys",
            path(&d("alice-keys.json")),
            "--type",
            "m.dummy",
            "--content",
            "{}",
        ],
        None,
    );
    assert_eq!(decrypt_at(&alice, &reply, &[])[0]["result"], "decrypted");
    copy_dir(&alice, &d("alice-backup"));
    assert_eq!(
        decrypt_at(&bob, &encrypt_to_bob("1"), &[])[0]["result"],
        "decrypted"
    );

    // Alice restores her backup: her next message re-uses a consumed key and Bob queues a claim.
    std::fs::remove_dir_all(&alice).unwrap();
    copy_dir(&d("alice-backup"), &alice);
    let requests_out = d("requests.jsonl");
    let out = decrypt_at(
        &bob,
        &encrypt_to_bob("2"),
        &["--requests-out", path(&requests_out)],
    );
    assert_eq!(out[0]["name"], "ToDeviceFailedToDecrypt_SessionWedged");
    let requests = lines(&std::fs::read_to_string(&requests_out).unwrap());
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["kind"], "keys_claim");
    assert_eq!(
        requests[0]["body"],
        serde_json::json!({"one_time_keys": {"@alice:example.org": {"ALICEDEV": "signed_curve25519"}}})
    );

    // The "server" answers the claim with a fresh key of Alice's.
    let fresh: Value = serde_json::from_str(&ok(
        &["keys", "--store", path(&alice), "--one-time-keys", "1"],
        None,
    ))
    .unwrap();
    let response = serde_json::json!({"one_time_keys": {"@alice:example.org": {"ALICEDEV": fresh["one_time_keys"]}}});
    std::fs::write(d("claim-response.json"), response.to_string()).unwrap();
    ok(
        &[
            "requests",
            "--store",
            path(&bob),
            "--mark-sent",
            requests[0]["request_id"].as_str().unwrap(),
            "--response",
            path(&d("claim-response.json")),
        ],
        None,
    );
    let pending = lines(&ok(&["requests", "--store", path(&bob)], None));
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["kind"], "to_device");
    assert_eq!(pending[0]["event_type"], "m.room.encrypted");
    let dummy = serde_json::json!([{"type": "m.room.encrypted", "sender": "@bob:example.org", "content": pending[0]["body"]["messages"]["@alice:example.org"]["ALICEDEV"]}]);
    let out = decrypt_at(&alice, &dummy.to_string(), &[]);
    assert_eq!(out[0]["type"], "m.dummy", "{out:?}");
    ok(
        &[
            "requests",
            "--store",
            path(&bob),
            "--mark-sent",
            pending[0]["request_id"].as_str().unwrap(),
        ],
        None,
    );
    assert_eq!(ok(&["requests", "--store", path(&bob)], None), "");

    // Alice's next message travels on the new session.
    let out = decrypt_at(&bob, &encrypt_to_bob("3"), &[]);
    assert_eq!(out[0]["result"], "decrypted", "{out:?}");
    assert_eq!(out[0]["content"]["n"], 3);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
