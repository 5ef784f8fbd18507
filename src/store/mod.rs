//! Where Olm state is stored: the [`CryptoStore`] trait, an in-memory store and an encrypted
//! SQLite store, the default for real use.
//!
//! The machine keeps a cache of what it needs and hands the store one [`Changes`] per batch, which
//! the store must commit atomically: all of it or nothing.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;

use crate::analytics::policy::AnalyticsOutboxStats;
use crate::error::StoreError;
/// The replay-detection hash of an Olm message (what [`Changes::message_hashes`] hold).
pub use crate::olm::envelope::MessageHash;

pub mod cipher;
pub mod memory;
mod result_batch;
pub mod sqlite;

pub use cipher::StoreKey;
pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, Synchronous};

/// Our account as stored. `Debug` leaves the pickle out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredAccount {
    /// Our user id.
    pub user_id: String,
    /// Our device id.
    pub device_id: String,
    /// The serialized vodozemac `AccountPickle` (secret: stores must protect it).
    pub pickle: String,
    /// Whether our device keys were uploaded.
    pub device_keys_published: bool,
}

/// One Olm session as stored. `Debug` leaves the pickle out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The other device's Curve25519 key, unpadded base64.
    pub sender_key: String,
    /// The session id.
    pub session_id: String,
    /// The serialized vodozemac `SessionPickle` (secret: stores must protect it).
    pub pickle: String,
    /// When the session was last used (ms since the Unix epoch).
    pub last_used: u64,
}

/// Another device's keys as stored: the signed `DeviceKeys` JSON text, verified again on load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDevice {
    /// The owner's user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
    /// The signed device-keys object.
    pub json: String,
}

/// Everything one batch changed, committed atomically by [`CryptoStore::save_changes`].
/// `Debug` prints what changed (counts and ids), never pickles or decrypted results.
#[derive(Clone, Default)]
pub struct Changes {
    /// The account, when it changed (one-time key used or generated, keys published).
    pub account: Option<StoredAccount>,
    /// New and updated sessions.
    pub sessions: Vec<StoredSession>,
    /// Replay keys of newly decrypted messages ([`MessageHash::replay_key`]).
    pub message_hashes: Vec<MessageHash>,
    /// Device-keys objects learned from `/keys/query`. Each replaces the device's entry in
    /// [`recovery_devices`](Self::recovery_devices), if any: `/keys/query` is the authority.
    pub devices: Vec<StoredDevice>,
    /// Devices known only from a verified `sender_device_keys`, remembered to recover wedged
    /// sessions with them (see [`CryptoStore::load_recovery_devices`]).
    pub recovery_devices: Vec<StoredDevice>,
    /// Other devices' one-time keys we used to create outbound sessions.
    pub claimed_one_time_keys: Vec<String>,
    /// Marks of failed messages (the reporting policy's "once per message").
    pub failure_marks: Vec<MessageHash>,
    /// The reporting policy's state (windows, cap, counts), when it changed.
    pub policy_state: Option<String>,
    /// New outgoing requests.
    pub outgoing_requests: Vec<StoredRequest>,
    /// Ids of outgoing requests that were sent (removed).
    pub sent_requests: Vec<String>,
    /// `(sender key, time)` of each device recovery started (the once-per-hour limit).
    pub recovery_attempts: Vec<(String, u64)>,
    /// `(sender key, session id)` of sessions dropped (least recently used beyond the cap).
    pub removed_sessions: Vec<(String, String)>,
    /// Decrypted results of this batch, kept until acknowledged (the outbox).
    pub pending_results: Vec<StoredResult>,
    /// Ids of results the app acknowledged (removed from the outbox).
    pub acknowledged: Vec<String>,
    /// The `/sync` `next_batch` token that came with this batch.
    pub sync_token: Option<String>,
    /// The number of this batch (results carry it), when a batch was processed.
    pub batch_number: Option<u64>,
    /// The analytics payloads this batch decided to report (the analytics outbox), committed with
    /// the failure marks and policy state that decided them.
    pub analytics: Vec<StoredAnalytics>,
    /// The claim `analytics` are committed under: the committing machine delivers them itself.
    pub analytics_claim: Option<AnalyticsClaim>,
}

/// One payload in the analytics outbox. It holds no secret: the payload is the failure name alone
/// (`domain` and `cryptoSDK` are constants), so it is stored as that name, in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAnalytics {
    /// The payload id ([`AnalyticsPayloadId`](crate::reporting::AnalyticsPayloadId)'s number).
    pub id: u64,
    /// The payload's `name` property, e.g. `ToDeviceFailedToDecrypt_SessionWedged`.
    pub name: String,
    /// When it was decided (ms since the Unix epoch).
    pub created_at: u64,
}

/// Who is delivering a payload, and until when that claim holds.
///
/// Every machine instance has its own random owner token. A payload claimed by another owner
/// whose lease has not run out is being delivered by that owner (another process, usually) and
/// is left alone; an expired claim is treated as abandoned (its owner was killed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnalyticsClaim {
    /// The claiming machine instance.
    pub owner: [u8; 16],
    /// The claim holds until this time (ms since the Unix epoch).
    pub lease_until: u64,
}

