//! Our own device: its Olm account, its signed device keys and the `/keys/upload` body.

use serde_json::{json, Map, Value};
use vodozemac::olm::Account;

use super::device_keys::{signable_json, MEGOLM_V1_ALGORITHM, OLM_V1_ALGORITHM};

/// How many one-time keys we keep published on the server: half of what the account can hold,
/// as other clients do, so that keys claimed while we are offline can still be decrypted.
pub fn one_time_key_target(account: &Account) -> usize {
    account.max_number_of_one_time_keys() / 2
}

/// A new device's account: identity keys, [`one_time_key_target`] one-time keys (25) and a
/// fallback key. Created this way by every entry point (Rust, FFI, CLI), so a new device's first
/// `/keys/upload` body is complete without a separate `generate_one_time_keys` call — as
/// matrix-sdk-crypto's first upload is.
pub fn new_account() -> Account {
    let mut account = Account::new();
    account.generate_one_time_keys(one_time_key_target(&account));
    account.generate_fallback_key();
    account
}

/// Adds `signatures[user_id]["ed25519:device_id"]` to `value`, signed by `account`.
pub fn sign_json(account: &Account, user_id: &str, device_id: &str, value: &mut Value) {
    let signature = account.sign(signable_json(value).as_bytes()).to_base64();
    if let Value::Object(object) = value {
        let signatures = object
            .entry("signatures")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(signatures) = signatures {
            let user = signatures
                .entry(user_id.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(user) = user {
                user.insert(format!("ed25519:{device_id}"), Value::String(signature));
            }
        }
    }
}

/// Our signed `DeviceKeys` object, as uploaded and as sent in `sender_device_keys`.
pub fn signed_device_keys(account: &Account, user_id: &str, device_id: &str) -> Value {
    let keys = account.identity_keys();
    let mut device_keys = json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": [OLM_V1_ALGORITHM, MEGOLM_V1_ALGORITHM],
        "keys": {
            format!("curve25519:{device_id}"): keys.curve25519.to_base64(),
            format!("ed25519:{device_id}"): keys.ed25519.to_base64(),
        },
    });
    sign_json(account, user_id, device_id, &mut device_keys);
    device_keys
}

/// The `/keys/upload` body with every unpublished key: the device keys (unless already published),
/// the unpublished one-time keys and the unpublished fallback key, each signed.
pub fn keys_upload_body(
    account: &Account,
    user_id: &str,
    device_id: &str,
    include_device_keys: bool,
) -> Value {
    let mut body = Map::new();
    if include_device_keys {
        body.insert(
            "device_keys".to_owned(),
            signed_device_keys(account, user_id, device_id),
        );
    }
    let signed_keys = |keys: Vec<(String, String)>, fallback: bool| -> Map<String, Value> {
        keys.into_iter()
            .map(|(key_id, key)| {
                let mut object = json!({"key": key});
                if fallback {
                    object["fallback"] = Value::Bool(true);
                }
                sign_json(account, user_id, device_id, &mut object);
                (format!("signed_curve25519:{key_id}"), object)
            })
            .collect()
    };
    let one_time_keys: Vec<_> = account
        .one_time_keys()
        .into_iter()
        .map(|(id, key)| (id.to_base64(), key.to_base64()))
        .collect();
    if !one_time_keys.is_empty() {
        body.insert(
            "one_time_keys".to_owned(),
            Value::Object(signed_keys(one_time_keys, false)),
        );
    }
    let fallback_keys: Vec<_> = account
        .fallback_key()
        .into_iter()
        .map(|(id, key)| (id.to_base64(), key.to_base64()))
        .collect();
    if !fallback_keys.is_empty() {
        body.insert(
            "fallback_keys".to_owned(),
            Value::Object(signed_keys(fallback_keys, true)),
        );
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::olm::device_keys::{parse_keys_upload_body, DeviceKeys};

    #[test]
    fn upload_body_verifies_and_lists_every_key() {
        let mut account = Account::new();
        account.generate_one_time_keys(5);
        account.generate_fallback_key();
        let body = keys_upload_body(&account, "@bob:example.org", "BOBDEV", true);
        let published = parse_keys_upload_body(&body).unwrap();
        assert_eq!(published.device.user_id, "@bob:example.org");
        assert_eq!(published.device.curve25519, account.curve25519_key());
        assert_eq!(published.one_time_keys.len(), 6);
        assert_eq!(
            published
                .one_time_keys
                .iter()
                .filter(|k| k.fallback)
                .count(),
            1
        );
    }

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let account = Account::new();
        let mut keys = signed_device_keys(&account, "@bob:example.org", "BOBDEV");
        assert!(DeviceKeys::from_signed_json(&keys).is_ok());
        keys["algorithms"] = json!([OLM_V1_ALGORITHM]);
        assert!(DeviceKeys::from_signed_json(&keys).is_err());
        // `unsigned` is not covered by the signature.
        let mut keys = signed_device_keys(&account, "@bob:example.org", "BOBDEV");
        keys["unsigned"] = json!({"device_display_name": "Bob's phone"});
        assert!(DeviceKeys::from_signed_json(&keys).is_ok());
    }
}
