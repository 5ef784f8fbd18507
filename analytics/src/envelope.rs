//! The pure-JSON envelope classifier: from a raw to-device event to the Olm ciphertext addressed to
//! one device, or the [`FailureReason`] of the first envelope check that fails.
//!
//! These checks need no key material and no Olm machine — only the recipient's public Curve25519
//! key — so any SDK can run them on an event it is about to decrypt or has already rejected, and
//! name the failure exactly as this project's decryptor does (it runs these same checks). In order:
//!
//! 1. limits and shape: at most 256 KiB and 64 levels, an object with string `type` and `sender`
//!    and an object `content` ([`FailureReason::MalformedEvent`]); an event whose `type` is not
//!    `m.room.encrypted` is [`ToDeviceEnvelope::Plain`];
//! 2. `content.algorithm` is `m.olm.v1.curve25519-aes-sha2` ([`FailureReason::UnsupportedAlgorithm`]);
//! 3. `content.sender_key` is an unpadded base64 Curve25519 key ([`FailureReason::MissingSenderKey`]);
//! 4. `content.ciphertext` is an object with an entry for our key
//!    ([`FailureReason::MalformedCiphertext`], [`FailureReason::MissingCiphertext`]);
//! 5. that entry has an integer `type` 0 or 1 and a base64 `body`
//!    ([`FailureReason::MalformedCiphertext`]).
//!
//! Decoding the Olm message itself (protobuf framing, keys, MAC length) needs an Olm library and is
//! left to the caller; a body that does not decode is also [`FailureReason::MalformedCiphertext`].
//!
//! The event is read in one pass: only the fields the checks need are materialized (borrowed where
//! the text allows), other recipients' ciphertexts are skipped without being copied, and fields of
//! the wrong type are remembered rather than failing the parse, so each check names its own failure.
//!
//! ```
//! use to_device_analytics::envelope::{parse_to_device_event, EnvelopeFacts, ToDeviceEnvelope};
//! use to_device_analytics::FailureReason;
//!
//! let our_key = "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI";
//! let event = r#"{"type": "m.room.encrypted", "sender": "@alice:example.org",
//!     "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."}}"#;
//! let mut facts = EnvelopeFacts::default();
//! let error = parse_to_device_event(event, our_key, &mut facts).unwrap_err();
//! assert_eq!(error.reason(), FailureReason::UnsupportedAlgorithm);
//! assert_eq!(facts.sender.as_deref(), Some("@alice:example.org"));
//!
//! let plain = r#"{"type": "m.dummy", "sender": "@alice:example.org", "content": {}}"#;
//! assert!(matches!(
//!     parse_to_device_event(plain, our_key, &mut EnvelopeFacts::default()),
//!     Ok(ToDeviceEnvelope::Plain { .. })
//! ));
//! ```

use std::borrow::Cow;

use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
use base64::{alphabet, Engine};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::json::{check_limits, JsonLimits};
use crate::taxonomy::FailureReason;

/// The event type of encrypted to-device events.
pub const ENCRYPTED_EVENT_TYPE: &str = "m.room.encrypted";

/// The only algorithm of encrypted to-device events this classifier accepts: Olm v1.
pub const OLM_V1_ALGORITHM: &str = "m.olm.v1.curve25519-aes-sha2";

/// Matrix's unpadded base64, decoding padded input too (the same rule as vodozemac's
/// `base64_decode`, so that the classifier and the decryptor agree on every body and key).
const MATRIX_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    general_purpose::NO_PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the checks learned about an event before it failed, for local diagnostics and for the
/// reporting policy's per-sender window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvelopeFacts {
    /// The envelope `sender`.
    pub sender: Option<String>,
    /// The envelope `content.sender_key`, as sent.
    pub sender_key: Option<String>,
    /// The message type of our ciphertext entry.
    pub message_type: Option<u8>,
}

/// A to-device event that passed the envelope checks.
#[derive(Debug, PartialEq, Eq)]
pub enum ToDeviceEnvelope<'a> {
    /// Not an `m.room.encrypted` event: nothing to decrypt.
    Plain {
        /// The event type.
        event_type: Cow<'a, str>,
    },
    /// An Olm message addressed to the given key, ready to be decoded and decrypted.
    Olm(OlmCiphertext),
}

