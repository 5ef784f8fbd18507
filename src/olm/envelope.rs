//! Envelope parsing for the decryptor: the analytics crate's pure-JSON envelope checks
//! ([`to_device_analytics::envelope`], shared with any SDK that adopts the taxonomy), then the Olm
//! decode and the replay key, which need vodozemac.

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
    /// The replay key of the Olm message ([`MessageHash::replay_key`]), once it decoded.
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
    /// The message type of our ciphertext entry (0 pre-key, 1 normal).
    pub message_type: u8,
    /// The decoded bytes of our ciphertext entry: kept (moved, not copied) for the version-4 hash,
    /// which is computed only where a message received before schema 5 could be replayed.
    pub body: Vec<u8>,
    /// The replay-detection key ([`MessageHash::replay_key`]).
    pub message_hash: MessageHash,
}

impl OlmEnvelope {
    /// The version-4 replay hash of this message ([`MessageHash::new`]): ~1.2 KB hashed, so only
    /// computed when the store still holds hashes of that format.
    pub fn legacy_hash(&self) -> MessageHash {
        MessageHash::new(&self.sender_key, self.message_type, &self.body)
    }
}

/// The identity of one Olm message, used to detect replays: its replay key
/// ([`MessageHash::replay_key`]), or, in stores from before schema 5, the hash of the whole
/// message ([`MessageHash::new`]). Also the marks of failed messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageHash(pub [u8; 32]);

/// Domain separation of the chain part of a replay key.
const REPLAY_KEY_CONTEXT: &[u8] = b"to-device-crypto replay key v1";

impl MessageHash {
    /// The replay key of a decoded Olm message: what identifies it among every message this
    /// device can ever decrypt, from what the decoder already holds, instead of a hash of its
    /// ~1.2 KB of bytes. Layout (32 bytes):
    ///
    /// | bytes | what |
    /// |---|---|
    /// | 0..8 | `chain[0..8]` |
    /// | 8..16 | the message's chain index, big-endian |
    /// | 16..24 | the message's MAC (its first 8 bytes; Olm v1 MACs are 8 bytes) |
    /// | 24..32 | `chain[8..16]` |
    ///
    /// where `chain` = SHA-256(context ‖ sender key ‖ message type ‖ for a pre-key message the
    /// session's keys (identity, base and one-time key, which the session id is the hash of) ‖
    /// message version ‖ ratchet key) names the sending chain. The chain prefix first and the
    /// index next make one chain's messages neighbours in the store's index (a batch writes a
    /// few pages, not one page per message), and make the outbox ids of one chain's results
    /// (the first 16 bytes, in hex) neighbours too.
    ///
    /// **Every replay the whole-message hash ([`MessageHash::new`]) detects, this key detects.**
    /// A replay is the same sender key, type and bytes again; every field above is a function of
    /// exactly those (vodozemac decodes them from the bytes), so the same message always gets
    /// the same key. The converse is stronger than before: a re-encoding of a message (another
    /// protobuf layout of the same fields, which the whole-message hash tells apart) is caught
    /// too.
    ///
    /// **A forged message cannot take a future legitimate message's key.** Keys are recorded
    /// only for messages that decrypted, i.e. whose MAC verified under the message key of that
    /// session, ratchet key and chain index. Only the sender holds that key, so a forger who
    /// names a future (ratchet key, chain index) fails decryption and records nothing, and the
    /// legitimate message finds its key free. Another device (even a malicious peer) cannot
    /// reach into this sender's keys: its messages decrypt only under sessions with its own
    /// sender key, which is hashed into `chain`, and a collision on the 128 bits of `chain`
    /// kept is a second pre-image search. Two authentic messages never share a key: one
    /// (ratchet key, chain index) has one message key, which vodozemac uses once.
    pub fn replay_key(sender_key: &Curve25519PublicKey, message: &OlmMessage, body: &[u8]) -> Self {
        let mut chain = Sha256::new();
        chain.update(REPLAY_KEY_CONTEXT);
        chain.update(sender_key.as_bytes());
        let mut mac = [0u8; 8];
        let inner = match message {
            OlmMessage::Normal(inner) => {
                chain.update([1]);
                // vodozemac reads a normal message's MAC as its last bytes (8 in version 3,
                // 32 in version 4): exactly the ones it verifies.
                copy_mac(&mut mac, trailing_mac(body, inner.version()));
                inner
            }
            OlmMessage::PreKey(pre_key) => {
                chain.update([0]);
                chain.update(pre_key.identity_key().as_bytes());
                chain.update(pre_key.base_key().as_bytes());
                chain.update(pre_key.one_time_key().as_bytes());
                let inner = pre_key.message();
                // The inner message sits inside the pre-key message's protobuf, wherever the
                // sender put the field; vodozemac's encoding of it ends with its MAC.
                copy_mac(&mut mac, trailing_mac(&inner.to_bytes(), inner.version()));
                inner
            }
        };
        chain.update([inner.version()]);
        chain.update(inner.ratchet_key().as_bytes());
        let chain: [u8; 32] = chain.finalize().into();
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&chain[..8]);
        key[8..16].copy_from_slice(&inner.chain_index().to_be_bytes());
        key[16..24].copy_from_slice(&mac);
        key[24..].copy_from_slice(&chain[8..16]);
        Self(key)
    }

    /// The version-4 replay hash: SHA-256 over sender key, message type and the whole message's
    /// bytes, as matrix-sdk-crypto computes it. Stores from before schema 5 hold these (never
    /// pruned), so they are still looked up where a message received then could be replayed.
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
    let message_hash = MessageHash::replay_key(&sender_key, &message, &ciphertext.body);
    facts.message_hash = Some(message_hash);
    Ok(ParsedEvent::Olm(Box::new(OlmEnvelope {
        sender: ciphertext.sender,
        message_hash,
        sender_key,
        message,
        message_type: ciphertext.message_type,
        body: ciphertext.body,
    })))
}

