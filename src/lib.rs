//! # to-device-crypto
//!
//! Decrypts Matrix Olm (`m.olm.v1.curve25519-aes-sha2`) to-device events with vodozemac and
//! reports **every** decryption failure, with one precise reason, as a PostHog-ready analytics
//! `Error` event.
//!
//! - [`OlmMachine`] decrypts one event ([`OlmMachine::decrypt_to_device_event`]) or a `/sync`
//!   batch ([`OlmMachine::receive_to_device_events`]) and publishes one
//!   [`ToDeviceDecryptionFailure`] per failed event on
//!   [`OlmMachine::to_device_decryption_failure_stream`].
//! - [`FailureReason`] is the failure taxonomy; [`AnalyticsEvent`] is the PostHog payload. Both,
//!   with the reporting policy, the failure stream and the envelope checks, live in the
//!   [`to_device_analytics`] crate (re-exported as [`analytics`], [`reporting`] and [`json`]), which
//!   does not depend on the machine, so other SDKs can adopt them.
//! - [`store`] holds the [`CryptoStore`] trait, an in-memory store and the encrypted SQLite store.
//!
//! Where things happen: events are *parsed* in [`olm::envelope`], *decrypted* in
//! [`olm::sessions`], their plaintext *checked* in [`olm::plaintext`], failures *classified* in
//! [`error`] and [`analytics::taxonomy`], *reported* in [`reporting`], and state *stored* in
//! [`store`]. The UniFFI adapter for Swift and Kotlin lives in `src/ffi`.

// Generates the UniFFI scaffolding for the exports in `ffi` (the core itself is not exported).
uniffi::setup_scaffolding!();

pub mod analytics;
pub mod encoding;
pub mod error;
pub mod fail_point;
pub mod ffi;
/// Size and nesting limits checked before untrusted JSON is parsed, and canonical JSON (from the
/// analytics crate, which runs the same limits in its envelope checks).
pub use to_device_analytics::json;
pub mod machine;
pub mod olm;
/// The failure stream: [`ToDeviceDecryptionFailure`] items and their never-blocking broadcast
/// (from the analytics crate).
pub use to_device_analytics::reporter as reporting;
pub mod requests;
pub mod simulator;
pub mod store;
pub mod sync_input;

pub use analytics::{AnalyticsEvent, FailureReason};
pub use error::{DecryptionError, EncryptionError, KeysError, OpenError, StoreError};
pub use machine::{
    DecryptedToDeviceEvent, FailedToDeviceEvent, KeysQueryOutcome, OlmMachine,
    PendingDecryptedEvent, RefusedKeyChange, ToDeviceOutcome,
};
pub use reporting::{
    AnalyticsPayloadId, FailureStream, MissedFailures, PendingAnalyticsEvent,
    ToDeviceDecryptionFailure,
};
pub use requests::{OutgoingRequest, OutgoingRequestKind, RequestError};
pub use store::{CryptoStore, MemoryStore, SqliteStore, StoreKey};
