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
    let validator = payload_validator();
    let payloads = std::fs::read_to_string(&analytics).unwrap();
    assert_eq!(payloads.lines().count(), 20);
    for line in payloads.lines() {
        assert_schema_valid(&validator, line);
    }

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
