//! Parsing of to-device event envelopes: from raw JSON to an Olm message addressed to us.
//!
//! The event is read in one pass: only the fields the checks need are materialized (borrowed where
//! the text allows), other recipients' ciphertexts are skipped without being copied, and fields of
//! the wrong type are remembered rather than failing the parse, so each check names its own failure.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
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

/// A field read leniently: a value of an unexpected type is remembered as such instead of failing
/// the whole parse, so that each check can name its own failure.
enum Scalar<'a> {
    Str(Cow<'a, str>),
    UInt(u64),
    Other,
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::UInt(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_seq(seq)?;
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Reads a JSON object with the visitor `V`, and any other JSON value (skipped) as `None`: a field
/// of the wrong type then fails its own check instead of the whole parse.
struct IfObject<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for IfObject<V> {
    type Value = Option<V::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(map).map(Some)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Our entry of `content.ciphertext`; `None` fields were absent.
struct RawEntry<'a> {
    message_type: Option<Scalar<'a>>,
    body: Option<Scalar<'a>>,
    /// `type` or `body` appeared twice (refused: two parsers could pick different copies).
    repeated_field: bool,
}

/// Reads our entry (`None`: not an object).
struct EntrySeed;

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = Option<RawEntry<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(IfObject(self))
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = RawEntry<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut message_type, mut body, mut repeated_field) = (None, None, false);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "type" => &mut message_type,
                "body" => &mut body,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            repeated_field |= slot.is_some();
            *slot = Some(map.next_value()?);
        }
        Ok(RawEntry {
            message_type,
            body,
            repeated_field,
        })
    }
}

/// `content.ciphertext`, with only our entry read and the others skipped.
struct RawCiphertext<'a> {
    /// Our entry: absent, not an object (`Some(None)`), or read.
    ours: Option<Option<RawEntry<'a>>>,
    recipient_count: usize,
}

/// Reads `content.ciphertext` (`None`: not an object).
struct CiphertextSeed<'k> {
    our_key: &'k str,
}

impl<'de> DeserializeSeed<'de> for CiphertextSeed<'_> {
    type Value = Option<RawCiphertext<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(IfObject(self))
    }
}

impl<'de> Visitor<'de> for CiphertextSeed<'_> {
    type Value = RawCiphertext<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ours = None;
        let mut recipient_count = 0;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.our_key {
                ours = Some(map.next_value_seed(EntrySeed)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
            recipient_count += 1;
        }
        Ok(RawCiphertext {
            ours,
            recipient_count,
        })
    }
}

/// The `content` fields the checks read, taken in the same pass as the envelope.
#[derive(Default)]
struct RawContent<'a> {
    algorithm: Option<Scalar<'a>>,
    sender_key: Option<Scalar<'a>>,
    /// Absent, not an object (`Some(None)`), or read.
    ciphertext: Option<Option<RawCiphertext<'a>>>,
}

struct ContentSeed<'k> {
    our_key: &'k str,
}

impl<'de> DeserializeSeed<'de> for ContentSeed<'_> {
    type Value = RawContent<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_> {
    type Value = RawContent<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("`content` to be an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut content = RawContent::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "algorithm" => content.algorithm = Some(map.next_value()?),
                "sender_key" => content.sender_key = Some(map.next_value()?),
                "ciphertext" => {
                    content.ciphertext = Some(map.next_value_seed(CiphertextSeed {
                        our_key: self.our_key,
                    })?)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(content)
    }
}

/// The envelope fields, with `content` read in the same pass: one scan of the event text.
struct RawEnvelope<'a> {
    event_type: Cow<'a, str>,
    sender: Cow<'a, str>,
    content: RawContent<'a>,
}

