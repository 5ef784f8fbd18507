//! Scenario 6: The same scenarios through our CLI binary, in separate processes: the reference's events
//! written to files and decrypted by `to-device-crypto decrypt`; `to-device-crypto encrypt`
//! output decrypted by the reference; replays and a tampered event classified by the CLI.
//!
//! The binary is `$TO_DEVICE_CRYPTO_BIN` when set (scripts/interop.sh builds it), else it is
//! built once with `cargo build --locked --manifest-path ../Cargo.toml --bin to-device-crypto` into
//! `$CARGO_TARGET_DIR/cli` (or `interop/target/cli`): a target dir of its own, since both
//! workspaces would write the main package's library to the same unhashed
//! `deps/libto_device_crypto.rlib` (it is also a cdylib) and overwrite each other's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};
use to_device_crypto::simulator::tamper_with_body;
use to_device_crypto_interop::{first_one_time_key, RefOutcome, Reference};

use crate::common::*;

const BOB_CLI_DEVICE: &str = "BOBCLI";

fn cli_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TO_DEVICE_CRYPTO_BIN") {
            return PathBuf::from(bin);
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("target"))
            .join("cli");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--locked",
                "--quiet",
                "--bin",
                "to-device-crypto",
                "--manifest-path",
            ])
            .arg(manifest.join("../Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the CLI failed");
        target.join("debug/to-device-crypto")
    })
}

fn run(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(cli_bin())
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
    let output = child.wait_with_output().unwrap();
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

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn check_decrypted(out: &[Value], from: usize) {
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["result"], "decrypted", "{line}");
        assert_eq!(line["type"], TEST_TYPE);
        assert_eq!(line["sender"], ALICE);
        assert_eq!(line["content"]["seq"], from + i);
        assert_eq!(line["sender_device_verified"], true, "{line}");
    }
}

#[tokio::test]
async fn reference_traffic_through_our_cli_in_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let store_args = ["--store", p(&store)];

    // Our CLI creates the device and prints its /keys/upload body; the reference accepts it.
    let keys: Value = serde_json::from_str(&run(
        &[
            "keys",
            "--store",
            p(&store),
            "--user-id",
            BOB,
            "--device-id",
            BOB_CLI_DEVICE,
        ],
        None,
    ))
    .unwrap();
    let alice = Reference::new(ALICE, ALICE_DEVICE).await;
    let alice_body = alice.keys_upload_body().await.unwrap();
    let alice_keys_file = dir.path().join("alice-keys.json");
    std::fs::write(&alice_keys_file, alice_body.to_string()).unwrap();
    alice.receive_device_keys(&keys["device_keys"]).await;
    assert!(alice.knows_device(BOB, BOB_CLI_DEVICE).await);
    let (key_id, key) = first_one_time_key(&keys);
    assert!(
        alice
            .claim_and_create_session(BOB, BOB_CLI_DEVICE, &key_id, &key)
            .await
    );

    // 100 pre-key messages from the reference, as a JSON array in a file.
    let contents: Vec<_> = (0..100).map(|seq| json!({"seq": seq})).collect();
    let events = alice
        .encrypt(BOB, BOB_CLI_DEVICE, TEST_TYPE, &contents)
        .await;
    let first_file = dir.path().join("from-reference-1.json");
    std::fs::write(&first_file, serde_json::to_string(&events).unwrap()).unwrap();
    let out = lines(&run(
        &["decrypt", store_args[0], store_args[1], p(&first_file)],
        None,
    ));
    assert_eq!(out.len(), 100);
    check_decrypted(&out, 0);

    // Our CLI encrypts 30 events for the reference (on the session the reference created:
    // normal messages); the reference decrypts them and identifies our device.
    let ours: Vec<Value> = serde_json::from_str(&run(
        &[
            "encrypt",
            "--store",
            p(&store),
            "--recipient-keys",
            p(&alice_keys_file),
            "--type",
            TEST_TYPE,
            "--content",
            r#"{"from":"cli"}"#,
            "--count",
            "30",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(ours.len(), 30);
    let at_alice = alice.receive(&ours).await;
    for (i, outcome) in at_alice.iter().enumerate() {
        let RefOutcome::Decrypted {
            event,
            sender,
            sender_device,
            ..
        } = outcome
        else {
            panic!("the reference failed on our CLI's event {i}: {outcome:?}");
        };
        assert_eq!(sender, BOB);
        assert_eq!(sender_device.as_deref(), Some(BOB_CLI_DEVICE));
        assert_eq!(event["type"], TEST_TYPE);
        assert_eq!(event["content"]["from"], "cli");
        assert_eq!(event["content"]["seq"], i);
    }

    // Now the reference sends normal messages; delivered as a /sync response on stdin, with a
    // tampered copy of one more fresh event.
    let contents: Vec<_> = (100..150).map(|seq| json!({"seq": seq})).collect();
    let events = alice
        .encrypt(BOB, BOB_CLI_DEVICE, TEST_TYPE, &contents)
        .await;
    let bob_curve = keys["device_keys"]["keys"][format!("curve25519:{BOB_CLI_DEVICE}")]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(events.iter().all(|e| message_type(e, &bob_curve) == 1));
    let tampered = tamper_with_body(
        alice
            .encrypt(BOB, BOB_CLI_DEVICE, TEST_TYPE, &[json!({"seq": -1})])
            .await
            .remove(0),
    );
    let mut batch = events.clone();
    batch.push(tampered);
    let sync = json!({"next_batch": "s2", "to_device": {"events": batch}});
    let analytics = dir.path().join("analytics.jsonl");
    let out = lines(&run(
        &[
            "decrypt",
            "--store",
            p(&store),
            "--analytics-out",
            p(&analytics),
            "-",
        ],
        Some(&sync.to_string()),
    ));
    assert_eq!(out.len(), 51);
    check_decrypted(&out[..50], 100);
    assert_eq!(
        out[50]["name"], "ToDeviceFailedToDecrypt_SessionWedged",
        "{}",
        out[50]
    );
    assert_eq!(
        std::fs::read_to_string(&analytics).unwrap().trim(),
        r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_SessionWedged","cryptoSDK":"Rust"}}"#
    );

    // The first file again, in a new process: every event is a replay (the CLI acknowledged
    // its results after printing them).
    let out = lines(&run(
        &["decrypt", "--store", p(&store), p(&first_file)],
        None,
    ));
    assert_eq!(out.len(), 100);
    assert!(
        out.iter()
            .all(|l| l["name"] == "ToDeviceFailedToDecrypt_ReplayedMessage"),
        "{}",
        out[0]
    );
}
