//! The checks on a decrypted Olm plaintext (spec: "Validation of incoming decrypted events").
//!
//! They run in order — plaintext JSON → `sender` → `recipient` → `recipient_keys` →
//! `sender_device_keys` → `keys.ed25519` — and the first failing check names the failure.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::Value;
use vodozemac::Curve25519PublicKey;

use super::device_keys::{DeviceKeys, DeviceKeysError, KnownDevices};
use crate::error::DecryptionError;

/// The event type that may be accepted from an unknown device (see [`check_plaintext`]).
pub const ROOM_KEY_EVENT_TYPE: &str = "m.room_key";

#[derive(Deserialize)]
struct RawPlaintext {
    #[serde(rename = "type")]
    event_type: String,
    content: Value,
    sender: String,
    recipient: String,
    recipient_keys: Ed25519Only,
    keys: Ed25519Only,
    #[serde(default)]
    sender_device_keys: Option<Value>,
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
pub struct AcceptedPlaintext {
    /// The decrypted event type.
    pub event_type: String,
    /// The decrypted event content (a JSON object).
    pub content: Value,
    /// The sender's Ed25519 key as claimed by `keys.ed25519`.
    pub sender_ed25519: String,
    /// The sending device's id, when the device is known.
    pub sender_device_id: Option<String>,
    /// Whether the Ed25519 key was confirmed by a signed device-keys object.
    pub sender_device_verified: bool,
}

/// Remembers `sender_device_keys` objects whose signature already verified, so that the ~50 µs
/// signature check runs once per device instead of once per message.
///
/// The cache key holds every field the checks use plus the signature, so a different object can
/// only hit the cache if it carries the same identity, keys and signature.
#[derive(Debug, Default)]
pub struct VerifiedDeviceKeysCache {
    verified: HashSet<String>,
}

impl VerifiedDeviceKeysCache {
    const MAX_ENTRIES: usize = 4096;

    fn verify(&mut self, device: &DeviceKeys) -> Result<(), DeviceKeysError> {
        let key = device.self_signature().map(|signature| {
            format!(
                "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{signature}",
                device.user_id,
                device.device_id,
                device.curve25519.to_base64(),
                device.ed25519.to_base64()
            )
        });
        if key.as_ref().is_some_and(|key| self.verified.contains(key)) {
            return Ok(());
        }
        device.verify_self_signature()?;
        if let Some(key) = key {
            if self.verified.len() >= Self::MAX_ENTRIES {
                self.verified.clear();
            }
            self.verified.insert(key);
        }
        Ok(())
    }
}

/// Runs every plaintext check on decrypted `bytes`.
///
/// An unknown sending device without `sender_device_keys` is accepted only for `m.room_key`
/// events (with `sender_device_verified: false`), as matrix-sdk-crypto does, so that room keys
/// sent right after a login are not lost; other event types fail with `MissingSigningKey`.
pub fn check_plaintext(
    bytes: &[u8],
    context: &PlaintextContext<'_>,
    cache: &mut VerifiedDeviceKeysCache,
) -> Result<AcceptedPlaintext, DecryptionError> {
    let plaintext: RawPlaintext =
        serde_json::from_slice(bytes).map_err(|e| DecryptionError::JsonError(e.to_string()))?;
    if !plaintext.content.is_object() {
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
    let sender_device = match &plaintext.sender_device_keys {
        Some(value) => Some(
            check_sender_device_keys(value, &claimed_ed25519, context, cache)
                .map_err(DecryptionError::InvalidSenderDeviceKeys)?,
        ),
        None => None,
    };
    let known_device = context
        .known_devices
        .by_curve25519(context.envelope_sender, context.sender_key);
    let device = known_device.or(sender_device.as_ref());
    let (sender_device_id, verified) = match device {
        Some(device) => {
            let known = device.ed25519.to_base64();
            if known != claimed_ed25519 {
                return Err(DecryptionError::MismatchedSenderKeys {
                    known,
                    claimed: claimed_ed25519,
                });
            }
            (Some(device.device_id.clone()), true)
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
        content: plaintext.content,
        sender_ed25519: claimed_ed25519,
        sender_device_id,
        sender_device_verified: verified,
    })
}

fn check_sender_device_keys(
    value: &Value,
    claimed_ed25519: &str,
    context: &PlaintextContext<'_>,
    cache: &mut VerifiedDeviceKeysCache,
) -> Result<DeviceKeys, DeviceKeysError> {
    let device = DeviceKeys::from_json_unverified(value)?;
    let mismatch =
        |expected: String, found: String| DeviceKeysError::Mismatched { expected, found };
    if device.user_id != context.envelope_sender {
        return Err(mismatch(
            context.envelope_sender.to_owned(),
            device.user_id.clone(),
        ));
    }
    if device.curve25519 != *context.sender_key {
        return Err(mismatch(
            format!("curve25519 key {}", context.sender_key.to_base64()),
            format!("curve25519 key {}", device.curve25519.to_base64()),
        ));
    }
    if device.ed25519.to_base64() != claimed_ed25519 {
        return Err(mismatch(
            format!("ed25519 key {claimed_ed25519} (keys.ed25519)"),
            format!("ed25519 key {}", device.ed25519.to_base64()),
        ));
    }
    let known_by_key = context
        .known_devices
        .by_curve25519(&device.user_id, &device.curve25519);
    let known_by_id = context
        .known_devices
        .by_id(&device.user_id, &device.device_id);
    let contradicts = |known: &DeviceKeys| {
        known.device_id != device.device_id
            || known.curve25519 != device.curve25519
            || known.ed25519 != device.ed25519
    };
    if known_by_key.into_iter().chain(known_by_id).any(contradicts) {
        return Err(DeviceKeysError::ContradictsKnownKeys {
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
        });
    }
    cache.verify(&device)?;
    Ok(device)
}