/// The most payloads the analytics outbox holds; beyond it the oldest are dropped (and counted),
/// so a listener that never succeeds cannot grow the store without bound. About 100 bytes each.
pub const MAX_PENDING_ANALYTICS: u64 = 10_000;

/// How many times a delivery may fail (a listener threw) before its payload is given up (and
/// counted). Each attempt is one delivery: the first with its batch, the others with later
/// batches or `flush_pending_analytics`.
pub const MAX_ANALYTICS_DELIVERY_ATTEMPTS: u32 = 5;

/// A decrypted result waiting in the outbox for the app's acknowledgement. `Debug` leaves the
/// decrypted JSON out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResult {
    /// The result id (derived from the message hash).
    pub id: String,
    /// The batch that produced it.
    pub batch: u64,
    /// Its index in that batch.
    pub index: u64,
    /// The serialized result (secret: stores must protect it).
    pub json: String,
}

/// Holds the store's cross-process write lock; dropping it releases the lock.
///
/// The machine takes it for the duration of one batch or one key operation only, never while idle
/// (iOS kills a suspended app that holds a file lock).
#[derive(Debug, Default)]
pub struct WriteLock {
    /// Held only for its `Drop`: closing the file releases the OS lock.
    _file: Option<std::fs::File>,
}

impl WriteLock {
    /// A lock backed by an OS file lock (released when the file is closed).
    pub fn file(file: std::fs::File) -> Self {
        Self { _file: Some(file) }
    }

    /// No lock: for stores that only one process can open.
    pub fn none() -> Self {
        Self { _file: None }
    }
}

/// An outgoing request as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRequest {
    /// The request id.
    pub request_id: String,
    /// The serialized [`OutgoingRequest`](crate::requests::OutgoingRequest).
    pub json: String,
    /// When it was created (ms since the Unix epoch); requests are listed in this order.
    pub created_at: u64,
}

impl Changes {
    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.account.is_none()
            && self.sessions.is_empty()
            && self.message_hashes.is_empty()
            && self.devices.is_empty()
            && self.recovery_devices.is_empty()
            && self.claimed_one_time_keys.is_empty()
            && self.failure_marks.is_empty()
            && self.policy_state.is_none()
            && self.outgoing_requests.is_empty()
            && self.sent_requests.is_empty()
            && self.recovery_attempts.is_empty()
            && self.pending_results.is_empty()
            && self.removed_sessions.is_empty()
            && self.acknowledged.is_empty()
            && self.sync_token.is_none()
            && self.batch_number.is_none()
            && self.analytics.is_empty()
    }
}

/// What [`CryptoStore::create_account`] did.
#[derive(Debug)]
pub enum AccountCreation {
    /// The store had no account: ours is now the one.
    Created,
    /// Another opener (a thread, or another process such as the notification extension) created
    /// an account first; it is returned and nothing was written.
    AlreadyExists(StoredAccount),
}

const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for StoredAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredAccount")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("pickle", &REDACTED)
            .field("device_keys_published", &self.device_keys_published)
            .finish()
    }
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("sender_key", &self.sender_key)
            .field("session_id", &self.session_id)
            .field("pickle", &REDACTED)
            .field("last_used", &self.last_used)
            .finish()
    }
}

impl std::fmt::Debug for StoredResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredResult")
            .field("id", &self.id)
            .field("batch", &self.batch)
            .field("index", &self.index)
            .field("json", &REDACTED)
            .finish()
    }
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field's own `Debug` is either redacted (account, sessions, results) or holds no
        // secret (ids, hashes, public device keys, counts).
        f.debug_struct("Changes")
            .field("account", &self.account)
            .field("sessions", &self.sessions)
            .field("message_hashes", &self.message_hashes.len())
            .field("devices", &self.devices)
            .field("recovery_devices", &self.recovery_devices)
            .field("claimed_one_time_keys", &self.claimed_one_time_keys.len())
            .field("failure_marks", &self.failure_marks.len())
            .field("policy_state", &self.policy_state.is_some())
            .field("outgoing_requests", &self.outgoing_requests.len())
            .field("sent_requests", &self.sent_requests)
            .field("recovery_attempts", &self.recovery_attempts.len())
            .field("removed_sessions", &self.removed_sessions)
            .field("pending_results", &self.pending_results)
            .field("acknowledged", &self.acknowledged)
            .field("sync_token", &self.sync_token.is_some())
            .field("batch_number", &self.batch_number)
            .finish()
    }
}

