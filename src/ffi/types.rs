//! The records, enums and errors of the FFI surface, and their conversions from the core types.

use std::collections::HashMap;

use crate::analytics::{AnalyticsEvent, CryptoSdk, ErrorDomain, FailureReason};
use crate::error::{DecryptionError, EncryptionError, KeysError, OpenError, StoreError};
use crate::machine::DecryptedToDeviceEvent;

/// Our identity keys, base64.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct IdentityKeysFfi {
    /// The Curve25519 identity key.
    pub curve25519: String,
    /// The Ed25519 fingerprint key.
    pub ed25519: String,
}

/// Why a to-device event failed to decrypt: mirrors [`FailureReason`] one to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum FailureReasonFfi {
    MalformedEvent,
    UnsupportedAlgorithm,
    MissingSenderKey,
    MissingCiphertext,
    MalformedCiphertext,
    MissingSession,
    SessionWedged,
    UnknownOneTimeKey,
    SessionCreation,
    ReplayedMessage,
    JsonError,
    MismatchedSender,
    MismatchedRecipient,
    MismatchedKeys,
    MissingSigningKey,
    InvalidSenderDeviceKeys,
    Store,
}

impl From<FailureReason> for FailureReasonFfi {
    // Exhaustive on purpose: a new core reason must break this build until it is exported.
    fn from(reason: FailureReason) -> Self {
        match reason {
            FailureReason::MalformedEvent => Self::MalformedEvent,
            FailureReason::UnsupportedAlgorithm => Self::UnsupportedAlgorithm,
            FailureReason::MissingSenderKey => Self::MissingSenderKey,
            FailureReason::MissingCiphertext => Self::MissingCiphertext,
            FailureReason::MalformedCiphertext => Self::MalformedCiphertext,
            FailureReason::MissingSession => Self::MissingSession,
            FailureReason::SessionWedged => Self::SessionWedged,
            FailureReason::UnknownOneTimeKey => Self::UnknownOneTimeKey,
            FailureReason::SessionCreation => Self::SessionCreation,
            FailureReason::ReplayedMessage => Self::ReplayedMessage,
            FailureReason::JsonError => Self::JsonError,
            FailureReason::MismatchedSender => Self::MismatchedSender,
            FailureReason::MismatchedRecipient => Self::MismatchedRecipient,
            FailureReason::MismatchedKeys => Self::MismatchedKeys,
            FailureReason::MissingSigningKey => Self::MissingSigningKey,
            FailureReason::InvalidSenderDeviceKeys => Self::InvalidSenderDeviceKeys,
            FailureReason::Store => Self::Store,
        }
    }
}

impl From<FailureReasonFfi> for FailureReason {
    // Exhaustive, like the other direction: both must change together.
    fn from(reason: FailureReasonFfi) -> Self {
        match reason {
            FailureReasonFfi::MalformedEvent => Self::MalformedEvent,
            FailureReasonFfi::UnsupportedAlgorithm => Self::UnsupportedAlgorithm,
            FailureReasonFfi::MissingSenderKey => Self::MissingSenderKey,
            FailureReasonFfi::MissingCiphertext => Self::MissingCiphertext,
            FailureReasonFfi::MalformedCiphertext => Self::MalformedCiphertext,
            FailureReasonFfi::MissingSession => Self::MissingSession,
            FailureReasonFfi::SessionWedged => Self::SessionWedged,
            FailureReasonFfi::UnknownOneTimeKey => Self::UnknownOneTimeKey,
            FailureReasonFfi::SessionCreation => Self::SessionCreation,
            FailureReasonFfi::ReplayedMessage => Self::ReplayedMessage,
            FailureReasonFfi::JsonError => Self::JsonError,
            FailureReasonFfi::MismatchedSender => Self::MismatchedSender,
            FailureReasonFfi::MismatchedRecipient => Self::MismatchedRecipient,
            FailureReasonFfi::MismatchedKeys => Self::MismatchedKeys,
            FailureReasonFfi::MissingSigningKey => Self::MissingSigningKey,
            FailureReasonFfi::InvalidSenderDeviceKeys => Self::InvalidSenderDeviceKeys,
            FailureReasonFfi::Store => Self::Store,
        }
    }
}

/// The PostHog `Error` event `domain`: mirrors [`ErrorDomain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum ErrorDomainFfi {
    E2ee,
    Voip,
    ToDevice,
}

