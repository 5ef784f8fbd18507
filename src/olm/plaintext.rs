//! The checks on a decrypted Olm plaintext (spec: "Validation of incoming decrypted events").
//!
//! They run in order — plaintext JSON → `sender` → `recipient` → `recipient_keys` →
//! `sender_device_keys` → `keys.ed25519` — and the first failing check names the failure.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use vodozemac::Curve25519PublicKey;

use super::device_keys::{DeviceKeys, DeviceKeysError, KnownDevices};
use crate::error::DecryptionError;
use crate::json::{check_limits, JsonLimits};

/// The event type that may be accepted from an unknown device (see [`check_plaintext`]).
pub const ROOM_KEY_EVENT_TYPE: &str = "m.room_key";

#[derive(Deserialize)]
struct RawPlaintext<'a> {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    content: &'a RawValue,
    sender: String,
    recipient: String,
    recipient_keys: Ed25519Only,
    keys: Ed25519Only,
    #[serde(default, borrow)]
    sender_device_keys: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Ed25519Only {
    ed25519: String,
}

/// Who we are and what we know about the sender, as the plaintext checks need it.
pub struct PlaintextContext<'a> {
    /// Our user id.
    pub our_user_id: &'a str,
    /// Our Ed25519 key, unpadded base64.
    pub our_ed25519: &'a str,
    /// The envelope `sender`.
    pub envelope_sender: &'a str,
    /// The envelope `sender_key`, authenticated by Olm.
    pub sender_key: &'a Curve25519PublicKey,
    /// The devices known from `/keys/query`.
    pub known_devices: &'a KnownDevices,
}

/// A plaintext that passed every check.
#[derive(Debug)]
pub struct AcceptedPlaintext<'a> {
    /// The decrypted event type.
    pub event_type: String,
    /// The decrypted event content (a JSON object).
    pub content: Value,
    /// `content` as it was sent, borrowed from the plaintext: stored as is, so that the outbox
    /// does not serialize `content` again.
    pub raw_content: &'a RawValue,
    /// The sender's Ed25519 key as claimed by `keys.ed25519`.
    pub sender_ed25519: String,
    /// The sending device's id, when the device is known.
    pub sender_device_id: Option<String>,
    /// Whether the Ed25519 key was confirmed by a signed device-keys object.
    pub sender_device_verified: bool,
    /// The verified `sender_device_keys`, when they (not `/keys/query`) identified the sending
    /// device: the machine remembers such devices for session recovery only.
    pub unknown_sender_device_keys: Option<&'a RawValue>,
    /// `unknown_sender_device_keys` as the check parsed them, when this message's check did (the
    /// first message carrying this text); `None` when the verified-keys cache knew the text. Saves
    /// the machine a second parse and key decoding of a new device.
    pub unknown_sender_device: Option<DeviceKeys>,
}

/// Remembers `sender_device_keys` objects whose signature already verified, by their exact text,
/// so that parsing, key decoding and the ~50 µs signature check run once per device instead of
/// once per message.
///
/// A hit means this very text was parsed and verified before, so its fields are the ones cached;
/// the comparisons with the message (sender, keys, known devices) still run on every message.
/// Memory stays bounded (~2.5 MB at worst): at most [`Self::MAX_ENTRIES`] entries, and objects
/// longer than [`Self::MAX_TEXT_BYTES`] are verified every time instead of cached. (A SHA-256 of
/// the text as the key instead measured +29 k instructions per message, +8 %.)
#[derive(Debug, Default)]
pub struct VerifiedDeviceKeysCache {
    verified: HashMap<Box<str>, VerifiedFields>,
}

#[derive(Debug)]
struct VerifiedFields {
    user_id: String,
    device_id: String,
    curve25519: String,
    ed25519: String,
}

impl VerifiedDeviceKeysCache {
    const MAX_ENTRIES: usize = 1024;
    /// Real device-keys objects are ~500–700 bytes.
    const MAX_TEXT_BYTES: usize = 2048;

