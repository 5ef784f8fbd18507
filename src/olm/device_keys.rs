//! Device keys: the signed `DeviceKeys` objects of `/keys/upload`, `/keys/query` and
//! `sender_device_keys`, and the Ed25519 JSON signatures that protect them.

use serde_json::{Map, Value};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::json::to_canonical_string;

/// The only Olm algorithm this crate speaks.
pub use to_device_analytics::envelope::OLM_V1_ALGORITHM;
/// The Megolm algorithm devices also advertise.
pub const MEGOLM_V1_ALGORITHM: &str = "m.megolm.v1.aes-sha2";

/// Why a device-keys object (or a signed one-time key) was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceKeysError {
    /// The value is not a JSON object.
    #[error("the device keys are not a JSON object")]
    NotAnObject,
    /// A required field is missing or has the wrong JSON type.
    #[error("the device keys lack a valid `{0}` field")]
    MissingField(&'static str),
    /// A key is not valid unpadded base64 of the right length.
    #[error("the device keys hold an invalid {algorithm} key: {detail}")]
    InvalidKey {
        /// `curve25519` or `ed25519`.
        algorithm: &'static str,
        /// The decoding error.
        detail: String,
    },
    /// No signature by the device's own Ed25519 key.
    #[error("the object has no signature by {user_id}'s key {key_id}")]
    MissingSignature {
        /// The signing user.
        user_id: String,
        /// The signing key id, e.g. `ed25519:DEVICE`.
        key_id: String,
    },
    /// The signature does not verify.
    #[error("the signature by {key_id} does not verify over the canonical JSON")]
    InvalidSignature {
        /// The signing key id.
        key_id: String,
    },
    /// The object belongs to another user or device than expected.
    #[error("the device keys are for {found}, expected {expected}")]
    Mismatched {
        /// What was expected (user id, device id or key).
        expected: String,
        /// What the object says.
        found: String,
    },
    /// The keys contradict the keys already known for that device.
    #[error("the device keys of {user_id}/{device_id} contradict the keys known from /keys/query")]
    ContradictsKnownKeys {
        /// The user id.
        user_id: String,
        /// The device id.
        device_id: String,
    },
}

/// A device's identity, read from a validly self-signed `DeviceKeys` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKeys {
    /// The owner's user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
    /// The device's Curve25519 identity key.
    pub curve25519: Curve25519PublicKey,
    /// The device's Ed25519 signing key.
    pub ed25519: Ed25519PublicKey,
    /// The signed object as received, kept so that it can be stored and re-verified.
    pub signed_json: Value,
}

impl DeviceKeys {
    /// Parses a `DeviceKeys` object and verifies its self-signature.
    pub fn from_signed_json(value: &Value) -> Result<Self, DeviceKeysError> {
        let device = Self::from_json_unverified(value)?;
        device.verify_self_signature()?;
        Ok(device)
    }

    /// Verifies that the object is signed by the device's own Ed25519 key.
    pub fn verify_self_signature(&self) -> Result<(), DeviceKeysError> {
        verify_json_signature(
            &self.signed_json,
            &self.user_id,
            &format!("ed25519:{}", self.device_id),
            &self.ed25519,
        )
    }

    /// The self-signature as sent (base64), if any: with the parsed fields, a cache key for
    /// "this exact object was already verified".
    pub fn self_signature(&self) -> Option<&str> {
        self.signed_json
            .get("signatures")?
            .get(&self.user_id)?
            .get(format!("ed25519:{}", self.device_id))?
            .as_str()
    }