impl From<ErrorDomain> for ErrorDomainFfi {
    fn from(domain: ErrorDomain) -> Self {
        match domain {
            ErrorDomain::E2ee => Self::E2ee,
            ErrorDomain::Voip => Self::Voip,
            ErrorDomain::ToDevice => Self::ToDevice,
        }
    }
}

/// The PostHog `Error` event `cryptoSDK`: mirrors [`CryptoSdk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum CryptoSdkFfi {
    Legacy,
    Rust,
}

impl From<CryptoSdk> for CryptoSdkFfi {
    fn from(sdk: CryptoSdk) -> Self {
        match sdk {
            CryptoSdk::Legacy => Self::Legacy,
            CryptoSdk::Rust => Self::Rust,
        }
    }
}

/// The PostHog event for one decryption failure: typed fields, plus `properties` for
/// `PostHog.capture(event, properties)` and the exact payload as `json`.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct PosthogErrorEvent {
    /// The PostHog event name, always `"Error"`.
    pub event: String,
    /// Always `ToDevice`.
    pub domain: ErrorDomainFfi,
    /// The failure reason.
    pub name: FailureReasonFfi,
    /// Always `Rust`.
    pub crypto_sdk: CryptoSdkFfi,
    /// The `name` property as sent, e.g. `ToDeviceFailedToDecrypt_MissingSession`.
    pub analytics_name: String,
    /// The properties exactly as PostHog receives them (`domain`, `name`, `cryptoSDK`).
    pub properties: HashMap<String, String>,
    /// The whole payload as one line of JSON.
    pub json: String,
}

impl From<AnalyticsEvent> for PosthogErrorEvent {
    fn from(event: AnalyticsEvent) -> Self {
        Self {
            event: event.event.to_owned(),
            domain: event.properties.domain.into(),
            name: event.reason().into(),
            crypto_sdk: event.properties.crypto_sdk.into(),
            analytics_name: event.reason().analytics_name().to_owned(),
            properties: event.properties_map().into_iter().collect(),
            json: event.to_json(),
        }
    }
}

/// A decrypted to-device event that passed every check.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct DecryptedEvent {
    /// The outbox id: pass it to `acknowledge` once the event is handled.
    pub id: String,
    /// Whether this result was delivered before and is emitted again (handle idempotently).
    pub re_emitted: bool,
    /// The decrypted event type, e.g. `m.room_key`.
    pub event_type: String,
    /// The decrypted content, JSON.
    pub content_json: String,
    /// The sender's user id.
    pub sender: String,
    /// The sending device's Curve25519 key.
    pub sender_curve25519_key: String,
    /// The sending device's Ed25519 key.
    pub sender_ed25519_key: String,
    /// The sending device's id, when known.
    pub sender_device_id: Option<String>,
    /// Whether the Ed25519 key was confirmed by validly signed device keys.
    pub sender_device_verified: bool,
}

impl From<DecryptedToDeviceEvent> for DecryptedEvent {
    fn from(event: DecryptedToDeviceEvent) -> Self {
        Self {
            id: event.id,
            re_emitted: event.re_emitted,
            event_type: event.event_type,
            content_json: event.content.to_string(),
            sender: event.sender,
            sender_curve25519_key: event.sender_curve25519_key,
            sender_ed25519_key: event.sender_ed25519_key,
            sender_device_id: event.sender_device_id,
            sender_device_verified: event.sender_device_verified,
        }
    }
}

/// The result for one event of a `/sync` batch.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ToDeviceResult {
    /// Decrypted and passed every check.
    Decrypted { event: DecryptedEvent },
    /// Not encrypted; passed through unchanged (JSON).
    Plaintext { json: String },
    /// Failed; listeners received the PostHog event.
    Failed {
        reason: FailureReasonFfi,
        message: String,
    },
}

/// Why `decrypt_to_device_event` failed: the typed reason and a message for local logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum DecryptionFailure {
    /// The event failed to decrypt. (`message` is renamed `errorMessage` in Kotlin, where
    /// `message` belongs to `Throwable`.)
    #[error("{reason:?}: {message}")]
    Failed {
        reason: FailureReasonFfi,
        message: String,
    },
}

impl From<DecryptionError> for DecryptionFailure {
    fn from(error: DecryptionError) -> Self {
        Self::Failed {
            reason: error.reason().into(),
            message: error.to_string(),
        }
    }
}

