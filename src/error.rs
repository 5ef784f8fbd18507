//! Error types, one enum per concern.
//!
//! Every message explains the failure to an engineer reading a log. None of these messages ever
//! reaches analytics: the payload carries only the [`FailureReason`].

use crate::analytics::FailureReason;
use crate::olm::device_keys::DeviceKeysError;
use to_device_analytics::envelope::EnvelopeError;

/// Why one to-device event could not be decrypted and accepted.
///
/// Each variant maps to exactly one [`FailureReason`] through [`DecryptionError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum DecryptionError {
    /// The envelope is not a valid to-device event.
    #[error("malformed to-device event: {0}")]
    MalformedEvent(String),
    /// The content's algorithm is missing or not Olm v1.
    #[error("unsupported to-device encryption algorithm {0:?}, only m.olm.v1.curve25519-aes-sha2 can be decrypted")]
    UnsupportedAlgorithm(Option<String>),
    /// `sender_key` is missing or invalid.
    #[error("the encrypted content has no valid sender_key: {0}")]
    MissingSenderKey(String),
    /// No ciphertext for our key.
    #[error("the event has no ciphertext for this device's curve25519 key {our_key}; it was encrypted for {recipient_count} other key(s)")]
    MissingCiphertext {
        /// Our Curve25519 key.
        our_key: String,
        /// How many recipient keys the event was encrypted for.
        recipient_count: usize,
    },
    /// The ciphertext is unusable.
    #[error("malformed Olm ciphertext: {0}")]
    MalformedCiphertext(String),
    /// A normal message from a sender we share no session with.
    #[error("no Olm session with sender key {sender_key} can decrypt this normal (type 1) message: we have no session with that key at all")]
    MissingSession {
        /// The sender's Curve25519 key.
        sender_key: String,
    },
    /// Sessions exist but none decrypts.
    #[error("the Olm session with sender key {sender_key} is wedged: {sessions_tried} session(s) tried, last error: {last_error}")]
    SessionWedged {
        /// The sender's Curve25519 key.
        sender_key: String,
        /// How many sessions were tried.
        sessions_tried: usize,
        /// vodozemac's error for the last session tried.
        last_error: String,
    },
    /// A pre-key message for an OTK we do not have.
    #[error("the pre-key message from {sender_key} uses one-time key {one_time_key}, which this device does not hold (already used, lost, or never ours)")]
    UnknownOneTimeKey {
        /// The sender's Curve25519 key.
        sender_key: String,
        /// The one-time key named by the pre-key message.
        one_time_key: String,
    },
    /// Inbound session creation failed otherwise.
    #[error(
        "could not create an inbound Olm session from the pre-key message of {sender_key}: {error}"
    )]
    SessionCreation {
        /// The sender's Curve25519 key.
        sender_key: String,
        /// vodozemac's error.
        error: String,
    },
    /// The message was already decrypted.
    #[error("replayed Olm message from {sender_key}: this exact message was already decrypted")]
    ReplayedMessage {
        /// The sender's Curve25519 key.
        sender_key: String,
    },
    /// The plaintext is not valid.
    #[error("the decrypted plaintext is not a valid Olm payload: {0}")]
    JsonError(String),
    /// Plaintext sender differs from the envelope.
    #[error("the plaintext sender {plaintext} differs from the envelope sender {envelope}")]
    MismatchedSender {
        /// The envelope `sender`.
        envelope: String,
        /// The plaintext `sender`.
        plaintext: String,
    },
    /// Plaintext recipient is not us.
    #[error("the plaintext recipient {found} is not this device's user {expected}")]
    MismatchedRecipient {
        /// Our user id.
        expected: String,
        /// The plaintext `recipient`.
        found: String,
    },
    /// `recipient_keys.ed25519` is not our key.
    #[error(
        "the plaintext recipient_keys.ed25519 {found} is not this device's ed25519 key {expected}"
    )]
    MismatchedRecipientKeys {
        /// Our Ed25519 key.
        expected: String,
        /// The key in the plaintext.
        found: String,
    },
    /// `keys.ed25519` is not the sending device's key.
    #[error(
        "the plaintext keys.ed25519 {claimed} is not the sending device's ed25519 key {known}"
    )]
    MismatchedSenderKeys {
        /// The sending device's Ed25519 key as we know it.
        known: String,
        /// The key the plaintext claims.
        claimed: String,
    },
    /// Unknown sending device without `sender_device_keys`.
    #[error("cannot check the signing key of {sender} (sender key {sender_key}): the device is unknown and the {event_type} event has no sender_device_keys")]
    MissingSigningKey {
        /// The sender's user id.
        sender: String,
        /// The sender's Curve25519 key.
        sender_key: String,
        /// The decrypted event type.
        event_type: String,
    },
    /// `sender_device_keys` is invalid.
    #[error("invalid sender_device_keys: {0}")]
    InvalidSenderDeviceKeys(#[source] DeviceKeysError),
    /// The store failed; the batch was not committed.
    #[error("the crypto store failed, the batch was not committed: {0}")]
    Store(#[from] StoreError),
}

impl From<EnvelopeError> for DecryptionError {
    /// The envelope checks are shared with the analytics crate; their failures keep their messages.
    fn from(error: EnvelopeError) -> Self {
        match error {
            EnvelopeError::MalformedEvent(detail) => Self::MalformedEvent(detail),
            EnvelopeError::UnsupportedAlgorithm(algorithm) => Self::UnsupportedAlgorithm(algorithm),
            EnvelopeError::MissingSenderKey(detail) => Self::MissingSenderKey(detail),
            EnvelopeError::MissingCiphertext {
                our_key,
                recipient_count,
            } => Self::MissingCiphertext {
                our_key,
                recipient_count,
            },
            EnvelopeError::MalformedCiphertext(detail) => Self::MalformedCiphertext(detail),
        }
    }
}

impl DecryptionError {
    /// The one failure reason (and analytics name) of this error.
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::MalformedEvent(_) => FailureReason::MalformedEvent,
            Self::UnsupportedAlgorithm(_) => FailureReason::UnsupportedAlgorithm,
            Self::MissingSenderKey(_) => FailureReason::MissingSenderKey,
            Self::MissingCiphertext { .. } => FailureReason::MissingCiphertext,
            Self::MalformedCiphertext(_) => FailureReason::MalformedCiphertext,
            Self::MissingSession { .. } => FailureReason::MissingSession,
            Self::SessionWedged { .. } => FailureReason::SessionWedged,
            Self::UnknownOneTimeKey { .. } => FailureReason::UnknownOneTimeKey,
            Self::SessionCreation { .. } => FailureReason::SessionCreation,
            Self::ReplayedMessage { .. } => FailureReason::ReplayedMessage,
            Self::JsonError(_) => FailureReason::JsonError,
            Self::MismatchedSender { .. } => FailureReason::MismatchedSender,
            Self::MismatchedRecipient { .. } => FailureReason::MismatchedRecipient,
            Self::MismatchedRecipientKeys { .. } | Self::MismatchedSenderKeys { .. } => {
                FailureReason::MismatchedKeys
            }
            Self::MissingSigningKey { .. } => FailureReason::MissingSigningKey,
            Self::InvalidSenderDeviceKeys(_) => FailureReason::InvalidSenderDeviceKeys,
            Self::Store(_) => FailureReason::Store,
        }
    }
}

