//! The CLI's input detection on arbitrary UTF-8: never panics, and every event it returns is a
//! slice of the input's text (it copies, never invents).
#![no_main]

use libfuzzer_sys::fuzz_target;
use to_device_crypto::sync_input::{split_events, InputError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match split_events(text) {
        Ok(split) => {
            for event in &split.events {
                assert!(!event.is_empty());
                assert!(
                    text.contains(event.as_str()),
                    "{event:?} is not from the input"
                );
            }
        }
        Err(InputError::Empty) => assert!(text.trim().is_empty()),
        Err(InputError::UnrecognisedObject) => assert!(text.trim_start().starts_with('{')),
    }
});