struct EnvelopeSeed<'k> {
    our_key: &'k str,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed<'_> {
    type Value = RawEnvelope<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed<'_> {
    type Value = RawEnvelope<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with string `type` and `sender` and an object `content`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut event_type, mut sender, mut content) = (None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            // A repeated field is refused, not resolved: two parsers could pick different copies.
            match key.as_ref() {
                "type" if event_type.is_some() => return Err(de::Error::duplicate_field("type")),
                "sender" if sender.is_some() => return Err(de::Error::duplicate_field("sender")),
                "content" if content.is_some() => {
                    return Err(de::Error::duplicate_field("content"))
                }
                "type" => event_type = Some(map.next_value::<Cow<'de, str>>()?),
                "sender" => sender = Some(map.next_value::<Cow<'de, str>>()?),
                "content" => {
                    content = Some(map.next_value_seed(ContentSeed {
                        our_key: self.our_key,
                    })?)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RawEnvelope {
            event_type: event_type.ok_or_else(|| de::Error::missing_field("type"))?,
            sender: sender.ok_or_else(|| de::Error::missing_field("sender"))?,
            content: content.ok_or_else(|| de::Error::missing_field("content"))?,
        })
    }
}

/// Parses `raw` and runs the envelope checks in order: envelope → algorithm → sender key →
/// ciphertext for us → Olm decode. `facts` is filled in as fields are learned.
pub fn parse_event(
    raw: &str,
    our_curve25519_key: &str,
    facts: &mut EnvelopeFacts,
) -> Result<ParsedEvent, DecryptionError> {
    check_limits(raw, JsonLimits::TO_DEVICE_EVENT)
        .map_err(|e| DecryptionError::MalformedEvent(e.to_string()))?;
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    let envelope = EnvelopeSeed {
        our_key: our_curve25519_key,
    }
    .deserialize(&mut deserializer)
    .and_then(|envelope| deserializer.end().map(|()| envelope))
    .map_err(|e| {
        DecryptionError::MalformedEvent(format!(
            "expected an object with string `type` and `sender` and an object `content`: {e}"
        ))
    })?;
    facts.sender = Some(envelope.sender.clone().into_owned());
    if envelope.event_type != ENCRYPTED_EVENT_TYPE {
        return Ok(ParsedEvent::Plain {
            event_type: envelope.event_type.into_owned(),
        });
    }
    let content = envelope.content;

    let algorithm = match content.algorithm {
        Some(Scalar::Str(algorithm)) => Some(algorithm),
        _ => None,
    };
    if algorithm.as_deref() != Some(OLM_V1_ALGORITHM) {
        return Err(DecryptionError::UnsupportedAlgorithm(
            algorithm.map(Cow::into_owned),
        ));
    }

    let sender_key = match content.sender_key {
        None => {
            return Err(DecryptionError::MissingSenderKey(
                "`sender_key` is missing".to_owned(),
            ))
        }
        Some(Scalar::UInt(_) | Scalar::Other) => {
            return Err(DecryptionError::MissingSenderKey(
                "`sender_key` is not a string".to_owned(),
            ))
        }
        Some(Scalar::Str(sender_key)) => sender_key,
    };
    facts.sender_key = Some(sender_key.clone().into_owned());
    let sender_key = Curve25519PublicKey::from_base64(&sender_key)
        .map_err(|e| DecryptionError::MissingSenderKey(format!("invalid curve25519 key: {e}")))?;

    let ciphertext = match content.ciphertext {
        None => {
            return Err(DecryptionError::MalformedCiphertext(
                "`ciphertext` is missing".to_owned(),
            ))
        }
        Some(None) => {
            return Err(DecryptionError::MalformedCiphertext(
                "`ciphertext` is not an object".to_owned(),
            ))
        }
        Some(Some(ciphertext)) => ciphertext,
    };
    let entry = ciphertext
        .ours
        .ok_or_else(|| DecryptionError::MissingCiphertext {
            our_key: our_curve25519_key.to_owned(),
            recipient_count: ciphertext.recipient_count,
        })?
        .ok_or_else(|| {
            DecryptionError::MalformedCiphertext("our entry is not an object".to_owned())
        })?;
    let (message_type, body) = match entry {
        RawEntry {
            message_type: Some(Scalar::UInt(message_type @ 0..=255)),
            body: Some(Scalar::Str(body)),
            repeated_field: false,
        } => (message_type as u8, body),
        _ => {
            return Err(DecryptionError::MalformedCiphertext(
                "our entry needs an integer `type` and a string `body`".to_owned(),
            ))
        }
    };
    facts.message_type = Some(message_type);
    if message_type > 1 {
        return Err(DecryptionError::MalformedCiphertext(format!(
            "message type {} is neither 0 (pre-key) nor 1 (normal)",
            message_type
        )));
    }
    let bytes = vodozemac::base64_decode(body.as_bytes())
        .map_err(|e| DecryptionError::MalformedCiphertext(format!("body is not base64: {e}")))?;
    let message = OlmMessage::from_parts(message_type.into(), &bytes).map_err(|e| {
        DecryptionError::MalformedCiphertext(format!("undecodable Olm message: {e}"))
    })?;
    let message_hash = MessageHash::new(&sender_key, message_type, &bytes);
    facts.message_hash = Some(message_hash);
    Ok(ParsedEvent::Olm(Box::new(OlmEnvelope {
        sender: envelope.sender.into_owned(),
        message_hash,
        sender_key,
        message,
    })))
}