/// The MAC at the end of an encoded Olm message of `version` (vodozemac's layout: version 3
/// truncates it to 8 bytes, version 4 keeps 32). A decoded message is always long enough.
fn trailing_mac(encoded: &[u8], version: u8) -> &[u8] {
    let length = if version == 3 { 8 } else { 32 };
    &encoded[encoded.len().saturating_sub(length)..]
}

fn copy_mac(into: &mut [u8; 8], mac: &[u8]) {
    let n = mac.len().min(into.len());
    into[..n].copy_from_slice(&mac[..n]);
}

#[cfg(test)]
mod tests {
    use vodozemac::olm::{Account, SessionConfig};

    use super::*;

    fn messages(count: usize) -> (Curve25519PublicKey, Vec<OlmMessage>) {
        let alice = Account::new();
        let mut bob = Account::new();
        bob.generate_one_time_keys(1);
        let otk = *bob.one_time_keys().values().next().unwrap();
        let mut session = alice
            .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
            .unwrap();
        let messages = (0..count)
            .map(|i| session.encrypt(format!("m{i}")).unwrap())
            .collect();
        (alice.curve25519_key(), messages)
    }

    /// A version byte and protobuf length-delimited fields, re-encoded with the last field first.
    fn reorder_fields(encoded: &[u8]) -> Vec<u8> {
        fn varint(bytes: &[u8], at: &mut usize) -> usize {
            let (mut value, mut shift) = (0, 0);
            loop {
                let byte = bytes[*at];
                *at += 1;
                value |= usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte < 0x80 {
                    return value;
                }
            }
        }
        let mut fields = Vec::new();
        let mut at = 1;
        while at < encoded.len() {
            let start = at;
            let _tag = varint(encoded, &mut at);
            let length = varint(encoded, &mut at);
            at += length;
            fields.push(&encoded[start..at]);
        }
        fields.rotate_right(1);
        let mut out = vec![encoded[0]];
        for field in fields {
            out.extend_from_slice(field);
        }
        out
    }

    fn key_of(sender: &Curve25519PublicKey, message: &OlmMessage) -> MessageHash {
        let (_, body) = message.to_parts();
        MessageHash::replay_key(sender, message, &body)
    }

    #[test]
    fn a_replay_key_is_the_same_for_the_same_message_and_differs_between_messages() {
        let (sender, messages) = messages(3);
        let keys: Vec<_> = messages.iter().map(|m| key_of(&sender, m)).collect();
        assert_eq!(keys[0], key_of(&sender, &messages[0]));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2]);
        // One chain: the same prefix, the chain index next (neighbours in the store's index).
        assert_eq!(keys[0].0[..8], keys[2].0[..8]);
        assert_eq!(keys[2].0[8..16], 2u64.to_be_bytes());
        // Another sender key names another chain.
        let other = Curve25519PublicKey::from_bytes([7; 32]);
        assert_ne!(key_of(&other, &messages[0]).0[..8], keys[0].0[..8]);
    }

    #[test]
    fn a_replay_key_holds_the_mac_the_decoder_verifies() {
        let (sender, messages) = messages(1);
        let OlmMessage::PreKey(pre_key) = &messages[0] else {
            panic!("the first message of an outbound session is a pre-key message")
        };
        let inner = pre_key.message().to_bytes();
        let key = key_of(&sender, &messages[0]);
        assert_eq!(key.0[16..24], inner[inner.len() - 8..]);
        // A normal message: the MAC is the last 8 bytes of its own encoding.
        let normal = OlmMessage::Normal(pre_key.message().clone());
        let (_, body) = normal.to_parts();
        assert_eq!(
            MessageHash::replay_key(&sender, &normal, &body).0[16..24],
            body[body.len() - 8..]
        );
        // The same pre-key message with its protobuf fields in another order (the inner message
        // first): vodozemac decodes it the same, and the key is the same.
        let (_, canonical) = messages[0].to_parts();
        let reordered = reorder_fields(&canonical);
        assert_ne!(reordered, canonical);
        let decoded = OlmMessage::from_parts(0, &reordered).unwrap();
        assert_eq!(decoded, messages[0]);
        assert_eq!(MessageHash::replay_key(&sender, &decoded, &reordered), key);
        // Another MAC in the same slot is another key.
        let mut forged = body.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let forged_message = OlmMessage::from_parts(1, &forged).unwrap();
        assert_ne!(
            MessageHash::replay_key(&sender, &forged_message, &forged),
            MessageHash::replay_key(&sender, &normal, &body)
        );
    }
}
