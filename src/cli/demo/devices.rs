//! The demo's devices: Bob's phone on an encrypted SQLite store in a temporary directory (backed
//! up and restored by copying its files, as a phone backup does), peers that are real
//! [`OlmMachine`]s, and an old or hostile client that writes its own plaintexts on raw vodozemac.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use to_device_analytics::envelope::{ENCRYPTED_EVENT_TYPE, OLM_V1_ALGORITHM};
use to_device_crypto::keys::{parse_keys_upload_body, DeviceKeys, PublishedKeys};
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{OlmMachine, StoreKey};
use vodozemac::olm::{Account, Session, SessionConfig};

/// A directory of its own under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<Self, String> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| e.to_string())?;
        let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!(
            "to-device-crypto-demo-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir(&path)
            .map_err(|e| format!("cannot create the demo's directory {}: {e}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens Bob's phone on the SQLite store at `path`.
pub async fn open_phone(path: &Path, key: &StoreKey, user_id: &str) -> Result<OlmMachine, String> {
    let store = SqliteStore::open(path, key.clone(), Synchronous::Normal)
        .map_err(|e| format!("cannot open the demo store {}: {e}", path.display()))?;
    OlmMachine::open(user_id, "BOBPHONE", Arc::new(store))
        .await
        .map_err(|e| e.to_string())
}

/// Copies the store's files (the database and its write-ahead log) as a phone backup does, while
/// the app is idle between two syncs.
pub fn back_up(store: &Path, backup: &Path) -> Result<(), String> {
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(drop)
            .map_err(|e| format!("cannot back up {}: {e}", from.display()))
    };
    copy(store, backup)?;
    let wal = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push("-wal");
        PathBuf::from(name)
    };
    if wal(store).exists() {
        copy(&wal(store), &wal(backup))?;
    }
    Ok(())
}

/// Generates and publishes `count` one-time keys (as after a successful `/keys/upload`) and
/// returns the keys as a device claiming them sees them.
pub async fn publish_keys(machine: &OlmMachine, count: usize) -> Result<PublishedKeys, String> {
    machine
        .generate_one_time_keys(count)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = machine.keys_for_upload().await.unwrap_or_else(|| json!({}));
    machine
        .mark_keys_as_published()
        .await
        .map_err(|e| e.to_string())?;
    if body.get("device_keys").is_none() {
        body["device_keys"] = machine.device_keys().await;
    }
    let mut keys = parse_keys_upload_body(&body).map_err(|e| e.to_string())?;
    keys.one_time_keys.retain(|key| !key.fallback);
    Ok(keys)
}

/// What the server hands out for one `/keys/claim` of `keys`' device: its device keys and the
/// one-time key number `index`.
pub fn claim(keys: &PublishedKeys, index: usize) -> Result<PublishedKeys, String> {
    let one_time_key = keys
        .one_time_keys
        .get(index)
        .ok_or_else(|| format!("Bob published no one-time key number {index}"))?;
    Ok(PublishedKeys {
        device: keys.device.clone(),
        one_time_keys: vec![one_time_key.clone()],
    })
}

/// Another user's device: a real machine on an in-memory store.
pub struct Peer {
    pub machine: OlmMachine,
}

impl Peer {
    pub async fn new(user_id: &str, device_id: &str) -> Result<Self, String> {
        let machine = OlmMachine::in_memory(user_id, device_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { machine })
    }

    /// The device keys, as Bob's `encrypt` and a `/keys/query` response carry them.
    pub async fn device_keys(&self) -> Value {
        self.machine.device_keys().await
    }

    /// This device's keys without one-time keys (enough for Bob to reply on an existing session).
    pub async fn published_keys(&self) -> Result<PublishedKeys, String> {
        parse_keys_upload_body(&json!({"device_keys": self.device_keys().await}))
            .map_err(|e| e.to_string())
    }

    /// A `/keys/query` response listing this device.
    pub async fn keys_query_response(&self) -> Value {
        let machine = &self.machine;
        json!({"device_keys": {machine.user_id(): {machine.device_id(): self.device_keys().await}}})
    }

    /// Encrypts one event per content for `to`.
    pub async fn send(
        &self,
        to: &PublishedKeys,
        event_type: &str,
        contents: &[Value],
    ) -> Result<Vec<Value>, String> {
        self.machine
            .encrypt(to, event_type, contents)
            .await
            .map_err(|e| e.to_string())
    }

    /// Encrypts one event for `to`.
    pub async fn send_one(
        &self,
        to: &PublishedKeys,
        event_type: &str,
        content: Value,
    ) -> Result<Value, String> {
        let mut events = self.send(to, event_type, &[content]).await?;
        events
            .pop()
            .ok_or_else(|| "encrypt returned no event".to_owned())
    }

    /// Receives an event Bob sent (his reply): from then on this device sends normal messages.
    pub async fn receive(&self, event: &Value) -> Result<(), String> {
        self.machine
            .decrypt_to_device_event(&event.to_string())
            .await
            .map(drop)
            .map_err(|e| format!("{} cannot decrypt Bob's reply: {e}", self.machine.user_id()))
    }
}

/// A client that writes its own Olm plaintexts: an old one that sends no `sender_device_keys`
/// (before MSC4147), or a buggy or hostile one whose plaintexts lie. Its Olm is real vodozemac.
pub struct RawClient {
    user_id: String,
    account: Account,
    session: Option<Session>,
}

impl RawClient {
    pub fn new(user_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            account: Account::new(),
            session: None,
        }
    }

    /// Creates the Olm session with the device whose keys (and one-time key) `to` holds.
    pub fn create_session(&mut self, to: &PublishedKeys) -> Result<(), String> {
        let one_time_key = to
            .one_time_keys
            .first()
            .ok_or("no one-time key to create a session with")?;
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                to.device.curve25519,
                one_time_key.key,
            )
            .map_err(|e| e.to_string())?;
        self.session = Some(session);
        Ok(())
    }

    /// The plaintext an old client sends: every field the spec requires, no `sender_device_keys`.
    pub fn plaintext(&self, to: &DeviceKeys, event_type: &str, content: Value) -> Value {
        json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "recipient": to.user_id,
            "recipient_keys": {"ed25519": to.ed25519.to_base64()},
            "keys": {"ed25519": self.account.ed25519_key().to_base64()},
        })
    }

    /// Encrypts `plaintext`, whatever it says, into a `/sync`-shaped to-device event for `to`.
    pub fn encrypt(&mut self, to: &DeviceKeys, plaintext: &Value) -> Result<Value, String> {
        let session = self
            .session
            .as_mut()
            .ok_or("create the session before encrypting")?;
        let (message_type, body) = session
            .encrypt(plaintext.to_string())
            .map_err(|e| e.to_string())?
            .to_parts();
        Ok(json!({
            "type": ENCRYPTED_EVENT_TYPE,
            "sender": self.user_id,
            "content": {
                "algorithm": OLM_V1_ALGORITHM,
                "sender_key": self.account.curve25519_key().to_base64(),
                "ciphertext": {
                    to.curve25519.to_base64(): {
                        "type": message_type,
                        "body": vodozemac::base64_encode(body),
                    }
                }
            }
        }))
    }
}