    fn get(&self, raw: &str) -> Option<DeviceKeyFields<'_>> {
        self.verified.get(raw).map(|fields| DeviceKeyFields {
            user_id: &fields.user_id,
            device_id: &fields.device_id,
            curve25519: &fields.curve25519,
            ed25519: &fields.ed25519,
        })
    }

    fn insert(&mut self, raw: &str, fields: &DeviceKeyFields<'_>) {
        if raw.len() > Self::MAX_TEXT_BYTES {
            return;
        }
        if self.verified.len() >= Self::MAX_ENTRIES {
            self.verified.clear();
        }
        self.verified.insert(
            raw.into(),
            VerifiedFields {
                user_id: fields.user_id.to_owned(),
                device_id: fields.device_id.to_owned(),
                curve25519: fields.curve25519.to_owned(),
                ed25519: fields.ed25519.to_owned(),
            },
        );
    }
}

/// The fields of a device-keys object the checks compare, borrowed as sent.
struct DeviceKeyFields<'a> {
    user_id: &'a str,
    device_id: &'a str,
    curve25519: &'a str,
    ed25519: &'a str,
}

impl<'a> DeviceKeyFields<'a> {
    fn read(value: &'a Value) -> Result<Self, DeviceKeysError> {
        let object = value.as_object().ok_or(DeviceKeysError::NotAnObject)?;
        let field = |name: &'static str| {
            object
                .get(name)
                .and_then(Value::as_str)
                .ok_or(DeviceKeysError::MissingField(name))
        };
        let user_id = field("user_id")?;
        let device_id = field("device_id")?;
        let keys = object
            .get("keys")
            .and_then(Value::as_object)
            .ok_or(DeviceKeysError::MissingField("keys"))?;
        let key = |algorithm: &str, missing: &'static str| {
            keys.get(&format!("{algorithm}:{device_id}"))
                .and_then(Value::as_str)
                .ok_or(DeviceKeysError::MissingField(missing))
        };
        Ok(Self {
            curve25519: key("curve25519", "keys.curve25519:<device_id>")?,
            ed25519: key("ed25519", "keys.ed25519:<device_id>")?,
            user_id,
            device_id,
        })
    }
}

/// The sending device as identified by the checks.
struct SenderDevice {
    device_id: String,
    ed25519: String,
}

/// Runs every plaintext check on decrypted `bytes`.
///
/// An unknown sending device without `sender_device_keys` is accepted only for `m.room_key`
/// events (with `sender_device_verified: false`), as matrix-sdk-crypto does, so that room keys
/// sent right after a login are not lost; other event types fail with `MissingSigningKey`.
pub fn check_plaintext<'a>(
    bytes: &'a [u8],
    context: &PlaintextContext<'_>,
    cache: &mut VerifiedDeviceKeysCache,
) -> Result<AcceptedPlaintext<'a>, DecryptionError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DecryptionError::JsonError(format!("the plaintext is not UTF-8: {e}")))?;
    // The same limits as the event: `content` is parsed on its own and stored one level deeper in
    // the outbox, so it must stay well inside serde_json's nesting limit in both places.
    check_limits(text, JsonLimits::TO_DEVICE_EVENT)
        .map_err(|e| DecryptionError::JsonError(format!("the plaintext: {e}")))?;
    let plaintext: RawPlaintext<'a> =
        serde_json::from_str(text).map_err(|e| DecryptionError::JsonError(e.to_string()))?;
    let content: Value = serde_json::from_str(plaintext.content.get())
        .map_err(|e| DecryptionError::JsonError(e.to_string()))?;
    if !content.is_object() {
        return Err(DecryptionError::JsonError(
            "`content` is not an object".to_owned(),
        ));
    }
    if plaintext.sender != context.envelope_sender {
        return Err(DecryptionError::MismatchedSender {
            envelope: context.envelope_sender.to_owned(),
            plaintext: plaintext.sender,
        });
    }
    if plaintext.recipient != context.our_user_id {
        return Err(DecryptionError::MismatchedRecipient {
            expected: context.our_user_id.to_owned(),
            found: plaintext.recipient,
        });
    }
    if plaintext.recipient_keys.ed25519 != context.our_ed25519 {
        return Err(DecryptionError::MismatchedRecipientKeys {
            expected: context.our_ed25519.to_owned(),
            found: plaintext.recipient_keys.ed25519,
        });
    }

    let claimed_ed25519 = plaintext.keys.ed25519;
    let (sender_device, parsed_sender_device) = match plaintext.sender_device_keys {
        Some(raw) => {
            let (device, parsed) = check_sender_device_keys(raw, &claimed_ed25519, context, cache)
                .map_err(DecryptionError::InvalidSenderDeviceKeys)?;
            (Some(device), parsed)
        }
        None => (None, None),
    };
    let known_device = context
        .known_devices
        .by_curve25519(context.envelope_sender, context.sender_key)
        .map(|device| SenderDevice {
            device_id: device.device_id.clone(),
            ed25519: device.ed25519.to_base64(),
        });
    // Devices known only from sender_device_keys are remembered for recovery (by the machine),
    // never as known devices here: without sender_device_keys, a later message from such a
    // device is MissingSigningKey again, as in matrix-sdk-crypto.
    let (unknown_sender_device_keys, unknown_sender_device) = match (&known_device, &sender_device)
    {
        (None, Some(_)) => (plaintext.sender_device_keys, parsed_sender_device),
        _ => (None, None),
    };
    let (sender_device_id, verified) = match known_device.or(sender_device) {
        Some(device) => {
            let known = device.ed25519;
            if known != claimed_ed25519 {
                return Err(DecryptionError::MismatchedSenderKeys {
                    known,
                    claimed: claimed_ed25519,
                });
            }
            (Some(device.device_id), true)
        }
        None if plaintext.event_type == ROOM_KEY_EVENT_TYPE => (None, false),
        None => {
            return Err(DecryptionError::MissingSigningKey {
                sender: plaintext.sender,
                sender_key: context.sender_key.to_base64(),
                event_type: plaintext.event_type,
            })
        }
    };
    Ok(AcceptedPlaintext {
        event_type: plaintext.event_type,
        content,
        raw_content: plaintext.content,
        sender_ed25519: claimed_ed25519,
        sender_device_id,
        sender_device_verified: verified,
        unknown_sender_device_keys,
        unknown_sender_device,
    })
}

