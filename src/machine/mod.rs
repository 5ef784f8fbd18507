//! [`OlmMachine`]: one Matrix device's Olm state, decrypting to-device events and reporting every
//! failure. This file holds the machine's public result types and its cached state; each concern
//! of the machine has its own file (see the `mod` list).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use vodozemac::olm::{Account, IdentityKeys};

use crate::analytics::policy::{AnalyticsDecision, PolicyState, ReportingPolicy};
use crate::error::{DecryptionError, StoreError};
use crate::olm::device_keys::KnownDevices;
use crate::olm::envelope::{EnvelopeFacts, MessageHash};
use crate::olm::plaintext::VerifiedDeviceKeysCache;
use crate::olm::sessions::SessionEntry;
use crate::reporting::{AnalyticsPayloadId, FailureReporter};
use crate::store::{CryptoStore, StoredAnalytics, StoredDevice, StoredRequest, StoredResult};

// One concern per file, in the order an event meets them: `state` (open, reload, commit under the
// cross-process lock), `receive` (the receive path), `reporting` (the policy's decisions and the
// failure stream), `analytics_outbox` (payloads until delivered), `outbox` (results until
// acknowledged), `recovery` (unwedging), `keys`, `encrypt`.
mod analytics_outbox;
mod encrypt;
mod keys;
mod outbox;
mod receive;
mod recovery;
mod reporting;
mod state;

pub use analytics_outbox::{AnalyticsAcknowledger, DEFAULT_ANALYTICS_LEASE};

/// The target of the machine's log lines, whichever of its files writes them: apps filter on it
/// (and it is what [`crate::ffi`]'s log forwarding reports).
const LOG_TARGET: &str = "to_device_crypto::machine";

/// A decrypted to-device event that passed every check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecryptedToDeviceEvent {
    /// The result's id in the outbox: pass it to [`OlmMachine::acknowledge`] once handled.
    pub id: String,
    /// Whether this is a result delivered before and not yet acknowledged, emitted again because
    /// the same event came in again (at-least-once delivery): handle it idempotently.
    #[serde(default)]
    pub re_emitted: bool,
    /// The decrypted event type, e.g. `m.room_key`.
    pub event_type: String,
    /// The decrypted content.
    pub content: Value,
    /// The sender's user id.
    pub sender: String,
    /// The sending device's Curve25519 key (authenticated by Olm).
    pub sender_curve25519_key: String,
    /// The sending device's Ed25519 key as claimed in the plaintext (checked against the device
    /// keys when the device is known).
    pub sender_ed25519_key: String,
    /// The sending device's id, when the device is known.
    pub sender_device_id: Option<String>,
    /// Whether the Ed25519 key was confirmed by validly signed device keys (`/keys/query` or
    /// `sender_device_keys`). `false` only for `m.room_key` events from unknown devices.
    pub sender_device_verified: bool,
}

/// A decrypted result still waiting in the outbox for [`OlmMachine::acknowledge`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingDecryptedEvent {
    /// The batch that produced it (counted per store).
    pub batch: u64,
    /// Its index in that batch.
    pub index: u64,
    /// The result.
    pub event: DecryptedToDeviceEvent,
}

/// A to-device event that failed, with what the checks learned before failing.
#[derive(Debug)]
pub struct FailedToDeviceEvent {
    /// The typed error; [`DecryptionError::reason`] names the failure.
    pub error: DecryptionError,
    /// The envelope fields known when it failed.
    pub facts: EnvelopeFacts,
    /// Whether the failure produced a PostHog payload, per the reporting policy.
    pub analytics: AnalyticsDecision,
    /// The payload's id in the analytics outbox, when the policy reported it: acknowledge it with
    /// [`OlmMachine::acknowledge_analytics`] once sent.
    pub analytics_id: Option<AnalyticsPayloadId>,
}

/// The result for one event of a `/sync` batch.
#[derive(Debug)]
pub enum ToDeviceOutcome {
    /// An Olm event that decrypted and passed every check.
    Decrypted(DecryptedToDeviceEvent),
    /// A to-device event that was not encrypted, passed through unchanged.
    Plaintext(Value),
    /// An event that failed; one failure item was published for it.
    Failed(FailedToDeviceEvent),
}

/// The outcome of [`OlmMachine::receive_keys_query_response`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct KeysQueryOutcome {
    /// Devices whose keys were stored (new devices, and known devices whose keys are unchanged
    /// or changed only in what the rules allow).
    pub stored: usize,
    /// `user_id/device_id: error` of every device entry that was rejected (invalid signature,
    /// listed under another user or device id).
    pub rejected: Vec<String>,
    /// Validly signed entries for devices we already know that tried to change the device's
    /// Ed25519 key: refused, the known keys kept (see [`RefusedKeyChange`]).
    pub refused_key_changes: Vec<RefusedKeyChange>,
}