    /// Parses a `DeviceKeys` object without checking its signature: callers must call
    /// [`DeviceKeys::verify_self_signature`] (or know that an identical object was verified).
    pub fn from_json_unverified(value: &Value) -> Result<Self, DeviceKeysError> {
        let object = value.as_object().ok_or(DeviceKeysError::NotAnObject)?;
        let user_id = string_field(object, "user_id")?;
        let device_id = string_field(object, "device_id")?;
        let keys = object
            .get("keys")
            .and_then(Value::as_object)
            .ok_or(DeviceKeysError::MissingField("keys"))?;
        let curve_id = format!("curve25519:{device_id}");
        let ed_id = format!("ed25519:{device_id}");
        let curve25519 = keys
            .get(&curve_id)
            .and_then(Value::as_str)
            .ok_or(DeviceKeysError::MissingField("keys.curve25519:<device_id>"))?;
        let ed25519 = keys
            .get(&ed_id)
            .and_then(Value::as_str)
            .ok_or(DeviceKeysError::MissingField("keys.ed25519:<device_id>"))?;
        let curve25519 = Curve25519PublicKey::from_base64(curve25519).map_err(|e| {
            DeviceKeysError::InvalidKey {
                algorithm: "curve25519",
                detail: e.to_string(),
            }
        })?;
        let ed25519 = ed25519_from_base64(ed25519)?;
        Ok(Self {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            curve25519,
            ed25519,
            signed_json: value.clone(),
        })
    }
}

/// Parses an Ed25519 public key from base64.
///
/// Not `Ed25519PublicKey::from_base64`: in vodozemac 0.11.1 it only checks the text's length and
/// panics when 44 characters without padding decode to 33 bytes — reachable by any user through
/// `sender_device_keys`, and by a server through `/keys/query` (found by fuzzing).
pub fn ed25519_from_base64(text: &str) -> Result<Ed25519PublicKey, DeviceKeysError> {
    let invalid = |detail: String| DeviceKeysError::InvalidKey {
        algorithm: "ed25519",
        detail,
    };
    let bytes = vodozemac::base64_decode(text).map_err(|e| invalid(e.to_string()))?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| invalid(format!("expected 32 bytes, got {}", bytes.len())))?;
    Ed25519PublicKey::from_slice(&bytes).map_err(|e| invalid(e.to_string()))
}

fn string_field<'a>(
    object: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, DeviceKeysError> {
    object
        .get(name)
        .and_then(Value::as_str)
        .ok_or(DeviceKeysError::MissingField(name))
}

/// The bytes a Matrix JSON signature covers: canonical JSON without `signatures` and `unsigned`.
pub fn signable_json(value: &Value) -> String {
    match value {
        Value::Object(object) => {
            let mut stripped = object.clone();
            stripped.remove("signatures");
            stripped.remove("unsigned");
            to_canonical_string(&Value::Object(stripped))
        }
        other => to_canonical_string(other),
    }
}

/// Verifies the signature `signatures[user_id][key_id]` of `value` with `key`.
pub fn verify_json_signature(
    value: &Value,
    user_id: &str,
    key_id: &str,
    key: &Ed25519PublicKey,
) -> Result<(), DeviceKeysError> {
    let missing = || DeviceKeysError::MissingSignature {
        user_id: user_id.to_owned(),
        key_id: key_id.to_owned(),
    };
    let signature = value
        .get("signatures")
        .and_then(|s| s.get(user_id))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(missing)?;
    let invalid = || DeviceKeysError::InvalidSignature {
        key_id: key_id.to_owned(),
    };
    let signature = Ed25519Signature::from_base64(signature).map_err(|_| invalid())?;
    key.verify(signable_json(value).as_bytes(), &signature)
        .map_err(|_| invalid())
}

/// A signed one-time (or fallback) key taken from a `/keys/upload` body or `/keys/claim` response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedOneTimeKey {
    /// The key id, e.g. `signed_curve25519:AAAAAQ`.
    pub key_id: String,
    /// The Curve25519 public key.
    pub key: Curve25519PublicKey,
    /// Whether this is a fallback key.
    pub fallback: bool,
}

/// Verifies one `signed_curve25519` object against the owning device's keys.
pub fn verify_signed_one_time_key(
    key_id: &str,
    value: &Value,
    device: &DeviceKeys,
) -> Result<SignedOneTimeKey, DeviceKeysError> {
    let object = value.as_object().ok_or(DeviceKeysError::NotAnObject)?;
    let key = string_field(object, "key")?;
    let key = Curve25519PublicKey::from_base64(key).map_err(|e| DeviceKeysError::InvalidKey {
        algorithm: "curve25519",
        detail: e.to_string(),
    })?;
    verify_json_signature(
        value,
        &device.user_id,
        &format!("ed25519:{}", device.device_id),
        &device.ed25519,
    )?;
    Ok(SignedOneTimeKey {
        key_id: key_id.to_owned(),
        key,
        fallback: object.get("fallback").and_then(Value::as_bool) == Some(true),
    })
}

