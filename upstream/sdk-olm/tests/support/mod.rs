//! Shared by the CLI tests and the comparison: running the two CLIs, and a raw-Olm device
//! (vodozemac) that sends what no well-behaved client sends.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};
use vodozemac::megolm::GroupSession;
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use vodozemac::{base64_decode, base64_encode, Curve25519PublicKey};

pub const OLM_V1: &str = "m.olm.v1.curve25519-aes-sha2";
/// A custom event type: the SDK decrypts it and does nothing else with it.
pub const TEST_TYPE: &str = "org.example.compare";

/// The sdk-olm binary of this package.
pub fn sdk_olm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sdk-olm"))
}

/// Our CLI: `TO_DEVICE_CRYPTO_BIN` (scripts/upstream.sh builds it).
pub fn to_device_crypto() -> PathBuf {
    let path = std::env::var_os("TO_DEVICE_CRYPTO_BIN")
        .map(PathBuf::from)
        .expect("TO_DEVICE_CRYPTO_BIN must point at our to-device-crypto binary (scripts/upstream.sh sets it)");
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// Runs `bin` with `args` and `stdin`; returns stdout, panicking with stderr on failure.
pub fn run(bin: &Path, args: &[&str], stdin: &str) -> String {
    let output = run_status(bin, args, stdin);
    assert!(output.0, "{} {args:?} failed:\n{}", bin.display(), output.2);
    output.1
}

/// Runs `bin`; returns (success, stdout, stderr).
pub fn run_status(bin: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The output lines of `decrypt`, parsed.
pub fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A `/keys/query` response body for one device.
pub fn keys_query(device_keys: &Value) -> Value {
    let user = device_keys["user_id"].as_str().unwrap();
    let device = device_keys["device_id"].as_str().unwrap();
    json!({ "device_keys": { user: { device: device_keys } } })
}

/// The one-time keys of a `/keys/upload` body, by key id.
pub fn one_time_keys(upload_body: &Value) -> Vec<(String, Value)> {
    upload_body["one_time_keys"]
        .as_object()
        .expect("one_time_keys")
        .iter()
        .map(|(id, key)| (id.clone(), key.clone()))
        .collect()
}

/// The `/keys/upload` body with only the given one-time key: what a server hands out for one
/// `/keys/claim`.
pub fn with_one_time_key(upload_body: &Value, key: &(String, Value)) -> Value {
    json!({
        "device_keys": upload_body["device_keys"],
        "one_time_keys": { key.0.as_str(): key.1 },
    })
}

/// The Curve25519 key of the device of a `/keys/upload` body.
pub fn curve25519_of(upload_body: &Value) -> String {
    let keys = upload_body["device_keys"]["keys"].as_object().unwrap();
    keys.iter()
        .find(|(id, _)| id.starts_with("curve25519:"))
        .map(|(_, key)| key.as_str().unwrap().to_owned())
        .unwrap()
}

pub fn ed25519_of(upload_body: &Value) -> String {
    let keys = upload_body["device_keys"]["keys"].as_object().unwrap();
    keys.iter()
        .find(|(id, _)| id.starts_with("ed25519:"))
        .map(|(_, key)| key.as_str().unwrap().to_owned())
        .unwrap()
}

/// The message type of our entry (0 pre-key, 1 normal).
pub fn message_type(event: &Value) -> u64 {
    let ciphertext = event["content"]["ciphertext"].as_object().unwrap();
    ciphertext.values().next().unwrap()["type"]
        .as_u64()
        .unwrap()
}

/// Canonical JSON as Matrix signs it: sorted keys, no whitespace (serde_json's default map is
/// sorted and its output compact; device keys hold only strings).
fn canonical(value: &Value) -> String {
    serde_json::to_string(value).unwrap()
}

/// A device made of raw vodozemac: it signs its own keys and encrypts any plaintext.
pub struct RawDevice {
    pub user_id: String,
    pub device_id: String,
    account: Account,
    /// Outbound sessions by recipient Curve25519 key.
    sessions: HashMap<String, Session>,
}

impl RawDevice {
    pub fn new(user_id: &str, device_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            account: Account::new(),
            sessions: HashMap::new(),
        }
    }

    pub fn curve25519(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    pub fn ed25519(&self) -> String {
        self.account.ed25519_key().to_base64()
    }

    fn sign(&self, object: &mut Value) {
        let mut unsigned = object.clone();
        let map = unsigned.as_object_mut().unwrap();
        map.remove("signatures");
        map.remove("unsigned");
        let signature = self.account.sign(canonical(&unsigned)).to_base64();
        object["signatures"] = json!({
            self.user_id.as_str(): { format!("ed25519:{}", self.device_id): signature }
        });
    }

    /// The signed device keys.
    pub fn device_keys(&self) -> Value {
        let mut keys = json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM_V1, "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", self.device_id): self.curve25519(),
                format!("ed25519:{}", self.device_id): self.ed25519(),
            },
        });
        self.sign(&mut keys);
        keys
    }

    /// A `/keys/upload` body with `count` new signed one-time keys.
    pub fn keys_upload_body(&mut self, count: usize) -> Value {
        self.account.generate_one_time_keys(count);
        let mut one_time_keys = Map::new();
        for (id, key) in self.account.one_time_keys() {
            let mut signed = json!({ "key": key.to_base64() });
            self.sign(&mut signed);
            one_time_keys.insert(format!("signed_curve25519:{}", id.to_base64()), signed);
        }
        self.account.mark_keys_as_published();
        json!({ "device_keys": self.device_keys(), "one_time_keys": one_time_keys })
    }

    /// Opens an Olm session to the device of `upload_body` on the one-time key `key`.
    pub fn open_session(&mut self, upload_body: &Value, key: &(String, Value)) {
        let their_key = curve25519_of(upload_body);
        let identity = Curve25519PublicKey::from_base64(&their_key).unwrap();
        let one_time_key =
            Curve25519PublicKey::from_base64(key.1["key"].as_str().unwrap()).unwrap();
        let session = self
            .account
            .create_outbound_session(SessionConfig::version_1(), identity, one_time_key)
            .unwrap();
        self.sessions.insert(their_key, session);
    }

    /// The plaintext a correct client sends to the device of `upload_body`.
    pub fn plaintext(
        &self,
        upload_body: &Value,
        event_type: &str,
        content: Value,
        with_sender_device_keys: bool,
    ) -> Value {
        let mut plaintext = json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "recipient": upload_body["device_keys"]["user_id"],
            "recipient_keys": { "ed25519": ed25519_of(upload_body) },
            "keys": { "ed25519": self.ed25519() },
        });
        if with_sender_device_keys {
            plaintext["sender_device_keys"] = self.device_keys();
        }
        plaintext
    }

    /// Encrypts `plaintext` (any bytes) for the device of `upload_body` on the open session, as a
    /// `/sync` event.
    pub fn encrypt(&mut self, upload_body: &Value, plaintext: &[u8]) -> Value {
        let their_key = curve25519_of(upload_body);
        let session = self
            .sessions
            .get_mut(&their_key)
            .expect("open_session first");
        let message = session.encrypt(plaintext).unwrap();
        let (message_type, body) = message.to_parts();
        json!({
            "type": "m.room.encrypted",
            "sender": self.user_id,
            "content": {
                "algorithm": OLM_V1,
                "sender_key": self.curve25519(),
                "ciphertext": { their_key: { "type": message_type, "body": base64_encode(body) } },
            },
        })
    }

    /// Decrypts the events addressed to this device (replies), so that its sessions move on to
    /// normal messages. Returns the decrypted plaintexts.
    pub fn receive(&mut self, events: &[Value]) -> Vec<Value> {
        let own = self.curve25519();
        let mut plaintexts = Vec::new();
        for event in events {
            let sender_key = event["content"]["sender_key"].as_str().unwrap();
            let entry = &event["content"]["ciphertext"][own.as_str()];
            let body = base64_decode(entry["body"].as_str().unwrap()).unwrap();
            let message =
                OlmMessage::from_parts(entry["type"].as_u64().unwrap() as usize, &body).unwrap();
            let session = self
                .sessions
                .get_mut(sender_key)
                .expect("a reply on a session this device opened");
            let plaintext = session.decrypt(&message).unwrap();
            plaintexts.push(serde_json::from_slice(&plaintext).unwrap());
        }
        plaintexts
    }
}