/// Checks `sender_device_keys`; on a cache miss also returns the keys as parsed and verified.
fn check_sender_device_keys(
    raw: &RawValue,
    claimed_ed25519: &str,
    context: &PlaintextContext<'_>,
    cache: &mut VerifiedDeviceKeysCache,
) -> Result<(SenderDevice, Option<DeviceKeys>), DeviceKeysError> {
    if let Some(fields) = cache.get(raw.get()) {
        return compare_sender_device_keys(&fields, claimed_ed25519, context)
            .map(|device| (device, None));
    }
    let value: Value = serde_json::from_str(raw.get()).map_err(|_| DeviceKeysError::NotAnObject)?;
    let fields = DeviceKeyFields::read(&value)?;
    let device = compare_sender_device_keys(&fields, claimed_ed25519, context)?;
    let parsed = DeviceKeys::from_signed_json(&value)?;
    cache.insert(raw.get(), &fields);
    Ok((device, Some(parsed)))
}

/// The checks of `sender_device_keys` against the message and the known devices.
fn compare_sender_device_keys(
    fields: &DeviceKeyFields<'_>,
    claimed_ed25519: &str,
    context: &PlaintextContext<'_>,
) -> Result<SenderDevice, DeviceKeysError> {
    // Compared as the base64 strings that were sent, so that a cached device costs no key decoding.
    let sender_key = context.sender_key.to_base64();
    let mismatch =
        |expected: String, found: String| DeviceKeysError::Mismatched { expected, found };
    if fields.user_id != context.envelope_sender {
        return Err(mismatch(
            context.envelope_sender.to_owned(),
            fields.user_id.to_owned(),
        ));
    }
    if fields.curve25519 != sender_key {
        return Err(mismatch(
            format!("curve25519 key {sender_key}"),
            format!("curve25519 key {}", fields.curve25519),
        ));
    }
    if fields.ed25519 != claimed_ed25519 {
        return Err(mismatch(
            format!("ed25519 key {claimed_ed25519} (keys.ed25519)"),
            format!("ed25519 key {}", fields.ed25519),
        ));
    }
    let known_by_key = context
        .known_devices
        .by_curve25519(fields.user_id, context.sender_key);
    let known_by_id = context
        .known_devices
        .by_id(fields.user_id, fields.device_id);
    let contradicts = |known: &DeviceKeys| {
        known.device_id != fields.device_id
            || known.curve25519.to_base64() != fields.curve25519
            || known.ed25519.to_base64() != fields.ed25519
    };
    if known_by_key.into_iter().chain(known_by_id).any(contradicts) {
        return Err(DeviceKeysError::ContradictsKnownKeys {
            user_id: fields.user_id.to_owned(),
            device_id: fields.device_id.to_owned(),
        });
    }
    Ok(SenderDevice {
        device_id: fields.device_id.to_owned(),
        ed25519: fields.ed25519.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::simulator::{Recipient, SimulatedDevice};

    const ALICE: &str = "@alice:example.org";
    const BOB: &str = "@bob:example.org";

    fn bob() -> Recipient {
        Recipient::from_device(
            &SimulatedDevice::new(BOB, "BOBDEVICE")
                .published_keys()
                .device,
        )
    }

    /// The verified-keys cache is keyed by the exact text: a hit skips parsing and the signature,
    /// never the comparisons with the message, and any other text is verified afresh.
    #[test]
    fn cached_device_keys_still_meet_every_check() {
        let alice = SimulatedDevice::new(ALICE, "ALICEDEVICE");
        let to_bob = bob();
        let good = alice.plaintext(&to_bob, "m.dummy", json!({}), true);
        let no_devices = KnownDevices::default();
        let mut cache = VerifiedDeviceKeysCache::default();
        let mut check = |plaintext: &Value, sender: &str, known: &KnownDevices| {
            let context = PlaintextContext {
                our_user_id: BOB,
                our_ed25519: &to_bob.ed25519.to_base64(),
                envelope_sender: sender,
                sender_key: &alice.curve25519_key(),
                known_devices: known,
            };
            let bytes = plaintext.to_string().into_bytes();
            let result =
                check_plaintext(&bytes, &context, &mut cache).map(|a| a.sender_device_verified);
            (result, cache.verified.len())
        };

        assert!(matches!(check(&good, ALICE, &no_devices), (Ok(true), 1)));
        // A hit: the same text again.
        assert!(matches!(check(&good, ALICE, &no_devices), (Ok(true), 1)));
        // A hit still compares with the message: keys of Alice's device sent by Mallory.
        let mut as_mallory = good.clone();
        as_mallory["sender"] = json!("@mallory:example.org");
        assert!(matches!(
            check(&as_mallory, "@mallory:example.org", &no_devices),
            (
                Err(DecryptionError::InvalidSenderDeviceKeys(
                    DeviceKeysError::Mismatched { .. }
                )),
                1
            )
        ));
        // A hit still compares with /keys/query: a contradicting known device is refused.
        let mut contradicting = KnownDevices::default();
        contradicting.insert(
            SimulatedDevice::new(ALICE, "ALICEDEVICE")
                .published_keys()
                .device,
        );
        assert!(matches!(
            check(&good, ALICE, &contradicting),
            (Err(DecryptionError::InvalidSenderDeviceKeys(_)), 1)
        ));
        // The same fields with a broken signature are another text: verified, refused, not cached.
        let mut forged = good.clone();
        let signature =
            &mut forged["sender_device_keys"]["signatures"][ALICE]["ed25519:ALICEDEVICE"];
        let mut text = signature.as_str().unwrap().to_owned();
        let replacement = if text.starts_with("AAAA") {
            "BBBB"
        } else {
            "AAAA"
        };
        text.replace_range(0..4, replacement);
        *signature = json!(text);
        assert!(matches!(
            check(&forged, ALICE, &no_devices),
            (Err(DecryptionError::InvalidSenderDeviceKeys(_)), 1)
        ));
    }

    /// Device keys longer than real ones are verified on every message rather than cached, so
    /// that a sender cannot fill the cache with huge entries.
    #[test]
    fn oversized_device_keys_are_verified_but_not_cached() {
        let long_device_id = "D".repeat(1000);
        let alice = SimulatedDevice::new(ALICE, &long_device_id);
        let to_bob = bob();
        let plaintext = alice.plaintext(&to_bob, "m.dummy", json!({}), true);
        let known = KnownDevices::default();
        let context = PlaintextContext {
            our_user_id: BOB,
            our_ed25519: &to_bob.ed25519.to_base64(),
            envelope_sender: ALICE,
            sender_key: &alice.curve25519_key(),
            known_devices: &known,
        };
        let mut cache = VerifiedDeviceKeysCache::default();
        let bytes = plaintext.to_string().into_bytes();
        for _ in 0..2 {
            let accepted = check_plaintext(&bytes, &context, &mut cache).unwrap();
            assert_eq!(accepted.sender_device_id.as_deref(), Some(&*long_device_id));
            assert!(cache.verified.is_empty());
        }
    }
}