/// Our entry of an Olm-encrypted event, with everything the decryptor needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OlmCiphertext {
    /// The envelope `sender`.
    pub sender: String,
    /// The sender's Curve25519 key (`content.sender_key`), decoded.
    pub sender_key: [u8; 32],
    /// 0 for a pre-key message, 1 for a normal message.
    pub message_type: u8,
    /// The decoded Olm message bytes (`body`).
    pub body: Vec<u8>,
}

/// Why an event failed the envelope checks. Each variant maps to one [`FailureReason`]
/// ([`EnvelopeError::reason`]); the messages are for engineers reading a log and never reach
/// analytics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The envelope is not a valid to-device event.
    #[error("malformed to-device event: {0}")]
    MalformedEvent(String),
    /// The content's algorithm is missing or not Olm v1.
    #[error("unsupported to-device encryption algorithm {0:?}, only m.olm.v1.curve25519-aes-sha2 can be decrypted")]
    UnsupportedAlgorithm(Option<String>),
    /// `sender_key` is missing or invalid.
    #[error("the encrypted content has no valid sender_key: {0}")]
    MissingSenderKey(String),
    /// No ciphertext for our key.
    #[error("the event has no ciphertext for this device's curve25519 key {our_key}; it was encrypted for {recipient_count} other key(s)")]
    MissingCiphertext {
        /// Our Curve25519 key.
        our_key: String,
        /// How many recipient keys the event was encrypted for.
        recipient_count: usize,
    },
    /// The ciphertext is unusable.
    #[error("malformed Olm ciphertext: {0}")]
    MalformedCiphertext(String),
}

impl EnvelopeError {
    /// The failure reason of this error.
    pub const fn reason(&self) -> FailureReason {
        match self {
            Self::MalformedEvent(_) => FailureReason::MalformedEvent,
            Self::UnsupportedAlgorithm(_) => FailureReason::UnsupportedAlgorithm,
            Self::MissingSenderKey(_) => FailureReason::MissingSenderKey,
            Self::MissingCiphertext { .. } => FailureReason::MissingCiphertext,
            Self::MalformedCiphertext(_) => FailureReason::MalformedCiphertext,
        }
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

/// Parses `raw` and runs the envelope checks in order (see the module documentation) for the
/// device whose Curve25519 key is `our_curve25519_key` (unpadded base64, as published).
/// `facts` is filled in as fields are learned, also when a later check fails.
pub fn parse_to_device_event<'a>(
    raw: &'a str,
    our_curve25519_key: &str,
    facts: &mut EnvelopeFacts,
) -> Result<ToDeviceEnvelope<'a>, EnvelopeError> {
    check_limits(raw, JsonLimits::TO_DEVICE_EVENT)
        .map_err(|e| EnvelopeError::MalformedEvent(e.to_string()))?;
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    let envelope = EnvelopeSeed {
        our_key: our_curve25519_key,
    }
    .deserialize(&mut deserializer)
    .and_then(|envelope| deserializer.end().map(|()| envelope))
    .map_err(|e| {
        EnvelopeError::MalformedEvent(format!(
            "expected an object with string `type` and `sender` and an object `content`: {e}"
        ))
    })?;
    facts.sender = Some(envelope.sender.clone().into_owned());
    if envelope.event_type != ENCRYPTED_EVENT_TYPE {
        return Ok(ToDeviceEnvelope::Plain {
            event_type: envelope.event_type,
        });
    }
    let content = envelope.content;

    let algorithm = match content.algorithm {
        Some(Scalar::Str(algorithm)) => Some(algorithm),
        _ => None,
    };
    if algorithm.as_deref() != Some(OLM_V1_ALGORITHM) {
        return Err(EnvelopeError::UnsupportedAlgorithm(
            algorithm.map(Cow::into_owned),
        ));
    }