/// Errors of the FFI calls other than decryption.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum CryptoError {
    /// The store key is not exactly 32 bytes.
    #[error("the store key must be 32 bytes, got {length}")]
    InvalidStoreKey { length: u64 },
    /// An argument is not the expected JSON.
    #[error("invalid JSON: {detail}")]
    InvalidJson { detail: String },
    /// The user or device id is invalid.
    #[error("invalid id: {detail}")]
    InvalidId { detail: String },
    /// The crypto store failed.
    #[error("store error: {detail}")]
    Store { detail: String },
    /// Encrypting failed.
    #[error("encryption error: {detail}")]
    Encryption { detail: String },
}

impl From<StoreError> for CryptoError {
    fn from(error: StoreError) -> Self {
        Self::Store {
            detail: error.to_string(),
        }
    }
}

impl From<OpenError> for CryptoError {
    fn from(error: OpenError) -> Self {
        match error {
            OpenError::Store(store) => store.into(),
            other => Self::InvalidId {
                detail: other.to_string(),
            },
        }
    }
}

impl From<KeysError> for CryptoError {
    fn from(error: KeysError) -> Self {
        match error {
            KeysError::Store(store) => store.into(),
            other => Self::InvalidJson {
                detail: other.to_string(),
            },
        }
    }
}

impl From<EncryptionError> for CryptoError {
    fn from(error: EncryptionError) -> Self {
        match error {
            EncryptionError::Store(store) => store.into(),
            other => Self::Encryption {
                detail: other.to_string(),
            },
        }
    }
}

/// The reporting policy (see `ReportingPolicy` in the core).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ReportingPolicyFfi {
    /// Whether payloads are produced at all (the user's analytics consent).
    pub analytics_enabled: bool,
    /// At most one payload per (sender, sender key, name) in this many seconds; 0 disables.
    pub suppression_window_secs: u64,
    /// At most this many payloads per minute; `None` disables the cap.
    pub max_events_per_minute: Option<u32>,
}

impl From<ReportingPolicyFfi> for crate::analytics::ReportingPolicy {
    fn from(policy: ReportingPolicyFfi) -> Self {
        Self {
            analytics_enabled: policy.analytics_enabled,
            suppression_window_secs: policy.suppression_window_secs,
            max_events_per_minute: policy.max_events_per_minute,
        }
    }
}

/// A decrypted result still waiting for `acknowledge`.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct PendingEvent {
    /// The batch that produced it.
    pub batch: u64,
    /// Its index in that batch.
    pub index: u64,
    /// The result.
    pub event: DecryptedEvent,
}

impl From<crate::PendingDecryptedEvent> for PendingEvent {
    fn from(pending: crate::PendingDecryptedEvent) -> Self {
        Self {
            batch: pending.batch,
            index: pending.index,
            event: pending.event.into(),
        }
    }
}

/// What a `/keys/query` response changed (see `OlmMachine.receive_keys_query`).
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct KeysQueryOutcomeFfi {
    /// Devices whose keys were stored (new devices, and known devices whose keys are unchanged or
    /// changed only in what the rules allow).
    pub stored: u32,
    /// `user_id/device_id: error` of every entry that was rejected (invalid signature, listed
    /// under another user or device id).
    pub rejected: Vec<String>,
    /// Validly signed entries that tried to change the Ed25519 key of a device we already know:
    /// refused, the known keys kept. Treat each as a possible attack by the server (or a device
    /// re-created under its old device id); show it or log it, never accept it silently.
    pub refused_key_changes: Vec<RefusedKeyChangeFfi>,
}

/// A `/keys/query` entry refused because it changes a known device's Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct RefusedKeyChangeFfi {
    /// The device's user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
    /// The Ed25519 key we know and keep (unpadded base64).
    pub known_ed25519: String,
    /// The Ed25519 key the response claimed (unpadded base64).
    pub received_ed25519: String,
}

impl From<crate::machine::KeysQueryOutcome> for KeysQueryOutcomeFfi {
    fn from(outcome: crate::machine::KeysQueryOutcome) -> Self {
        Self {
            stored: u32::try_from(outcome.stored).unwrap_or(u32::MAX),
            rejected: outcome.rejected,
            refused_key_changes: outcome
                .refused_key_changes
                .into_iter()
                .map(|change| RefusedKeyChangeFfi {
                    user_id: change.user_id,
                    device_id: change.device_id,
                    known_ed25519: change.known_ed25519,
                    received_ed25519: change.received_ed25519,
                })
                .collect(),
        }
    }
}
