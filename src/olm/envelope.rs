//! Parsing of to-device event envelopes: from raw JSON to an Olm message addressed to us.
//!
//! Only the fields the checks need are materialized; the rest of the event stays borrowed raw
//! JSON, which keeps parsing cheap for the common case.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use vodozemac::olm::OlmMessage;
use vodozemac::Curve25519PublicKey;

use super::device_keys::OLM_V1_ALGORITHM;
use crate::error::DecryptionError;
use crate::json::{check_limits, JsonLimits};

/// The event type of encrypted to-device events.
pub const ENCRYPTED_EVENT_TYPE: &str = "m.room.encrypted";

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

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    sender: Cow<'a, str>,
    #[serde(borrow)]
    content: &'a RawValue,
}

#[derive(Deserialize)]
struct RawCiphertextEntry<'a> {
    #[serde(rename = "type")]
    message_type: u8,
    #[serde(borrow)]
    body: Cow<'a, str>,
}

type RawObject<'a> = HashMap<Cow<'a, str>, &'a RawValue>;

/// Parses `raw` and runs the envelope checks in order: envelope → algorithm → sender key →
/// ciphertext for us → Olm decode. `facts` is filled in as fields are learned.
pub fn parse_event(
    raw: &str,
    our_curve25519_key: &str,
    facts: &mut EnvelopeFacts,
) -> Result<ParsedEvent, DecryptionError> {
    check_limits(raw, JsonLimits::TO_DEVICE_EVENT)
        .map_err(|e| DecryptionError::MalformedEvent(e.to_string()))?;
    let envelope: RawEnvelope<'_> = serde_json::from_str(raw).map_err(|e| {
        DecryptionError::MalformedEvent(format!(
            "expected an object with string `type` and `sender` and an object `content`: {e}"
        ))
    })?;
    facts.sender = Some(envelope.sender.clone().into_owned());
    let content: RawObject<'_> = serde_json::from_str(envelope.content.get())
        .map_err(|_| DecryptionError::MalformedEvent("`content` is not an object".to_owned()))?;
    if envelope.event_type != ENCRYPTED_EVENT_TYPE {
        return Ok(ParsedEvent::Plain {
            event_type: envelope.event_type.into_owned(),
        });
    }

    let algorithm = content
        .get("algorithm")
        .and_then(|raw| serde_json::from_str::<Cow<'_, str>>(raw.get()).ok());
    if algorithm.as_deref() != Some(OLM_V1_ALGORITHM) {
        return Err(DecryptionError::UnsupportedAlgorithm(
            algorithm.map(Cow::into_owned),
        ));
    }

    let sender_key = content
        .get("sender_key")
        .ok_or_else(|| DecryptionError::MissingSenderKey("`sender_key` is missing".to_owned()))?;
    let sender_key: Cow<'_, str> = serde_json::from_str(sender_key.get()).map_err(|_| {
        DecryptionError::MissingSenderKey("`sender_key` is not a string".to_owned())
    })?;
    facts.sender_key = Some(sender_key.clone().into_owned());
    let sender_key = Curve25519PublicKey::from_base64(&sender_key)
        .map_err(|e| DecryptionError::MissingSenderKey(format!("invalid curve25519 key: {e}")))?;

    let ciphertext: RawObject<'_> = content
        .get("ciphertext")
        .ok_or_else(|| DecryptionError::MalformedCiphertext("`ciphertext` is missing".to_owned()))
        .and_then(|raw| {
            serde_json::from_str(raw.get()).map_err(|_| {
                DecryptionError::MalformedCiphertext("`ciphertext` is not an object".to_owned())
            })
        })?;
    let entry =
        ciphertext
            .get(our_curve25519_key)
            .ok_or_else(|| DecryptionError::MissingCiphertext {
                our_key: our_curve25519_key.to_owned(),
                recipient_count: ciphertext.len(),
            })?;
    let entry: RawCiphertextEntry<'_> = serde_json::from_str(entry.get()).map_err(|e| {
        DecryptionError::MalformedCiphertext(format!(
            "our entry needs an integer `type` and a string `body`: {e}"
        ))
    })?;
    facts.message_type = Some(entry.message_type);
    if entry.message_type > 1 {
        return Err(DecryptionError::MalformedCiphertext(format!(
            "message type {} is neither 0 (pre-key) nor 1 (normal)",
            entry.message_type
        )));
    }
    let bytes = vodozemac::base64_decode(entry.body.as_bytes())
        .map_err(|e| DecryptionError::MalformedCiphertext(format!("body is not base64: {e}")))?;
    let message = OlmMessage::from_parts(entry.message_type.into(), &bytes).map_err(|e| {
        DecryptionError::MalformedCiphertext(format!("undecodable Olm message: {e}"))
    })?;
    let message_hash = MessageHash::new(&sender_key, entry.message_type, &bytes);
    facts.message_hash = Some(message_hash);
    Ok(ParsedEvent::Olm(Box::new(OlmEnvelope {
        sender: envelope.sender.into_owned(),
        message_hash,
        sender_key,
        message,
    })))
}