    let sender_key_text = match content.sender_key {
        None => {
            return Err(EnvelopeError::MissingSenderKey(
                "`sender_key` is missing".to_owned(),
            ))
        }
        Some(Scalar::UInt(_) | Scalar::Other) => {
            return Err(EnvelopeError::MissingSenderKey(
                "`sender_key` is not a string".to_owned(),
            ))
        }
        Some(Scalar::Str(sender_key)) => sender_key,
    };
    facts.sender_key = Some(sender_key_text.clone().into_owned());
    let sender_key = decode_curve25519_key(&sender_key_text)
        .map_err(|e| EnvelopeError::MissingSenderKey(format!("invalid curve25519 key: {e}")))?;

    let ciphertext = match content.ciphertext {
        None => {
            return Err(EnvelopeError::MalformedCiphertext(
                "`ciphertext` is missing".to_owned(),
            ))
        }
        Some(None) => {
            return Err(EnvelopeError::MalformedCiphertext(
                "`ciphertext` is not an object".to_owned(),
            ))
        }
        Some(Some(ciphertext)) => ciphertext,
    };
    let entry = ciphertext
        .ours
        .ok_or_else(|| EnvelopeError::MissingCiphertext {
            our_key: our_curve25519_key.to_owned(),
            recipient_count: ciphertext.recipient_count,
        })?
        .ok_or_else(|| {
            EnvelopeError::MalformedCiphertext("our entry is not an object".to_owned())
        })?;
    let (message_type, body) = match entry {
        RawEntry {
            message_type: Some(Scalar::UInt(message_type @ 0..=255)),
            body: Some(Scalar::Str(body)),
            repeated_field: false,
        } => (message_type as u8, body),
        _ => {
            return Err(EnvelopeError::MalformedCiphertext(
                "our entry needs an integer `type` and a string `body`".to_owned(),
            ))
        }
    };
    facts.message_type = Some(message_type);
    if message_type > 1 {
        return Err(EnvelopeError::MalformedCiphertext(format!(
            "message type {message_type} is neither 0 (pre-key) nor 1 (normal)"
        )));
    }
    let body = MATRIX_BASE64
        .decode(body.as_bytes())
        .map_err(|e| EnvelopeError::MalformedCiphertext(format!("body is not base64: {e}")))?;
    Ok(ToDeviceEnvelope::Olm(OlmCiphertext {
        sender: envelope.sender.into_owned(),
        sender_key,
        message_type,
        body,
    }))
}

