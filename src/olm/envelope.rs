//! Envelope parsing for the decryptor: the analytics crate's pure-JSON envelope checks
//! ([`to_device_analytics::envelope`], shared with any SDK that adopts the taxonomy), then the Olm
//! decode and the replay hash, which need vodozemac.

use sha2::{Digest, Sha256};
use vodozemac::olm::OlmMessage;
use vodozemac::Curve25519PublicKey;

pub use to_device_analytics::envelope::ENCRYPTED_EVENT_TYPE;
use to_device_analytics::envelope::{parse_to_device_event, ToDeviceEnvelope};

use crate::error::DecryptionError;

/// What the checks learned about an event before it failed, for local diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvelopeFacts {
    /// The envelope `sender`.
    pub sender: Option<String>,
    /// The envelope `content.sender_key`.
    pub sender_key: Option<String>,
    /// The message type of our ciphertext entry.
    pub message_type: Option<u8>,
    /// The hash of the Olm message, once it decoded.
    pub message_hash: Option<MessageHash>,
    /// The decrypted event's `type`, when the message decrypted but its plaintext failed a check
    /// (local diagnostics: "who sent what"; never part of an analytics payload).
    pub decrypted_type: Option<String>,
}

/// A to-device event after envelope parsing.
#[derive(Debug)]
pub enum ParsedEvent {
    /// Not an `m.room.encrypted` event: passed through unchanged.
    Plain {
        /// The event type.
        event_type: String,
    },
    /// An Olm message addressed to this device.
    Olm(Box<OlmEnvelope>),
}

/// An Olm-encrypted to-device event addressed to this device.
#[derive(Debug)]
pub struct OlmEnvelope {
    /// The envelope `sender`.
    pub sender: String,
    /// The sender's Curve25519 key (`content.sender_key`).
    pub sender_key: Curve25519PublicKey,
    /// The decoded Olm message of our ciphertext entry.
    pub message: OlmMessage,
    /// SHA-256 over sender key, message type and message bytes: the replay-detection key.
    pub message_hash: MessageHash,
}

/// The identity of one Olm message, used to detect replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageHash(pub [u8; 32]);

impl MessageHash {
    /// Hashes sender key, message type and message bytes, as matrix-sdk-crypto does.
    pub fn new(sender_key: &Curve25519PublicKey, message_type: u8, message: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(sender_key.as_bytes());
        hasher.update([message_type]);
        hasher.update(message);
        Self(hasher.finalize().into())
    }

    /// Lower-case hex, for logs and the CLI.
    pub fn to_hex(&self) -> String {
        crate::encoding::to_hex(&self.0)
    }
}

/// Parses `raw` and runs the envelope checks in order: envelope → algorithm → sender key →
/// ciphertext for us → Olm decode. `facts` is filled in as fields are learned.
pub fn parse_event(
    raw: &str,
    our_curve25519_key: &str,
    facts: &mut EnvelopeFacts,
) -> Result<ParsedEvent, DecryptionError> {
    let mut learned = to_device_analytics::envelope::EnvelopeFacts::default();
    let parsed = parse_to_device_event(raw, our_curve25519_key, &mut learned);
    facts.sender = learned.sender;
    facts.sender_key = learned.sender_key;
    facts.message_type = learned.message_type;
    let ciphertext = match parsed? {
        ToDeviceEnvelope::Plain { event_type } => {
            return Ok(ParsedEvent::Plain {
                event_type: event_type.into_owned(),
            })
        }
        ToDeviceEnvelope::Olm(ciphertext) => ciphertext,
    };
    let sender_key = Curve25519PublicKey::from_bytes(ciphertext.sender_key);
    let message = OlmMessage::from_parts(ciphertext.message_type.into(), &ciphertext.body)
        .map_err(|e| {
            DecryptionError::MalformedCiphertext(format!("undecodable Olm message: {e}"))
        })?;
    let message_hash = MessageHash::new(&sender_key, ciphertext.message_type, &ciphertext.body);
    facts.message_hash = Some(message_hash);
    Ok(ParsedEvent::Olm(Box::new(OlmEnvelope {
        sender: ciphertext.sender,
        message_hash,
        sender_key,
        message,
    })))
}
