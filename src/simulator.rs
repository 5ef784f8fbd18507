//! A simulated peer device built on raw vodozemac, for tests, benchmarks, fuzzing and the demo.
//!
//! It speaks Olm exactly as a real client does, and it can also produce what a buggy or hostile
//! client would send (wrong recipient, forged keys, non-JSON plaintexts), so that every failure
//! reason can be produced with real Olm traffic instead of hand-built error values.

use std::collections::HashMap;

use serde_json::{json, Value};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey};

use crate::olm::account::{keys_upload_body, signed_device_keys};
use crate::olm::device_keys::{
    parse_keys_upload_body, DeviceKeys, PublishedKeys, OLM_V1_ALGORITHM,
};
use crate::olm::envelope::ENCRYPTED_EVENT_TYPE;
use crate::OlmMachine;

/// Generates `count` one-time keys on `machine`, publishes them (as after a successful
/// `/keys/upload`) and returns the device and one-time keys as a device claiming them sees them.
pub async fn publish_machine_keys(
    machine: &OlmMachine,
    count: usize,
) -> Result<PublishedKeys, String> {
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

/// The machine's device as a recipient of simulated traffic.
pub fn recipient_of(machine: &OlmMachine) -> Recipient {
    let keys = machine.identity_keys();
    Recipient {
        user_id: machine.user_id().to_owned(),
        curve25519: keys.curve25519,
        ed25519: keys.ed25519,
    }
}

/// Flips the last byte of the event's (first) ciphertext body: the message still decodes but no
/// longer authenticates, as after corruption in transit or tampering.
pub fn tamper_with_body(mut event: Value) -> Value {
    if let Some(entry) = event["content"]["ciphertext"]
        .as_object_mut()
        .and_then(|map| map.values_mut().next())
    {
        if let Some(mut body) = entry["body"]
            .as_str()
            .and_then(|b| vodozemac::base64_decode(b).ok())
        {
            if let Some(last) = body.last_mut() {
                *last ^= 0x01;
            }
            entry["body"] = json!(vodozemac::base64_encode(body));
        }
    }
    event
}

/// Who a simulated device sends to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The recipient's user id.
    pub user_id: String,
    /// The recipient device's Curve25519 key.
    pub curve25519: Curve25519PublicKey,
    /// The recipient device's Ed25519 key.
    pub ed25519: Ed25519PublicKey,
}

impl Recipient {
    /// The recipient described by a device-keys object.
    pub fn from_device(device: &DeviceKeys) -> Self {
        Self {
            user_id: device.user_id.clone(),
            curve25519: device.curve25519,
            ed25519: device.ed25519,
        }
    }
}

/// A peer device with an Olm account and sessions, driven directly.
pub struct SimulatedDevice {
    user_id: String,
    device_id: String,
    account: Account,
    sessions: HashMap<[u8; 32], Session>,
}