/// Decodes a Curve25519 public key as vodozemac's `Curve25519PublicKey::from_base64` does: base64,
/// padded or not, of exactly 32 bytes (any 32 bytes are a valid X25519 public key).
fn decode_curve25519_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = MATRIX_BASE64
        .decode(text.as_bytes())
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes instead of 32", bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OUR_KEY: &str = "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI";
    const SENDER_KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo";

    fn event(content: serde_json::Value) -> String {
        json!({"type": "m.room.encrypted", "sender": "@alice:example.org", "content": content})
            .to_string()
    }

    fn olm_content(entry: serde_json::Value) -> serde_json::Value {
        json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": SENDER_KEY,
               "ciphertext": {OUR_KEY: entry, "otherkey": {"type": 0, "body": "AAAA"}}})
    }

    fn classify(raw: &str) -> Result<ToDeviceEnvelope<'_>, FailureReason> {
        parse_to_device_event(raw, OUR_KEY, &mut EnvelopeFacts::default()).map_err(|e| e.reason())
    }

    #[test]
    fn every_envelope_rule_names_its_reason() {
        use FailureReason::*;
        let cases: Vec<(&str, String, FailureReason)> = vec![
            ("not an object", "[1]".to_owned(), MalformedEvent),
            (
                "no content",
                json!({"type": "m.room.encrypted", "sender": "@a:b"}).to_string(),
                MalformedEvent,
            ),
            (
                "sender a number",
                json!({"type": "m.room.encrypted", "sender": 1, "content": {}}).to_string(),
                MalformedEvent,
            ),
            (
                "repeated type",
                r#"{"type":"m.room.encrypted","type":"x","sender":"@a:b","content":{}}"#.to_owned(),
                MalformedEvent,
            ),
            (
                "trailing text",
                format!("{} x", event(json!({}))),
                MalformedEvent,
            ),
            (
                "too deep",
                format!("{}{}", "[".repeat(65), "]".repeat(65)),
                MalformedEvent,
            ),
            (
                "megolm",
                event(json!({"algorithm": "m.megolm.v1.aes-sha2"})),
                UnsupportedAlgorithm,
            ),
            (
                "no algorithm",
                event(json!({"sender_key": SENDER_KEY})),
                UnsupportedAlgorithm,
            ),
            (
                "no sender_key",
                event(json!({"algorithm": OLM_V1_ALGORITHM})),
                MissingSenderKey,
            ),
            (
                "sender_key a number",
                event(json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": 7})),
                MissingSenderKey,
            ),
            (
                "short sender_key",
                event(json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": "AAAA"})),
                MissingSenderKey,
            ),
            (
                "sender_key not base64",
                event(json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": "!".repeat(43)})),
                MissingSenderKey,
            ),
            (
                "no ciphertext",
                event(json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": SENDER_KEY})),
                MalformedCiphertext,
            ),
            (
                "ciphertext a string",
                event(
                    json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": SENDER_KEY, "ciphertext": "x"}),
                ),
                MalformedCiphertext,
            ),
            (
                "not for us",
                event(
                    json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": SENDER_KEY, "ciphertext": {"otherkey": {}}}),
                ),
                MissingCiphertext,
            ),
            (
                "our entry a string",
                event(olm_content(json!("x"))),
                MalformedCiphertext,
            ),
            (
                "type 2",
                event(olm_content(json!({"type": 2, "body": "AAAA"}))),
                MalformedCiphertext,
            ),
            (
                "type a string",
                event(olm_content(json!({"type": "0", "body": "AAAA"}))),
                MalformedCiphertext,
            ),
            (
                "body not base64",
                event(olm_content(json!({"type": 0, "body": "!!!"}))),
                MalformedCiphertext,
            ),
        ];
        for (label, raw, expected) in cases {
            assert_eq!(classify(&raw).err(), Some(expected), "{label}: {raw}");
        }
    }

    #[test]
    fn a_well_formed_event_yields_our_decoded_entry_and_its_facts() {
        let raw = event(olm_content(json!({"type": 1, "body": "AQID"})));
        let mut facts = EnvelopeFacts::default();
        let Ok(ToDeviceEnvelope::Olm(ciphertext)) =
            parse_to_device_event(&raw, OUR_KEY, &mut facts)
        else {
            panic!("expected an Olm ciphertext");
        };
        assert_eq!(ciphertext.sender, "@alice:example.org");
        assert_eq!(ciphertext.message_type, 1);
        assert_eq!(ciphertext.body, [1, 2, 3]);
        assert_eq!(
            ciphertext.sender_key,
            <[u8; 32]>::try_from(MATRIX_BASE64.decode(SENDER_KEY).unwrap()).unwrap()
        );
        assert_eq!(
            facts,
            EnvelopeFacts {
                sender: Some("@alice:example.org".to_owned()),
                sender_key: Some(SENDER_KEY.to_owned()),
                message_type: Some(1),
            }
        );
    }

    #[test]
    fn a_padded_sender_key_is_accepted_like_vodozemac_does() {
        let padded = format!("{SENDER_KEY}=");
        let raw = event(json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": padded,
                                "ciphertext": {OUR_KEY: {"type": 0, "body": "AAAA"}}}));
        assert!(matches!(classify(&raw), Ok(ToDeviceEnvelope::Olm(_))));
    }

    #[test]
    fn plain_events_pass_through_with_their_type() {
        let raw = json!({"type": "m.dummy", "sender": "@a:b", "content": {}}).to_string();
        assert_eq!(
            classify(&raw).ok(),
            Some(ToDeviceEnvelope::Plain {
                event_type: Cow::Borrowed("m.dummy")
            })
        );
    }

    #[test]
    fn the_recipient_count_counts_other_keys() {
        let raw = event(
            json!({"algorithm": OLM_V1_ALGORITHM, "sender_key": SENDER_KEY,
                                "ciphertext": {"k1": {}, "k2": {}}}),
        );
        let error =
            parse_to_device_event(&raw, OUR_KEY, &mut EnvelopeFacts::default()).unwrap_err();
        assert_eq!(
            error,
            EnvelopeError::MissingCiphertext {
                our_key: OUR_KEY.to_owned(),
                recipient_count: 2
            }
        );
    }
}
