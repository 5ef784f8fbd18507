//! The to-device envelope + Olm + plaintext-check path of a real machine that has live sessions
//! with simulated peers (recorded in `fuzz/seeds/state.json`, so the seeds decrypt with it).
//!
//! A JSON input is fed as is; any other input picks a real event and mutates it structurally
//! (see `to_device_crypto_fuzz::mutate`). Every outcome must be Decrypted, Plaintext or Failed
//! with one named, non-store reason, and exactly one failure item must be published per failure.
#![no_main]

use std::sync::{Mutex, OnceLock};

use futures::{FutureExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use to_device_crypto::{FailureReason, FailureStream, OlmMachine, ToDeviceOutcome};
use to_device_crypto_fuzz::{mutate, open_recorded_machine};

const STATE_JSON: &str = include_str!("../seeds/state.json");

struct Fixture {
    runtime: tokio::runtime::Runtime,
    machine: OlmMachine,
    failures: Mutex<FailureStream>,
    templates: Vec<Value>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let state: Value = serde_json::from_str(STATE_JSON).expect("state.json");
        let (machine, _store) = runtime.block_on(open_recorded_machine(&state));
        let failures = Mutex::new(machine.to_device_decryption_failure_stream());
        let templates = state["templates"].as_array().cloned().unwrap_or_default();
        Fixture {
            runtime,
            machine,
            failures,
            templates,
        }
    })
}

fn check_failure(reason: FailureReason) {
    assert_ne!(reason, FailureReason::Store, "the memory store never fails");
    assert_eq!(
        FailureReason::from_analytics_name(reason.analytics_name()),
        Some(reason),
        "one named reason"
    );
}

fn drain(failures: &Mutex<FailureStream>) -> Vec<FailureReason> {
    let mut failures = failures.lock().unwrap();
    let mut reasons = Vec::new();
    while let Some(Some(item)) = failures.next().now_or_never() {
        reasons.push(item.expect("never lags: drained after every input").reason);
    }
    reasons
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let raw = match std::str::from_utf8(data) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => text.to_owned(),
        _ => mutate(&f.templates, data),
    };
    let mut expected = Vec::new();
    if data.len() % 2 == 0 {
        let outcomes = f
            .runtime
            .block_on(f.machine.receive_to_device_events(&[raw.as_str()]))
            .expect("the memory store never fails");
        assert_eq!(outcomes.len(), 1);
        match &outcomes[0] {
            ToDeviceOutcome::Decrypted(_) | ToDeviceOutcome::Plaintext(_) => {}
            ToDeviceOutcome::Failed(failed) => {
                check_failure(failed.error.reason());
                expected.push(failed.error.reason());
            }
        }
    } else if let Err(error) = f.runtime.block_on(f.machine.decrypt_to_device_event(&raw)) {
        check_failure(error.reason());
        expected.push(error.reason());
    }
    assert_eq!(
        drain(&f.failures),
        expected,
        "one stream item per failed event"
    );
});
