//! # to-device-analytics
//!
//! Analytics for Matrix to-device decryption failures, for any SDK: the failure taxonomy, the
//! PostHog `Error` payload, its JSON Schema, the reporting policy and the failure stream, and a
//! pure-JSON envelope classifier.
//!
//! Nothing here decrypts. There is no Olm library, no store and no FFI in this crate, so an SDK that
//! already has its own Olm machine (matrix-sdk-crypto, for one) can adopt the same reasons, payloads
//! and policy by mapping its own errors onto a [`FailureReason`] once:
//!
//! - [`taxonomy`] — [`FailureReason`], one per way a to-device event can fail, with its analytics
//!   name, when it happens, its typical root cause and what to look at ([`ReasonInfo`]);
//! - [`event`] — [`AnalyticsEvent`], the PostHog payload, buildable only from a reason, so it carries
//!   no identifier, key, content or error text;
//! - [`schema`] — the JSON Schema of the payload and the README table, generated from the taxonomy;
//! - [`policy`] — [`ReportingPolicy`] (consent, once per message, a per-sender window, a global cap)
//!   and [`PolicyState`], plain serialisable data that the caller persists in any store;
//! - [`reporter`] — [`FailureReporter`], the bounded, never-blocking broadcast of
//!   [`ToDeviceDecryptionFailure`] items behind a failure stream;
//! - [`envelope`] — the envelope checks that need no key (malformed event, algorithm, sender key, our
//!   ciphertext entry), shared with this project's decryptor;
//! - [`json`] — the size and nesting limits checked before untrusted JSON is parsed, and canonical
//!   JSON.
//!
//! ## Another SDK, end to end
//!
//! Classify a failure (here: the envelope checks fail before any decryption; an SDK's own
//! decryption error maps onto a reason the same way), apply the policy and emit the payload:
//!
//! ```
//! use futures::StreamExt;
//! use to_device_analytics::envelope::{parse_to_device_event, EnvelopeFacts, ToDeviceEnvelope};
//! use to_device_analytics::policy::{FailureKey, PolicyState};
//! use to_device_analytics::{FailureDiagnostics, FailureReason, FailureReporter, ReportingPolicy};
//! use to_device_analytics::ToDeviceDecryptionFailure;
//!
//! // The SDK's own error, mapped onto the taxonomy once.
//! enum SdkError { NoSession, Wedged }
//! fn reason_of(error: SdkError) -> FailureReason {
//!     match error { SdkError::NoSession => FailureReason::MissingSession, SdkError::Wedged => FailureReason::SessionWedged }
//! }
//! let sdk_decrypt = |_: &_| -> Result<(), SdkError> { Err(SdkError::Wedged) };
//!
//! let (reporter, policy) = (FailureReporter::default(), ReportingPolicy::default());
//! let mut state = PolicyState::default(); // or PolicyState::from_json(what the SDK stored)
//! let mut failures = reporter.subscribe(); // the app forwards these to PostHog
//!
//! let raw = r#"{"type": "m.room.encrypted", "sender": "@mallory:example.org",
//!               "content": {"algorithm": "m.megolm.v1.aes-sha2"}}"#;
//! let our_curve25519_key = "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI";
//! let mut facts = EnvelopeFacts::default();
//! let failed = match parse_to_device_event(raw, our_curve25519_key, &mut facts) {
//!     Err(envelope_error) => Some(envelope_error.reason()),
//!     Ok(ToDeviceEnvelope::Olm(ciphertext)) => sdk_decrypt(&ciphertext).err().map(reason_of),
//!     Ok(ToDeviceEnvelope::Plain { .. }) => None,
//! };
//! if let Some(reason) = failed {
//!     let key = FailureKey { reason, sender: facts.sender.as_deref(), sender_key: facts.sender_key.as_deref(), already_seen: false };
//!     let decision = state.decide(&policy, &key, 1_700_000_000_000);
//!     reporter.publish(ToDeviceDecryptionFailure::new(reason, FailureDiagnostics::default(), decision));
//! }
//! let _persist_me: String = state.to_json(); // no identifier in it: window keys are hashed
//!
//! let item = futures::executor::block_on(failures.next()).unwrap().unwrap();
//! assert_eq!(
//!     item.payload().unwrap().to_json(),
//!     r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_UnsupportedAlgorithm","cryptoSDK":"Rust"}}"#
//! );
//! ```

pub mod envelope;
pub mod event;
pub mod json;
pub mod policy;
pub mod reporter;
pub mod schema;
pub mod taxonomy;

pub use event::{AnalyticsEvent, CryptoSdk, ErrorDomain, ErrorEventProperties, ERROR_EVENT_NAME};
pub use policy::{
    AnalyticsDecision, AnalyticsOutboxStats, FailureKey, PolicyState, ReportingPolicy,
    ReportingStats, SuppressionRule,
};
pub use reporter::{
    AnalyticsPayloadId, FailureDiagnostics, FailureReporter, FailureStream, MissedFailures,
    PendingAnalyticsEvent, ToDeviceDecryptionFailure, FAILURE_BUFFER_CAPACITY,
};
pub use taxonomy::{FailureReason, ReasonInfo, ANALYTICS_NAME_PREFIX};