impl std::fmt::Debug for SimulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedDevice")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl SimulatedDevice {
    /// A new device with a fresh account.
    pub fn new(user_id: &str, device_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            account: Account::new(),
            sessions: HashMap::new(),
        }
    }

    /// The user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The Curve25519 identity key.
    pub fn curve25519_key(&self) -> Curve25519PublicKey {
        self.account.curve25519_key()
    }

    /// The Ed25519 signing key.
    pub fn ed25519_key(&self) -> Ed25519PublicKey {
        self.account.ed25519_key()
    }

    /// The signed device keys.
    pub fn device_keys(&self) -> Value {
        signed_device_keys(&self.account, &self.user_id, &self.device_id)
    }

    /// A `/keys/query` response body listing this device.
    pub fn keys_query_response(&self) -> Value {
        json!({"device_keys": {self.user_id.clone(): {self.device_id.clone(): self.device_keys()}}})
    }

    /// Generates `count` one-time keys and returns the `/keys/upload` body publishing them.
    pub fn publish_keys(&mut self, count: usize) -> Value {
        self.account.generate_one_time_keys(count);
        let body = keys_upload_body(&self.account, &self.user_id, &self.device_id, true);
        self.account.mark_keys_as_published();
        body
    }

    /// This device's keys as another device's `encrypt` needs them (without one-time keys).
    pub fn published_keys(&self) -> PublishedKeys {
        parse_keys_upload_body(&json!({"device_keys": self.device_keys()}))
            .expect("our own device keys verify")
    }

    /// Creates an outbound session to the device that published `keys`, with its first
    /// one-time key (or `one_time_key` when given).
    pub fn create_session(
        &mut self,
        keys: &PublishedKeys,
        one_time_key: Option<Curve25519PublicKey>,
    ) -> Recipient {
        let one_time_key = one_time_key.unwrap_or_else(|| {
            keys.one_time_keys
                .first()
                .expect("the recipient published a one-time key")
                .key
        });
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                keys.device.curve25519,
                one_time_key,
            )
            .expect("a valid one-time key");
        self.sessions
            .insert(keys.device.curve25519.to_bytes(), session);
        Recipient::from_device(&keys.device)
    }

    /// Whether there is a session with `recipient`.
    pub fn has_session(&self, recipient: &Recipient) -> bool {
        self.sessions.contains_key(recipient.curve25519.as_bytes())
    }

    /// The plaintext a correct client sends, with our `sender_device_keys` when asked.
    pub fn plaintext(
        &self,
        recipient: &Recipient,
        event_type: &str,
        content: Value,
        with_sender_device_keys: bool,
    ) -> Value {
        let mut plaintext = json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "recipient": recipient.user_id,
            "recipient_keys": {"ed25519": recipient.ed25519.to_base64()},
            "keys": {"ed25519": self.ed25519_key().to_base64()},
        });
        if with_sender_device_keys {
            plaintext["sender_device_keys"] = self.device_keys();
        }
        plaintext
    }

    /// Encrypts a correct event for `recipient`.
    pub fn encrypt(&mut self, recipient: &Recipient, event_type: &str, content: Value) -> Value {
        let plaintext = self.plaintext(recipient, event_type, content, true);
        self.encrypt_raw(recipient, plaintext.to_string().as_bytes())
    }

    /// Encrypts arbitrary plaintext bytes for `recipient` into a `/sync`-shaped to-device event.
    ///
    /// # Panics
    /// If there is no session with `recipient` (call [`SimulatedDevice::create_session`] first).
    pub fn encrypt_raw(&mut self, recipient: &Recipient, plaintext: &[u8]) -> Value {
        let session = self
            .sessions
            .get_mut(recipient.curve25519.as_bytes())
            .expect("create_session first");
        let (message_type, body) = session.encrypt(plaintext).expect("encrypt").to_parts();
        json!({
            "type": ENCRYPTED_EVENT_TYPE,
            "sender": self.user_id,
            "content": {
                "algorithm": OLM_V1_ALGORITHM,
                "sender_key": self.curve25519_key().to_base64(),
                "ciphertext": {
                    recipient.curve25519.to_base64(): {
                        "type": message_type,
                        "body": vodozemac::base64_encode(body),
                    }
                }
            }
        })
    }

    /// Decrypts one Olm message body from `sender_key` with an existing session and parses the
    /// plaintext: exactly the raw vodozemac work of a decryption (base64 decode, message decode,
    /// `Session::decrypt`, JSON parse) — the floor that benchmarks compare the machine against.
    pub fn decrypt_body(
        &mut self,
        sender_key: &Curve25519PublicKey,
        message_type: usize,
        body: &str,
    ) -> Option<Value> {
        let bytes = vodozemac::base64_decode(body).ok()?;
        let message = OlmMessage::from_parts(message_type, &bytes).ok()?;
        let plaintext = self
            .sessions
            .get_mut(sender_key.as_bytes())?
            .decrypt(&message)
            .ok()?;
        serde_json::from_slice(&plaintext).ok()
    }

    /// Decrypts an event the other side sent us (e.g. a reply, after which our session sends
    /// normal messages). Returns the plaintext JSON, or `None` if it does not decrypt.
    pub fn decrypt(&mut self, event: &Value) -> Option<Value> {
        let content = event.get("content")?;
        let sender_key =
            Curve25519PublicKey::from_base64(content.get("sender_key")?.as_str()?).ok()?;
        let ours = content
            .get("ciphertext")?
            .get(self.curve25519_key().to_base64())?;
        let message_type = usize::try_from(ours.get("type")?.as_u64()?).ok()?;
        let body = vodozemac::base64_decode(ours.get("body")?.as_str()?).ok()?;
        let message = OlmMessage::from_parts(message_type, &body).ok()?;
        let plaintext = match (self.sessions.get_mut(sender_key.as_bytes()), &message) {
            (Some(session), _) => session.decrypt(&message).ok()?,
            (None, OlmMessage::PreKey(pre_key)) => {
                let created = self
                    .account
                    .create_inbound_session(SessionConfig::version_1(), sender_key, pre_key)
                    .ok()?;
                self.sessions.insert(sender_key.to_bytes(), created.session);
                created.plaintext
            }
            (None, OlmMessage::Normal(_)) => return None,
        };
        serde_json::from_slice(&plaintext).ok()
    }
}
