//! `/keys/query` response bodies come from the homeserver: parsing must never panic, and every
//! device entry must end up either valid (self-signed, listed under its own ids) or rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use to_device_crypto::olm::device_keys::parse_keys_query_response;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Some(devices) = parse_keys_query_response(&body) else {
        assert!(body
            .get("device_keys")
            .and_then(|d| d.as_object())
            .is_none());
        return;
    };
    let listed: usize = body["device_keys"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|d| d.as_object())
        .map(|d| d.len())
        .sum();
    assert_eq!(devices.valid.len() + devices.rejected.len(), listed);
    for device in &devices.valid {
        assert_eq!(
            body["device_keys"][&device.user_id][&device.device_id],
            device.signed_json
        );
        device
            .verify_self_signature()
            .expect("valid devices verify");
    }
});