/// A device's keys as published in a `/keys/upload` body: what the CLI's `encrypt` reads.
#[derive(Clone, Debug)]
pub struct PublishedKeys {
    /// The device keys.
    pub device: DeviceKeys,
    /// Its validly signed one-time keys, then its fallback keys.
    pub one_time_keys: Vec<SignedOneTimeKey>,
}

/// Parses a `/keys/upload` request body, verifying every signature. Keys with a bad signature are
/// dropped; an invalid `device_keys` object fails the whole body.
pub fn parse_keys_upload_body(body: &Value) -> Result<PublishedKeys, DeviceKeysError> {
    let device = DeviceKeys::from_signed_json(
        body.get("device_keys")
            .ok_or(DeviceKeysError::MissingField("device_keys"))?,
    )?;
    let mut one_time_keys = Vec::new();
    for field in ["one_time_keys", "fallback_keys"] {
        let Some(keys) = body.get(field).and_then(Value::as_object) else {
            continue;
        };
        let mut sorted: Vec<_> = keys.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key_id, value) in sorted {
            if let Ok(key) = verify_signed_one_time_key(key_id, value, &device) {
                one_time_keys.push(key);
            }
        }
    }
    Ok(PublishedKeys {
        device,
        one_time_keys,
    })
}

/// The devices of a `/keys/query` response: the valid ones and the rejected ones with why.
#[derive(Debug, Default)]
pub struct KeysQueryDevices {
    /// Devices whose keys are self-signed and consistent with the map they are listed under.
    pub valid: Vec<DeviceKeys>,
    /// `(user_id, device_id, error)` of every rejected entry.
    pub rejected: Vec<(String, String, DeviceKeysError)>,
}

/// Parses the `device_keys` section of a `/keys/query` response body.
///
/// Returns `None` when the body is not an object with a `device_keys` object.
pub fn parse_keys_query_response(body: &Value) -> Option<KeysQueryDevices> {
    let users = body.get("device_keys")?.as_object()?;
    let mut devices = KeysQueryDevices::default();
    for (user_id, user_devices) in users {
        let Some(user_devices) = user_devices.as_object() else {
            continue;
        };
        for (device_id, keys) in user_devices {
            let checked = DeviceKeys::from_signed_json(keys).and_then(|device| {
                if device.user_id != *user_id || device.device_id != *device_id {
                    Err(DeviceKeysError::Mismatched {
                        expected: format!("{user_id}/{device_id}"),
                        found: format!("{}/{}", device.user_id, device.device_id),
                    })
                } else {
                    Ok(device)
                }
            });
            match checked {
                Ok(device) => devices.valid.push(device),
                Err(error) => devices
                    .rejected
                    .push((user_id.clone(), device_id.clone(), error)),
            }
        }
    }
    Some(devices)
}

/// Other devices we know (from `/keys/query`, or — kept apart — from a verified
/// `sender_device_keys`), indexed for the lookups decryption and recovery need.
///
/// A device is found by id, or by its Curve25519 key within its user; a lookup by key checks the
/// device it finds, so that two entries claiming one key can never make a lookup by id return
/// the other device.
#[derive(Debug, Default)]
pub struct KnownDevices {
    by_id: std::collections::HashMap<(String, String), DeviceKeys>,
    by_curve25519: std::collections::HashMap<[u8; 32], (String, String)>,
}

impl KnownDevices {
    /// Adds or replaces a device; returns the keys it replaced.
    pub fn insert(&mut self, device: DeviceKeys) -> Option<DeviceKeys> {
        let id = (device.user_id.clone(), device.device_id.clone());
        let key = device.curve25519.to_bytes();
        let replaced = self.by_id.insert(id.clone(), device);
        self.by_curve25519.insert(key, id);
        if let Some(old) = &replaced {
            self.reindex(old.curve25519.to_bytes());
        }
        replaced
    }