/// A `/keys/query` entry refused because it changes the Ed25519 key of a device we already know.
///
/// A device's Ed25519 key is its identity: a device id that comes back with another one is
/// another device (or a server lying about it), and matrix-sdk-crypto refuses the update too. The
/// known keys stay in use; a device that really was replaced must log in with a new device id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedKeyChange {
    /// The device's user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
    /// The Ed25519 key we know and keep (unpadded base64).
    pub known_ed25519: String,
    /// The Ed25519 key the response claimed (unpadded base64).
    pub received_ed25519: String,
}

/// One Matrix device's Olm machine.
///
/// All methods take `&self`; batches are serialized internally. Failure items are published
/// after the batch is committed and after the internal lock is released.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use to_device_crypto::OlmMachine;
///
/// let bob = OlmMachine::in_memory("@bob:example.org", "BOBDEVICE").await.unwrap();
/// let failures = bob.to_device_decryption_failure_stream();
/// let error = bob.decrypt_to_device_event("not json").await.unwrap_err();
/// assert_eq!(error.reason().analytics_name(), "ToDeviceFailedToDecrypt_MalformedEvent");
/// # drop(failures);
/// # });
/// ```
pub struct OlmMachine {
    user_id: String,
    device_id: String,
    identity_keys: IdentityKeys,
    curve25519_base64: String,
    ed25519_base64: String,
    store: Arc<dyn CryptoStore>,
    state: Mutex<MachineState>,
    reporter: FailureReporter,
    listener_drops: AtomicU64,
    /// This instance's owner token in the analytics outbox (random per instance).
    analytics_owner: [u8; 16],
    /// How long this instance's claims on payloads hold, in ms.
    analytics_lease_ms: AtomicU64,
}

impl std::fmt::Debug for OlmMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OlmMachine")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("curve25519", &self.curve25519_base64)
            .finish_non_exhaustive()
    }
}

struct MachineState {
    account: Account,
    device_keys_published: bool,
    /// Sessions per sender key, loaded from the store on first use.
    sessions: HashMap<[u8; 32], Vec<SessionEntry>>,
    /// Devices from `/keys/query`: what the plaintext checks trust.
    devices: KnownDevices,
    /// Devices known only from a verified `sender_device_keys`: used to recover wedged sessions
    /// with them, never by the plaintext checks (as in matrix-sdk-crypto).
    recovery_devices: KnownDevices,
    verified_device_keys: VerifiedDeviceKeysCache,
    policy: ReportingPolicy,
    policy_state: PolicyState,
    /// Whether `policy_state` changed outside a committed batch.
    policy_dirty: bool,
    /// The store generation this cache reflects; another process's commit changes it.
    generation: u64,
    /// Set by [`OlmMachine::wipe`]: nothing may be written any more.
    wiped: bool,
    /// Set when a commit failed: the cache is ahead of the store and must be reloaded.
    stale: bool,
}

/// What one batch changed, besides the dirty flags on session entries.
#[derive(Default)]
struct BatchChanges {
    /// Which of the current chunk's message hashes the store already held when the batch began.
    stored_hashes: HashSet<MessageHash>,
    /// The still-pending results of those messages, by result id.
    stored_pending: HashMap<String, StoredResult>,
    account_changed: bool,
    dirty_sender_keys: HashSet<[u8; 32]>,
    message_hashes: Vec<MessageHash>,
    seen_hashes: HashSet<MessageHash>,
    claimed_one_time_keys: Vec<String>,
    failure_marks: Vec<MessageHash>,
    policy_changed: bool,
    outgoing_requests: Vec<StoredRequest>,
    sent_requests: Vec<String>,
    recovery_attempts: Vec<(String, u64)>,
    batch_number: Option<u64>,
    sync_token: Option<String>,
    removed_sessions: Vec<(String, String)>,
    /// Devices learned in this batch from a verified `sender_device_keys` (for recovery).
    recovery_devices: Vec<StoredDevice>,
    pending_results: Vec<StoredResult>,
    /// Index into `pending_results` of each message decrypted in this batch.
    decrypted_in_batch: HashMap<MessageHash, usize>,
    /// The payloads the policy reported in this batch (the analytics outbox's new rows).
    analytics: Vec<StoredAnalytics>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn corrupted(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupted {
        what,
        detail: e.to_string(),
    }
}

impl OlmMachine {
    /// Our user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Our device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Our identity keys.
    pub fn identity_keys(&self) -> IdentityKeys {
        self.identity_keys
    }
}
