//! Helpers for the CLI tests: running the binary in its own process, reading its JSON lines, and
//! the usual cast (Bob's store made by `keys`, Alice's by `encrypt --create`).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");
pub const BOB: &str = "@bob:example.org";
pub const ALICE: &str = "@alice:example.org";

/// The binary with a clean environment for the store key.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("TO_DEVICE_CRYPTO_STORE_KEY");
    command
}

/// Runs `command`, feeding `stdin` (a reader that closes early is not an error).
pub fn output_of(mut command: Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    output
}

pub fn run(args: &[&str], stdin: &str) -> Output {
    output_of(command(args), stdin.as_bytes())
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str], stdin: &str) -> String {
    let output = run(args, stdin);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a command that must fail with exit code 1; returns its stderr.
pub fn fails(args: &[&str], stdin: &str) -> String {
    let output = run(args, stdin);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") || stderr.contains("\nerror: "),
        "{stderr}"
    );
    stderr
}

pub fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bob's store (made by `keys`) and Alice's (made by `encrypt --create`) in `dir`.
pub struct Cast {
    pub bob: PathBuf,
    pub alice: PathBuf,
    /// Bob's `/keys/upload` body, as `keys` printed it.
    pub bob_keys: PathBuf,
    /// Alice's `/keys/upload` body.
    pub alice_keys: PathBuf,
}

impl Cast {
    pub fn new(dir: &Path) -> Self {
        let cast = Cast {
            bob: dir.join("bob"),
            alice: dir.join("alice"),
            bob_keys: dir.join("bob-keys.json"),
            alice_keys: dir.join("alice-keys.json"),
        };
        let keys = ok(
            &[
                "keys",
                "--store",
                path(&cast.bob),
                "--user-id",
                BOB,
                "--device-id",
                "BOBDEV",
            ],
            "",
        );
        std::fs::write(&cast.bob_keys, keys).unwrap();
        let keys = ok(
            &[
                "keys",
                "--store",
                path(&cast.alice),
                "--user-id",
                ALICE,
                "--device-id",
                "ALICEDEV",
            ],
            "",
        );
        std::fs::write(&cast.alice_keys, keys).unwrap();
        cast
    }

    /// `count` events from Alice to Bob (a JSON array), each content with `"seq"` and `tag`.
    pub fn alice_to_bob(&self, count: usize, tag: &str) -> String {
        let content = format!(r#"{{"tag":"{tag}"}}"#);
        let events: Vec<Value> = serde_json::from_str(&ok(
            &[
                "encrypt",
                "--store",
                path(&self.alice),
                "--recipient-keys",
                path(&self.bob_keys),
                "--type",
                "m.room_key",
                "--content",
                &content,
                "--count",
                &count.to_string(),
            ],
            "",
        ))
        .unwrap();
        serde_json::to_string(&events).unwrap()
    }

    /// Bob decrypts `input` (stdin) with extra arguments; must succeed.
    pub fn bob_decrypts(&self, input: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["decrypt", "--store", path(&self.bob)];
        args.extend_from_slice(extra);
        args.push("-");
        lines(&ok(&args, input))
    }

    /// Alice's curve25519 key.
    pub fn alice_curve25519(&self) -> String {
        let keys: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.alice_keys).unwrap()).unwrap();
        keys["device_keys"]["keys"]["curve25519:ALICEDEV"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// The names of a directory's entries, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The permission bits of `path`.
#[cfg(unix)]
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Copies a store directory (files only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