/// The content of an `m.room_key` event with a real Megolm session key, which the SDK imports.
pub fn room_key_content(room_id: &str) -> Value {
    let session = GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    json!({
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": room_id,
        "session_id": session.session_id(),
        "session_key": session.session_key().to_base64(),
    })
}

/// A normal (type 1) Olm message from `sender`'s identity key on a session with some other device:
/// no session of the recipient can decrypt it.
pub fn normal_message_elsewhere(sender: &mut RawDevice, recipient_curve25519: &str) -> Value {
    let mut other = RawDevice::new("@other:example.org", "OTHER");
    let other_body = other.keys_upload_body(1);
    let key = one_time_keys(&other_body).remove(0);
    sender.open_session(&other_body, &key);
    let first = sender.encrypt(&other_body, b"{}");
    // The other side answers, so that the session sends normal messages.
    let pre_key_body = base64_decode(
        first["content"]["ciphertext"][other.curve25519().as_str()]["body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let OlmMessage::PreKey(pre_key) = OlmMessage::from_parts(0, &pre_key_body).unwrap() else {
        panic!("a new session sends pre-key messages");
    };
    let mut inbound = other
        .account
        .create_inbound_session(
            SessionConfig::version_1(),
            sender.account.curve25519_key(),
            &pre_key,
        )
        .unwrap()
        .session;
    let reply = inbound.encrypt("{}").unwrap();
    let session = sender.sessions.get_mut(&other.curve25519()).unwrap();
    session.decrypt(&reply).unwrap();
    let message = session.encrypt("{}").unwrap();
    let (message_type, body) = message.to_parts();
    assert_eq!(message_type, 1);
    json!({
        "type": "m.room.encrypted",
        "sender": sender.user_id,
        "content": {
            "algorithm": OLM_V1,
            "sender_key": sender.curve25519(),
            "ciphertext": { recipient_curve25519: { "type": 1, "body": base64_encode(body) } },
        },
    })
}
