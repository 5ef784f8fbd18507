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
//!   [`to_device_analytics`] crate (re-exported as [`analytics`] and [`reporting`]), which does
//!   not depend on the machine, so other SDKs can adopt them.
//! - [`store`] holds the [`CryptoStore`] trait, an in-memory store and the encrypted SQLite store.
//! - [`keys`] holds other devices' keys as [`OlmMachine::encrypt`] needs them.
//!
//! Where things happen (docs/ARCHITECTURE.md has the whole path): events are parsed, decrypted and
//! their plaintext checked by the machine's Olm internals, failures *classified* in [`error`] and
//! [`analytics::taxonomy`], *reported* in [`reporting`], and state *stored* in [`store`]. The
//! UniFFI adapter for Swift and Kotlin lives in `src/ffi`.
//!
//! ## Features
//!
//! - `cli` (default): the `to-device-crypto` command-line tool and the `uniffi-bindgen` binary,
//!   with the crates only they need (clap, UniFFI's bindings generator). The mobile libraries are
//!   built without it (`--no-default-features`).
//! - `testing`: test seams that never ship — crash-test phase markers and fail points
//!   (`fail_point`), `MemoryStore`'s failure switch and snapshots, SQLite fault options, the
//!   simulated peer device (`simulator`), the CLI's input splitting (`sync_input`) and the Olm
//!   internals (`olm`) for the fuzz targets, interop tests, benchmarks and examples.

// Generates the UniFFI scaffolding for the exports in `ffi` (the core itself is not exported).
uniffi::setup_scaffolding!();

pub mod analytics;
mod encoding;
pub mod error;
#[cfg(feature = "testing")]
pub mod fail_point;
pub mod ffi;
// Size and nesting limits checked before untrusted JSON is parsed, and canonical JSON (from the
// analytics crate, which runs the same limits in its envelope checks).
use to_device_analytics::json;
pub mod keys;
pub mod machine;
// The Olm internals: public only to the fuzz targets, interop tests and benchmarks (`testing`).
#[cfg(feature = "testing")]
pub mod olm;
#[cfg(not(feature = "testing"))]
mod olm;
/// The failure stream: [`ToDeviceDecryptionFailure`] items and their never-blocking broadcast
/// (from the analytics crate).
pub use to_device_analytics::reporter as reporting;
pub mod requests;
#[cfg(feature = "testing")]
pub mod simulator;
pub mod store;
#[cfg(feature = "testing")]
pub mod sync_input;

pub use analytics::{AnalyticsEvent, FailureReason};
pub use error::{DecryptionError, EncryptionError, KeysError, OpenError, StoreError};
pub use machine::{
    DecryptedToDeviceEvent, FailedToDeviceEvent, KeysQueryOutcome, OlmMachine,
    PendingDecryptedEvent, RefusedKeyChange, ToDeviceOutcome,
};
pub use olm::envelope::EnvelopeFacts;
pub use reporting::{
    AnalyticsPayloadId, FailureStream, MissedFailures, PendingAnalyticsEvent,
    ToDeviceDecryptionFailure,
};
pub use requests::{OutgoingRequest, OutgoingRequestKind, RequestError};
pub use store::{CryptoStore, MemoryStore, SqliteStore, StoreKey};
