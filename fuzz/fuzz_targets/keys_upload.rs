//! `/keys/upload` bodies (what the CLI's `encrypt` reads): parsing must never panic, and every key
//! it accepts must carry a valid signature by the device it belongs to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use to_device_crypto::olm::device_keys::parse_keys_upload_body;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(keys) = parse_keys_upload_body(&body) {
        keys.device
            .verify_self_signature()
            .expect("accepted device keys verify");
        for key in &keys.one_time_keys {
            let listed = ["one_time_keys", "fallback_keys"]
                .iter()
                .any(|field| body[field].get(&key.key_id).is_some());
            assert!(listed, "accepted key {} is in the body", key.key_id);
        }
    }
});