    /// Removes the device `user_id`/`device_id`; returns its keys.
    pub fn remove(&mut self, user_id: &str, device_id: &str) -> Option<DeviceKeys> {
        let removed = self
            .by_id
            .remove(&(user_id.to_owned(), device_id.to_owned()))?;
        self.reindex(removed.curve25519.to_bytes());
        Some(removed)
    }

    /// After a device lost `key`: points `key` at a device that still has it, if any (a scan,
    /// only when the indexed device is the one that lost it: two devices sharing a Curve25519
    /// key is an anomaly, not a case to optimise).
    fn reindex(&mut self, key: [u8; 32]) {
        let holds_key = |device: &DeviceKeys| device.curve25519.as_bytes() == &key;
        let indexed = self.by_curve25519.get(&key);
        if indexed
            .and_then(|id| self.by_id.get(id))
            .is_some_and(holds_key)
        {
            return;
        }
        match self.by_id.iter().find(|(_, device)| holds_key(device)) {
            Some((id, _)) => {
                self.by_curve25519.insert(key, id.clone());
            }
            None => {
                self.by_curve25519.remove(&key);
            }
        }
    }

    /// The device of `user_id` whose identity key is `curve25519`.
    pub fn by_curve25519(
        &self,
        user_id: &str,
        curve25519: &Curve25519PublicKey,
    ) -> Option<&DeviceKeys> {
        let id = self.by_curve25519.get(curve25519.as_bytes())?;
        self.by_id
            .get(id)
            .filter(|device| device.user_id == user_id && device.curve25519 == *curve25519)
    }

    /// The device `user_id`/`device_id`.
    pub fn by_id(&self, user_id: &str, device_id: &str) -> Option<&DeviceKeys> {
        self.by_id.get(&(user_id.to_owned(), device_id.to_owned()))
    }

    /// How many devices are known (the tests' view; the machine only looks devices up).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no device is known.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::SimulatedDevice;

    fn device(user: &str, id: &str) -> DeviceKeys {
        SimulatedDevice::new(user, id).published_keys().device
    }

    /// A device whose keys change is found by its new key only, and a second device claiming a
    /// known key never makes a lookup by id return the wrong device.
    #[test]
    fn lookups_by_id_and_key_stay_consistent() {
        let mut devices = KnownDevices::default();
        let first = device("@alice:example.org", "PHONE");
        assert!(devices.insert(first.clone()).is_none());
        let renewed = device("@alice:example.org", "PHONE");
        assert_eq!(devices.insert(renewed.clone()), Some(first.clone()));
        assert!(devices
            .by_curve25519("@alice:example.org", &first.curve25519)
            .is_none());
        assert_eq!(
            devices.by_curve25519("@alice:example.org", &renewed.curve25519),
            Some(&renewed)
        );
        assert!(devices
            .by_curve25519("@bob:example.org", &renewed.curve25519)
            .is_none());

        // Another device listing the same Curve25519 key.
        let mut impostor = device("@alice:example.org", "LAPTOP");
        impostor.curve25519 = renewed.curve25519;
        devices.insert(impostor.clone());
        assert_eq!(devices.by_id("@alice:example.org", "PHONE"), Some(&renewed));
        assert_eq!(
            devices.by_id("@alice:example.org", "LAPTOP"),
            Some(&impostor)
        );
        assert_eq!(devices.len(), 2);

        // Removing one of them leaves the other findable by the key they shared.
        assert_eq!(
            devices.remove("@alice:example.org", "LAPTOP"),
            Some(impostor)
        );
        assert_eq!(
            devices.by_curve25519("@alice:example.org", &renewed.curve25519),
            Some(&renewed)
        );
        assert!(devices.remove("@alice:example.org", "LAPTOP").is_none());
        assert_eq!(
            devices.remove("@alice:example.org", "PHONE"),
            Some(renewed.clone())
        );
        assert!(devices
            .by_curve25519("@alice:example.org", &renewed.curve25519)
            .is_none());
        assert!(devices.is_empty());
    }
}