/// The persistence the Olm machine needs.
///
/// Implementations must make [`save_changes`](CryptoStore::save_changes) atomic and must protect
/// pickles, which hold private keys.
#[async_trait]
pub trait CryptoStore: Send + Sync + std::fmt::Debug {
    /// Our account, if one was stored.
    async fn load_account(&self) -> Result<Option<StoredAccount>, StoreError>;
    /// Stores `account` as the store's account if it has none, atomically: a plain insert that
    /// never replaces an account another opener created first (that one is returned instead).
    /// The machine calls it under [`lock_for_writing`](Self::lock_for_writing) when it found no
    /// account, so that two processes opening a new store end up with one identity.
    async fn create_account(&self, account: StoredAccount) -> Result<AccountCreation, StoreError>;
    /// Every session with the device whose Curve25519 key is `sender_key`.
    async fn load_sessions(&self, sender_key: &str) -> Result<Vec<StoredSession>, StoreError>;
    /// Every device stored from `/keys/query`.
    async fn load_devices(&self) -> Result<Vec<StoredDevice>, StoreError>;
    /// Every device known only from a verified `sender_device_keys` (for session recovery, not
    /// for the plaintext checks); a device later stored from `/keys/query` is no longer listed.
    async fn load_recovery_devices(&self) -> Result<Vec<StoredDevice>, StoreError>;
    /// Which of `hashes` (replay keys, [`MessageHash::replay_key`]) belong to messages already
    /// decrypted: one call per batch, so that a store can answer with one query instead of one
    /// per event.
    async fn known_message_hashes(
        &self,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError>;
    /// Whether the store holds replay hashes in the format before replay keys (whole-message
    /// hashes, [`MessageHash::new`], written by schema-4 stores and never pruned). When it does,
    /// the machine also looks those up, but only where a replay of such a message is possible:
    /// for pre-key messages, and for messages that failed to decrypt. A store that never held
    /// any (every store but a migrated SQLite one) keeps the default.
    fn has_legacy_message_hashes(&self) -> bool {
        false
    }
    /// Which of `hashes` (whole-message hashes, [`MessageHash::new`]) the store holds from before
    /// replay keys; see [`has_legacy_message_hashes`](Self::has_legacy_message_hashes).
    async fn known_legacy_message_hashes(
        &self,
        _hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        Ok(HashSet::new())
    }
    /// Whether we already used this one-time key of another device.
    async fn is_one_time_key_claimed(&self, key: &str) -> Result<bool, StoreError>;
    /// Whether a failure with this mark was already recorded.
    async fn contains_failure_mark(&self, mark: &MessageHash) -> Result<bool, StoreError>;
    /// The reporting policy's state, if stored.
    async fn load_policy_state(&self) -> Result<Option<String>, StoreError>;
    /// Every unsent outgoing request, oldest first.
    async fn load_outgoing_requests(&self) -> Result<Vec<StoredRequest>, StoreError>;
    /// When recovery of the device with this sender key last started, if ever.
    async fn last_recovery_attempt(&self, sender_key: &str) -> Result<Option<u64>, StoreError>;
    /// Every result still waiting for acknowledgement, in batch and index order.
    async fn load_pending_results(&self) -> Result<Vec<StoredResult>, StoreError>;
    /// The results among `ids` that are still pending, by id: one call per batch for all of its
    /// re-delivered messages.
    async fn pending_results(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, StoredResult>, StoreError>;
    /// The last committed `/sync` `next_batch` token.
    async fn sync_token(&self) -> Result<Option<String>, StoreError>;
    /// The number of the last committed batch (0 before the first).
    async fn last_batch_number(&self) -> Result<u64, StoreError>;
    /// A counter that every commit increments: when it changed, another process wrote.
    async fn generation(&self) -> Result<u64, StoreError>;
    /// Takes the cross-process write lock, waiting for another process's batch to finish.
    async fn lock_for_writing(&self) -> Result<WriteLock, StoreError>;
    /// Re-encrypts every secret with `new_key` (stores that encrypt nothing do nothing).
    async fn rekey(&self, new_key: crate::store::StoreKey) -> Result<(), StoreError>;
    /// Deletes everything the store holds (logout). The generation counter goes on counting, so
    /// that a machine opened before the wipe notices it (and a passphrase store keeps its salt).
    async fn wipe(&self) -> Result<(), StoreError>;
    /// Commits `changes` atomically.
    async fn save_changes(&self, changes: Changes) -> Result<(), StoreError>;

    // The analytics outbox. These writes are their own small transactions: they change nothing
    // the machine caches, so they do not advance the generation (another process need not reload).

    /// Claims for `claim.owner` at most `limit` payloads that nobody else is delivering — unclaimed,
    /// claimed under a lease that ended before `now`, or already claimed by `claim.owner` — and
    /// returns them oldest first. Atomic: two processes never both get a payload whose lease holds.
    async fn claim_analytics(
        &self,
        claim: AnalyticsClaim,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredAnalytics>, StoreError>;
    /// Removes delivered payloads (unknown ids are ignored: already removed).
    async fn remove_analytics(&self, ids: &[u64]) -> Result<(), StoreError>;
    /// Gives back `owner`'s claim on payloads whose delivery failed: each counts one failed attempt
    /// and is dropped (and counted) at [`MAX_ANALYTICS_DELIVERY_ATTEMPTS`]; the others can be
    /// claimed again at once. Returns how many were dropped.
    async fn release_analytics(&self, owner: [u8; 16], ids: &[u64]) -> Result<u64, StoreError>;
    /// How many payloads are pending, and how many were dropped (outbox full; undeliverable).
    async fn analytics_outbox_stats(&self) -> Result<AnalyticsOutboxStats, StoreError>;
}