/// Why the crypto store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file-system operation failed.
    #[error("I/O error on the store: {0}")]
    Io(#[from] std::io::Error),
    /// The store key does not decrypt this store.
    #[error("the store key does not match this store (wrong key or a store made with another key); nothing was changed")]
    WrongStoreKey,
    /// A stored value could not be decrypted or decoded.
    #[error("the store holds a corrupted value ({what}): {detail}")]
    Corrupted {
        /// What was being read.
        what: &'static str,
        /// The decoding error.
        detail: String,
    },
    /// The store was written by a newer version of this crate.
    #[error("the store has schema version {found}, newer than the {supported} this version supports; update the app instead of downgrading")]
    NewerSchema {
        /// Version found in the file.
        found: i64,
        /// Newest version this build understands.
        supported: i64,
    },
    /// The store belongs to another account.
    #[error("the store belongs to {stored_user}/{stored_device}, not to {user}/{device}")]
    AccountMismatch {
        /// The user id in the store.
        stored_user: String,
        /// The device id in the store.
        stored_device: String,
        /// The requested user id.
        user: String,
        /// The requested device id.
        device: String,
    },
    /// The store was wiped (logout); this machine can no longer be used.
    #[error("the store was wiped (logout): open a new machine")]
    Wiped,
    /// Injected by tests to prove that a failed commit leaves no trace (`testing` feature only).
    #[cfg(feature = "testing")]
    #[error("simulated store failure: {0}")]
    Simulated(String),
}

/// Errors of the key management API (`/keys/upload`, `/keys/query`, one-time key counts).
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The server response is not the expected JSON.
    #[error("invalid {what} body: {detail}")]
    InvalidBody {
        /// Which body.
        what: &'static str,
        /// The parse error.
        detail: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of [`OlmMachine::encrypt`](crate::OlmMachine::encrypt).
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    /// The recipient's device keys are invalid.
    #[error("invalid recipient device keys: {0}")]
    InvalidRecipientKeys(#[from] DeviceKeysError),
    /// We have no session and no one-time key to create one.
    #[error("no Olm session with {user_id}/{device_id} and no unclaimed, validly signed one-time key to create one")]
    NoOneTimeKey {
        /// The recipient's user id.
        user_id: String,
        /// The recipient's device id.
        device_id: String,
    },
    /// vodozemac refused to create the session or encrypt.
    #[error("Olm encryption failed: {0}")]
    Olm(String),
    /// The content is not a JSON object.
    #[error("the content to encrypt must be a JSON object")]
    ContentNotAnObject,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of opening a machine.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The user id is not a valid Matrix user id.
    #[error("invalid user id {0:?}: expected @localpart:server")]
    InvalidUserId(String),
    /// The device id is empty or contains invalid characters.
    #[error("invalid device id {0:?}")]
    InvalidDeviceId(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
