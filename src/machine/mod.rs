//! [`OlmMachine`]: one Matrix device's Olm state, decrypting to-device events and reporting every
//! failure.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use vodozemac::olm::{Account, AccountPickle, IdentityKeys, Session, SessionConfig, SessionPickle};
use vodozemac::Curve25519PublicKey;

use crate::analytics::policy::{
    AnalyticsDecision, FailureKey, PolicyState, ReportingPolicy, ReportingStats, SuppressionRule,
};
use crate::analytics::FailureReason;
use crate::error::{DecryptionError, EncryptionError, KeysError, OpenError, StoreError};
use crate::olm::account::{keys_upload_body, one_time_key_target, signed_device_keys};
use crate::olm::device_keys::{
    parse_keys_query_response, DeviceKeys, KnownDevices, PublishedKeys, OLM_V1_ALGORITHM,
};
use crate::olm::envelope::{
    parse_event, EnvelopeFacts, MessageHash, ParsedEvent, ENCRYPTED_EVENT_TYPE,
};
use crate::olm::plaintext::{check_plaintext, PlaintextContext, VerifiedDeviceKeysCache};
use crate::olm::sessions::{decrypt_message, prune_least_recently_used, SessionEntry};
use crate::reporting::{
    FailureDiagnostics, FailureReporter, FailureStream, ToDeviceDecryptionFailure,
};
use crate::store::{
    Changes, CryptoStore, MemoryStore, SqliteStore, StoreKey, StoredAccount, StoredDevice,
    StoredRequest, StoredResult, StoredSession, Synchronous, WriteLock,
};

mod outbox;
mod recovery;

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
pub struct KeysQueryOutcome {
    /// Devices whose keys were stored.
    pub stored: usize,
    /// `user_id/device_id: error` of every device entry that was rejected.
    pub rejected: Vec<String>,
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
    devices: KnownDevices,
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

/// Where one event sits: its index in the batch, the batch's time, and whether it must be
/// encrypted (the single-event API) or may be a plain to-device event (a `/sync` batch).
#[derive(Clone, Copy)]
struct EventPosition {
    index: usize,
    now: u64,
    require_encrypted: bool,
}

/// How many events of a batch are parsed ahead of decryption (and checked against the store's
/// replay hashes in one query).
const PARSE_CHUNK: usize = 256;

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
    pending_results: Vec<StoredResult>,
    /// Index into `pending_results` of each message decrypted in this batch.
    decrypted_in_batch: HashMap<MessageHash, usize>,
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

fn validate_ids(user_id: &str, device_id: &str) -> Result<(), OpenError> {
    let valid_user = user_id.starts_with('@')
        && user_id
            .split_once(':')
            .is_some_and(|(local, server)| local.len() > 1 && !server.is_empty());
    if !valid_user {
        return Err(OpenError::InvalidUserId(user_id.to_owned()));
    }
    if device_id.is_empty()
        || device_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(OpenError::InvalidDeviceId(device_id.to_owned()));
    }
    Ok(())
}

impl OlmMachine {
    /// Opens the machine for `user_id`/`device_id` on `store`, creating the account on first use,
    /// with the default [`ReportingPolicy`].
    pub async fn open(
        user_id: &str,
        device_id: &str,
        store: Arc<dyn CryptoStore>,
    ) -> Result<Self, OpenError> {
        Self::open_with_policy(user_id, device_id, store, ReportingPolicy::default()).await
    }

    /// Opens the machine with an explicit reporting policy (changeable later with
    /// [`set_reporting_policy`](Self::set_reporting_policy)).
    pub async fn open_with_policy(
        user_id: &str,
        device_id: &str,
        store: Arc<dyn CryptoStore>,
        policy: ReportingPolicy,
    ) -> Result<Self, OpenError> {
        validate_ids(user_id, device_id)?;
        let (account, device_keys_published) = match store.load_account().await? {
            Some(stored) => {
                if stored.user_id != user_id || stored.device_id != device_id {
                    return Err(StoreError::AccountMismatch {
                        stored_user: stored.user_id,
                        stored_device: stored.device_id,
                        user: user_id.to_owned(),
                        device: device_id.to_owned(),
                    }
                    .into());
                }
                (
                    unpickle_account(&stored.pickle)?,
                    stored.device_keys_published,
                )
            }
            None => {
                let account = crate::olm::account::new_account();
                store
                    .save_changes(Changes {
                        account: Some(stored_account(&account, user_id, device_id, false)?),
                        ..Changes::default()
                    })
                    .await?;
                (account, false)
            }
        };
        let devices = load_devices(store.as_ref()).await?;
        let policy_state = load_policy_state(store.as_ref()).await?;
        let generation = store.generation().await?;
        let identity_keys = account.identity_keys();
        Ok(Self {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            curve25519_base64: identity_keys.curve25519.to_base64(),
            ed25519_base64: identity_keys.ed25519.to_base64(),
            identity_keys,
            store,
            state: Mutex::new(MachineState {
                account,
                device_keys_published,
                sessions: HashMap::new(),
                devices,
                verified_device_keys: VerifiedDeviceKeysCache::default(),
                policy,
                policy_state,
                policy_dirty: false,
                generation,
                wiped: false,
                stale: false,
            }),
            reporter: FailureReporter::default(),
            listener_drops: AtomicU64::new(0),
        })
    }

    /// Opens a machine on a new in-memory store.
    pub async fn in_memory(user_id: &str, device_id: &str) -> Result<Self, OpenError> {
        Self::open(user_id, device_id, Arc::new(MemoryStore::new())).await
    }

    /// Opens a machine on the SQLite store at `path` (created if missing), encrypted with `key`.
    pub async fn with_sqlite(
        user_id: &str,
        device_id: &str,
        path: impl AsRef<Path>,
        key: StoreKey,
    ) -> Result<Self, OpenError> {
        let store = SqliteStore::open(path, key, Synchronous::Normal)?;
        Self::open(user_id, device_id, Arc::new(store)).await
    }

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

    /// A new subscription to the failure stream: one item per failed event, in order, from now
    /// on. A subscriber that stops polling never blocks decryption; it misses the oldest items
    /// once it lags by more than [`FAILURE_BUFFER_CAPACITY`](crate::reporting::FAILURE_BUFFER_CAPACITY)
    /// and is told how many.
    pub fn to_device_decryption_failure_stream(&self) -> FailureStream {
        self.reporter.subscribe()
    }

    /// The reporting policy in force.
    pub async fn reporting_policy(&self) -> ReportingPolicy {
        self.state.lock().await.policy
    }

    /// Replaces the reporting policy; takes effect from the next failure.
    pub async fn set_reporting_policy(&self, policy: ReportingPolicy) {
        self.state.lock().await.policy = policy;
    }

    /// The analytics consent switch: when off, failures produce no payload at all (nothing is kept
    /// for later); turning it back on does not replay earlier failures.
    pub async fn set_analytics_enabled(&self, enabled: bool) {
        self.state.lock().await.policy.analytics_enabled = enabled;
    }

    /// Failure counts per name (seen, reported, suppressed per rule) and decrypted counts, since
    /// the store was created and per hour; persisted with each batch.
    pub async fn reporting_stats(&self) -> ReportingStats {
        let mut stats = self.state.lock().await.policy_state.stats().clone();
        stats.listener_drops = self.listener_drops.load(Ordering::Relaxed);
        stats
    }

    /// Counts payloads a listener lost because its bounded queue was full (called by the
    /// listener adapters; shown in [`reporting_stats`](Self::reporting_stats)).
    pub fn record_listener_drops(&self, dropped: u64) {
        self.listener_drops.fetch_add(dropped, Ordering::Relaxed);
    }

    /// Our signed device keys, as sent in `sender_device_keys`.
    pub async fn device_keys(&self) -> Value {
        let state = self.state.lock().await;
        signed_device_keys(&state.account, &self.user_id, &self.device_id)
    }

    // ----- keys -------------------------------------------------------------------------------

    /// The `/keys/upload` body with every unpublished key (device keys until published, one-time
    /// keys, fallback key), or `None` when there is nothing to upload.
    pub async fn keys_for_upload(&self) -> Option<Value> {
        let state = self.state.lock().await;
        let body = keys_upload_body(
            &state.account,
            &self.user_id,
            &self.device_id,
            !state.device_keys_published,
        );
        body.as_object()
            .is_some_and(|o| !o.is_empty())
            .then_some(body)
    }

    /// Marks every key of the last [`keys_for_upload`](Self::keys_for_upload) as published, after
    /// the server accepted the upload.
    pub async fn mark_keys_as_published(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        state.account.mark_keys_as_published();
        state.device_keys_published = true;
        self.save_account(&mut state).await
    }

    /// Generates `count` new one-time keys (capped so that no unpublished key is evicted), and a
    /// fallback key if there is no unpublished one. Returns how many one-time keys were made.
    pub async fn generate_one_time_keys(&self, count: usize) -> Result<usize, StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let room = state
            .account
            .max_number_of_one_time_keys()
            .saturating_sub(state.account.one_time_keys().len());
        let count = count.min(room);
        state.account.generate_one_time_keys(count);
        if state.account.fallback_key().is_empty() && !state.device_keys_published {
            state.account.generate_fallback_key();
        }
        self.save_account(&mut state).await?;
        Ok(count)
    }

    /// Tops our one-time keys up from the server's count (`/sync`
    /// `device_one_time_keys_count.signed_curve25519`) to half of what the account can hold, and
    /// rotates the fallback key once the server says it was used. Returns how many keys were
    /// generated; upload them with [`keys_for_upload`](Self::keys_for_upload).
    pub async fn receive_one_time_key_count(
        &self,
        server_count: u64,
        fallback_key_unused: bool,
    ) -> Result<usize, StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let target = one_time_key_target(&state.account);
        let published = usize::try_from(server_count).unwrap_or(usize::MAX);
        let unpublished = state.account.one_time_keys().len();
        let missing = target.saturating_sub(published.saturating_add(unpublished));
        state.account.generate_one_time_keys(missing);
        if !fallback_key_unused && state.account.fallback_key().is_empty() {
            state.account.generate_fallback_key();
        }
        if missing > 0 || !fallback_key_unused {
            self.save_account(&mut state).await?;
        } else {
            // Nothing changed: an empty commit writes nothing and marks the cache current again
            // (otherwise the next batch would reload every cached session).
            self.commit(&mut state, Changes::default()).await?;
        }
        Ok(missing)
    }

    /// Learns other devices' keys from a `/keys/query` response body. Devices with an invalid
    /// signature, or listed under another user or device id, are rejected and reported.
    pub async fn receive_keys_query_response(
        &self,
        body: &Value,
    ) -> Result<KeysQueryOutcome, KeysError> {
        let parsed = parse_keys_query_response(body).ok_or_else(|| KeysError::InvalidBody {
            what: "/keys/query response",
            detail: "expected an object with a `device_keys` object".to_owned(),
        })?;
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let changes = Changes {
            devices: parsed
                .valid
                .iter()
                .map(|device| StoredDevice {
                    user_id: device.user_id.clone(),
                    device_id: device.device_id.clone(),
                    json: device.signed_json.to_string(),
                })
                .collect(),
            ..Changes::default()
        };
        self.commit(&mut state, changes).await?;
        let stored = parsed.valid.len();
        for device in parsed.valid {
            state.devices.insert(device);
        }
        Ok(KeysQueryOutcome {
            stored,
            rejected: parsed
                .rejected
                .into_iter()
                .map(|(user, device, error)| format!("{user}/{device}: {error}"))
                .collect(),
        })
    }

    // ----- decryption -------------------------------------------------------------------------

    /// Decrypts one `m.room.encrypted` to-device event (raw JSON).
    ///
    /// On failure the typed error names the reason, and one item is published on the failure
    /// stream. An unencrypted event has nothing to decrypt and fails with `UnsupportedAlgorithm`;
    /// use [`receive_to_device_events`](Self::receive_to_device_events) for `/sync` batches, which
    /// pass plain events through.
    pub async fn decrypt_to_device_event(
        &self,
        raw_event: &str,
    ) -> Result<DecryptedToDeviceEvent, DecryptionError> {
        let mut outcomes = self.receive_batch(&[raw_event], None, true).await?;
        match outcomes.pop() {
            Some(ToDeviceOutcome::Decrypted(event)) => Ok(event),
            Some(ToDeviceOutcome::Failed(failed)) => Err(failed.error),
            Some(ToDeviceOutcome::Plaintext(_)) | None => {
                unreachable!(
                    "exactly one outcome, and plain events fail when encryption is required"
                )
            }
        }
    }

    /// Decrypts the to-device events of one `/sync` response (raw JSON each), in order.
    ///
    /// Returns one outcome per event. Everything the batch changed — ratchets, new sessions, used
    /// one-time keys, message hashes — is committed in one store transaction before this returns,
    /// then one failure item per failed event is published. If the store fails, nothing is
    /// committed, one `Store` failure is published, and the app should retry the whole batch.
    pub async fn receive_to_device_events<S: AsRef<str>>(
        &self,
        raw_events: &[S],
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        self.receive_batch(raw_events, None, false).await
    }

    /// Like [`receive_to_device_events`](Self::receive_to_device_events), and also commits the
    /// `/sync` response's `next_batch` token with the batch, so that an app that restarts resumes
    /// exactly from the committed point ([`sync_token`](Self::sync_token)).
    pub async fn receive_sync<S: AsRef<str>>(
        &self,
        raw_events: &[S],
        next_batch: Option<&str>,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        self.receive_batch(raw_events, next_batch, false).await
    }

    /// The `next_batch` token committed with the last [`receive_sync`](Self::receive_sync).
    pub async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.store.sync_token().await
    }

    /// Every decrypted result not yet acknowledged, oldest first: after a crash, hand these to the
    /// app again (delivery is at least once).
    pub async fn pending_decrypted_events(&self) -> Result<Vec<PendingDecryptedEvent>, StoreError> {
        self.store
            .load_pending_results()
            .await?
            .into_iter()
            .map(|stored| {
                let mut event: DecryptedToDeviceEvent =
                    serde_json::from_str(&stored.json).map_err(corrupted("decrypted result"))?;
                event.re_emitted = true;
                Ok(PendingDecryptedEvent {
                    batch: stored.batch,
                    index: stored.index,
                    event,
                })
            })
            .collect()
    }

    /// Re-encrypts the store's secrets with `new_key` (key rotation). Afterwards only `new_key`
    /// opens the store; on failure nothing changed.
    pub async fn rekey_store(&self, new_key: StoreKey) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        self.store.rekey(new_key).await?;
        // Re-encryption changes no Olm state: the cache is still exact.
        state.stale = false;
        Ok(())
    }

    /// Deletes everything the store holds (logout). The machine refuses every later write.
    pub async fn wipe(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        self.store.wipe().await?;
        state.wiped = true;
        state.sessions.clear();
        Ok(())
    }

    /// Removes handled results from the outbox; a later re-delivery of their messages is then a
    /// `ReplayedMessage`.
    pub async fn acknowledge(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let changes = Changes {
            acknowledged: ids.to_vec(),
            ..Changes::default()
        };
        self.commit(&mut state, changes).await
    }

    async fn receive_batch<S: AsRef<str>>(
        &self,
        raw_events: &[S],
        next_batch: Option<&str>,
        require_encrypted: bool,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        let mut state = self.state.lock().await;
        let result = self
            .process_batch(&mut state, raw_events, next_batch, require_encrypted)
            .await;
        let store_failure = result.as_ref().err().map(|error| {
            // The cache (policy state included) is ahead of the store (`begin_write` marked it
            // stale): revert it now so that the retried batch is judged afresh, then count the
            // Store failure itself.
            state.policy_dirty = true;
            let key = FailureKey {
                reason: FailureReason::Store,
                sender: None,
                sender_key: None,
                already_seen: false,
            };
            (error.to_string(), key)
        });
        let store_decision = match store_failure {
            Some((error, key)) => {
                if let Err(reload_error) = self.reload(&mut state).await {
                    tracing::warn!(%reload_error, "cannot reload the store after a failed commit");
                }
                let policy = state.policy;
                let decision = state.policy_state.decide(&policy, &key, now_millis());
                Some((error, decision))
            }
            None => None,
        };
        drop(state);
        match result {
            Ok(outcomes) => {
                for (index, outcome) in outcomes.iter().enumerate() {
                    if let ToDeviceOutcome::Failed(failed) = outcome {
                        self.publish_failure(index, failed);
                    }
                }
                Ok(outcomes)
            }
            Err(error) => {
                let (message, decision) = store_decision.expect("set for every error");
                self.reporter.publish(ToDeviceDecryptionFailure::new(
                    FailureReason::Store,
                    FailureDiagnostics {
                        error: message,
                        ..FailureDiagnostics::default()
                    },
                    decision,
                ));
                Err(error)
            }
        }
    }

    fn publish_failure(&self, index: usize, failed: &FailedToDeviceEvent) {
        let reason = failed.error.reason();
        tracing::debug!(index, %reason, "to-device event failed to decrypt");
        self.reporter.publish(ToDeviceDecryptionFailure::new(
            reason,
            FailureDiagnostics {
                sender: failed.facts.sender.clone(),
                sender_key: failed.facts.sender_key.clone(),
                message_type: failed.facts.message_type,
                index,
                error: failed.error.to_string(),
            },
            failed.analytics,
        ));
    }

    async fn process_batch<S: AsRef<str>>(
        &self,
        state: &mut MachineState,
        raw_events: &[S],
        next_batch: Option<&str>,
        require_encrypted: bool,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        let _lock = self.begin_write(state).await?;
        let mut batch = BatchChanges {
            batch_number: Some(self.store.last_batch_number().await? + 1),
            sync_token: next_batch.map(str::to_owned),
            ..BatchChanges::default()
        };
        let mut outcomes = Vec::with_capacity(raw_events.len());
        let now = now_millis();
        // Envelopes first, so that the store answers the replay check once per chunk of events;
        // chunks bound the memory the parsed envelopes take on a large batch.
        for (chunk_number, chunk) in raw_events.chunks(PARSE_CHUNK).enumerate() {
            let parsed: Vec<_> = chunk
                .iter()
                .map(|raw| {
                    let mut facts = EnvelopeFacts::default();
                    let parsed = parse_event(raw.as_ref(), &self.curve25519_base64, &mut facts);
                    (parsed, facts)
                })
                .collect();
            let hashes: Vec<MessageHash> = parsed
                .iter()
                .filter_map(|(parsed, _)| match parsed {
                    Ok(ParsedEvent::Olm(envelope)) => Some(envelope.message_hash),
                    _ => None,
                })
                .collect();
            batch.stored_hashes = self.store.known_message_hashes(&hashes).await?;
            batch.stored_pending = if batch.stored_hashes.is_empty() {
                HashMap::new()
            } else {
                let ids: Vec<String> = batch.stored_hashes.iter().map(result_id).collect();
                self.store.pending_results(&ids).await?
            };
            for (offset, (raw, (parsed, facts))) in chunk.iter().zip(parsed).enumerate() {
                let position = EventPosition {
                    index: chunk_number * PARSE_CHUNK + offset,
                    now,
                    require_encrypted,
                };
                let outcome = self
                    .process_event(state, &mut batch, raw.as_ref(), parsed, facts, position)
                    .await;
                match outcome {
                    Ok(outcome) => outcomes.push(outcome),
                    // `begin_write` left the cache marked stale: the next call reloads it.
                    Err(error) => return Err(error),
                }
            }
        }
        self.apply_reporting_policy(state, &mut batch, &mut outcomes, raw_events, now)
            .await?;
        self.schedule_recovery(state, &mut batch, &outcomes, now)
            .await?;
        let changes = self.collect_changes(state, batch)?;
        crate::fail_point::hit("before_commit");
        self.commit(state, changes).await?;
        crate::fail_point::hit("after_commit");
        Ok(outcomes)
    }

    /// Decrypts one event. `Err` only for store failures, which abort the batch.
    async fn process_event(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        raw: &str,
        parsed: Result<ParsedEvent, DecryptionError>,
        facts: EnvelopeFacts,
        position: EventPosition,
    ) -> Result<ToDeviceOutcome, StoreError> {
        let result = self.decrypt_event(state, batch, parsed, position).await;
        Ok(match result {
            Ok(Some(event)) => ToDeviceOutcome::Decrypted(event),
            Ok(None) => match serde_json::from_str(raw) {
                Ok(event) => ToDeviceOutcome::Plaintext(event),
                Err(error) => ToDeviceOutcome::Failed(FailedToDeviceEvent {
                    error: DecryptionError::MalformedEvent(error.to_string()),
                    facts,
                    analytics: UNDECIDED,
                }),
            },
            Err(DecryptionError::Store(error)) => return Err(error),
            Err(error) => ToDeviceOutcome::Failed(FailedToDeviceEvent {
                error,
                facts,
                analytics: UNDECIDED,
            }),
        })
    }

    async fn decrypt_event(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        parsed: Result<ParsedEvent, DecryptionError>,
        event: EventPosition,
    ) -> Result<Option<DecryptedToDeviceEvent>, DecryptionError> {
        let EventPosition {
            index,
            now,
            require_encrypted,
        } = event;
        let envelope = match parsed? {
            ParsedEvent::Plain { event_type } if require_encrypted => {
                return Err(DecryptionError::UnsupportedAlgorithm(Some(format!(
                    "none: a plain {event_type} event"
                ))))
            }
            ParsedEvent::Plain { .. } => return Ok(None),
            ParsedEvent::Olm(envelope) => envelope,
        };
        // A message decrypted before is re-emitted while its result is pending (not yet
        // acknowledged), and a replay once it was acknowledged (or never accepted).
        if let Some(&position) = batch.decrypted_in_batch.get(&envelope.message_hash) {
            let mut event: DecryptedToDeviceEvent =
                serde_json::from_str(&batch.pending_results[position].json)
                    .map_err(corrupted("decrypted result"))?;
            event.re_emitted = true;
            return Ok(Some(event));
        }
        if batch.seen_hashes.contains(&envelope.message_hash)
            || batch.stored_hashes.contains(&envelope.message_hash)
        {
            if let Some(stored) = batch.stored_pending.get(&result_id(&envelope.message_hash)) {
                let mut event: DecryptedToDeviceEvent =
                    serde_json::from_str(&stored.json).map_err(corrupted("decrypted result"))?;
                event.re_emitted = true;
                return Ok(Some(event));
            }
            return Err(DecryptionError::ReplayedMessage {
                sender_key: envelope.sender_key.to_base64(),
            });
        }

        let sender_key_bytes = envelope.sender_key.to_bytes();
        self.ensure_sessions_loaded(state, &envelope.sender_key)
            .await?;
        let MachineState {
            account,
            sessions,
            devices,
            verified_device_keys,
            ..
        } = state;
        let sessions = sessions.entry(sender_key_bytes).or_default();
        let (plaintext, decrypted) = decrypt_message(
            account,
            sessions,
            &envelope.sender_key,
            &envelope.message,
            now,
        )?;

        // From here on the message decrypted: its ratchet step, new session, used one-time key
        // and hash are committed whatever the plaintext checks say, so that a re-delivery is a
        // replay rather than a false "wedged".
        batch.dirty_sender_keys.insert(sender_key_bytes);
        batch.account_changed |= decrypted.created_session;
        if decrypted.created_session {
            let sender_key = envelope.sender_key.to_base64();
            for session_id in prune_least_recently_used(sessions) {
                batch
                    .removed_sessions
                    .push((sender_key.clone(), session_id));
            }
        }
        batch.seen_hashes.insert(envelope.message_hash);
        batch.message_hashes.push(envelope.message_hash);

        let context = PlaintextContext {
            our_user_id: &self.user_id,
            our_ed25519: &self.ed25519_base64,
            envelope_sender: &envelope.sender,
            sender_key: &envelope.sender_key,
            known_devices: devices,
        };
        let accepted = check_plaintext(&plaintext, &context, verified_device_keys)?;
        let accepted_raw_content = accepted.raw_content;
        let event = DecryptedToDeviceEvent {
            id: result_id(&envelope.message_hash),
            re_emitted: false,
            event_type: accepted.event_type,
            content: accepted.content,
            sender: envelope.sender,
            sender_curve25519_key: envelope.sender_key.to_base64(),
            sender_ed25519_key: accepted.sender_ed25519,
            sender_device_id: accepted.sender_device_id,
            sender_device_verified: accepted.sender_device_verified,
        };
        batch
            .decrypted_in_batch
            .insert(envelope.message_hash, batch.pending_results.len());
        batch.pending_results.push(StoredResult {
            id: event.id.clone(),
            batch: batch.batch_number.unwrap_or_default(),
            index: index as u64,
            json: outbox::pending_result_json(&event, accepted_raw_content),
        });
        Ok(Some(event))
    }

    async fn ensure_sessions_loaded(
        &self,
        state: &mut MachineState,
        sender_key: &Curve25519PublicKey,
    ) -> Result<(), StoreError> {
        if state.sessions.contains_key(sender_key.as_bytes()) {
            return Ok(());
        }
        let stored = self.store.load_sessions(&sender_key.to_base64()).await?;
        let mut entries = Vec::with_capacity(stored.len());
        for session in stored {
            let pickle: SessionPickle =
                serde_json::from_str(&session.pickle).map_err(corrupted("session pickle"))?;
            entries.push(SessionEntry::new(
                Session::from_pickle(pickle),
                session.last_used,
                false,
            ));
        }
        state.sessions.insert(sender_key.to_bytes(), entries);
        Ok(())
    }

    /// Decides, for every failure of the batch, whether it produces a payload, and records the
    /// once-per-message marks and the policy state in the batch (so they commit with it).
    async fn apply_reporting_policy<S: AsRef<str>>(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        outcomes: &mut [ToDeviceOutcome],
        raw_events: &[S],
        now: u64,
    ) -> Result<(), StoreError> {
        let mut decrypted = 0;
        let mut marked_in_batch = HashSet::new();
        for (outcome, raw) in outcomes.iter_mut().zip(raw_events) {
            let failed = match outcome {
                ToDeviceOutcome::Failed(failed) => failed,
                ToDeviceOutcome::Decrypted(event) => {
                    decrypted += u64::from(!event.re_emitted);
                    continue;
                }
                ToDeviceOutcome::Plaintext(_) => continue,
            };
            // A message is identified by its Olm message hash when it got that far, else by its
            // raw text; hashed with the reason so that a replay of a once-decrypted message is
            // still reported once.
            let mark = failure_mark(&failed.facts, failed.error.reason(), raw.as_ref());
            let already_seen =
                !marked_in_batch.insert(mark) || self.store.contains_failure_mark(&mark).await?;
            if !already_seen {
                batch.failure_marks.push(mark);
            }
            let key = FailureKey {
                reason: failed.error.reason(),
                sender: failed.facts.sender.as_deref(),
                sender_key: failed.facts.sender_key.as_deref(),
                already_seen,
            };
            let policy = state.policy;
            failed.analytics = state.policy_state.decide(&policy, &key, now);
            batch.policy_changed = true;
        }
        state.policy_state.record_decrypted(decrypted, now);
        batch.policy_changed |= decrypted > 0;
        Ok(())
    }

    fn collect_changes(
        &self,
        state: &mut MachineState,
        batch: BatchChanges,
    ) -> Result<Changes, StoreError> {
        let mut changes = Changes {
            message_hashes: batch.message_hashes,
            claimed_one_time_keys: batch.claimed_one_time_keys,
            failure_marks: batch.failure_marks,
            outgoing_requests: batch.outgoing_requests,
            sent_requests: batch.sent_requests,
            recovery_attempts: batch.recovery_attempts,
            pending_results: batch.pending_results,
            removed_sessions: batch.removed_sessions,
            sync_token: batch.sync_token,
            batch_number: batch.batch_number,
            ..Changes::default()
        };
        if batch.policy_changed || state.policy_dirty {
            changes.policy_state = Some(state.policy_state.to_json());
            state.policy_dirty = false;
        }
        if batch.account_changed {
            changes.account = Some(stored_account(
                &state.account,
                &self.user_id,
                &self.device_id,
                state.device_keys_published,
            )?);
        }
        for sender_key in batch.dirty_sender_keys {
            let Some(entries) = state.sessions.get_mut(&sender_key) else {
                continue;
            };
            let sender_key = Curve25519PublicKey::from_bytes(sender_key).to_base64();
            for entry in entries.iter_mut().filter(|e| e.dirty) {
                entry.dirty = false;
                changes.sessions.push(StoredSession {
                    sender_key: sender_key.clone(),
                    session_id: entry.session_id.clone(),
                    pickle: serde_json::to_string(&entry.session.pickle())
                        .map_err(corrupted("session pickle"))?,
                    last_used: entry.last_used,
                });
            }
        }
        Ok(changes)
    }

    /// Drops the cache after a failed commit: the store is the truth again.
    async fn reload(&self, state: &mut MachineState) -> Result<(), StoreError> {
        let stored = self
            .store
            .load_account()
            .await?
            .ok_or_else(|| StoreError::Corrupted {
                what: "account",
                detail: "the account disappeared from the store".to_owned(),
            })?;
        state.account = unpickle_account(&stored.pickle)?;
        state.device_keys_published = stored.device_keys_published;
        state.sessions.clear();
        state.devices = load_devices(self.store.as_ref()).await?;
        state.policy_state = load_policy_state(self.store.as_ref()).await?;
        state.stale = false;
        Ok(())
    }

    async fn save_account(&self, state: &mut MachineState) -> Result<(), StoreError> {
        let changes = Changes {
            account: Some(stored_account(
                &state.account,
                &self.user_id,
                &self.device_id,
                state.device_keys_published,
            )?),
            ..Changes::default()
        };
        self.commit(state, changes).await
    }

    /// Takes the cross-process write lock and makes sure the cache reflects the store: after a
    /// failed commit, or when another process (e.g. the iOS notification extension) committed.
    async fn begin_write(&self, state: &mut MachineState) -> Result<WriteLock, StoreError> {
        if state.wiped {
            return Err(StoreError::Wiped);
        }
        let lock = self.store.lock_for_writing().await?;
        let generation = self.store.generation().await?;
        if state.stale || generation != state.generation {
            self.reload(state).await?;
            state.generation = generation;
        }
        // Until the commit succeeds the cache may run ahead of the store: if anything (even a
        // panic) interrupts the operation, the next one reloads.
        state.stale = true;
        Ok(lock)
    }

    /// Commits `changes`; on failure the cache is ahead of the store and marked stale.
    async fn commit(&self, state: &mut MachineState, changes: Changes) -> Result<(), StoreError> {
        if let Err(error) = self.store.save_changes(changes).await {
            state.stale = true;
            return Err(error);
        }
        if let Ok(generation) = self.store.generation().await {
            state.generation = generation;
            state.stale = false;
        }
        Ok(())
    }

    // ----- encryption -------------------------------------------------------------------------

    /// Encrypts one event per entry of `contents` for the device that published `recipient`,
    /// as `/sync`-shaped `m.room.encrypted` to-device events.
    ///
    /// Uses the most recently used session with that device, or creates one from the first of its
    /// one-time keys we never used before (fallback keys last). The plaintext carries our
    /// `sender_device_keys`. Everything is committed before the events are returned.
    pub async fn encrypt(
        &self,
        recipient: &PublishedKeys,
        event_type: &str,
        contents: &[Value],
    ) -> Result<Vec<Value>, EncryptionError> {
        if contents.iter().any(|c| !c.is_object()) {
            return Err(EncryptionError::ContentNotAnObject);
        }
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let device = &recipient.device;
        self.ensure_sessions_loaded(&mut state, &device.curve25519)
            .await?;
        let mut batch = BatchChanges::default();
        let has_session = state
            .sessions
            .get(device.curve25519.as_bytes())
            .is_some_and(|s| !s.is_empty());
        if !has_session {
            let session = self
                .create_outbound_session(&mut state, &mut batch, recipient)
                .await?;
            state
                .sessions
                .entry(device.curve25519.to_bytes())
                .or_default()
                .push(SessionEntry::new(session, now_millis(), true));
        }
        let our_device_keys = signed_device_keys(&state.account, &self.user_id, &self.device_id);
        let sessions = state
            .sessions
            .get_mut(device.curve25519.as_bytes())
            .expect("a session exists or was just created");
        let entry = sessions
            .iter_mut()
            .max_by_key(|e| e.last_used)
            .expect("a session exists or was just created");
        let mut events = Vec::with_capacity(contents.len());
        for content in contents {
            let encrypted = self.encrypted_content(
                &mut entry.session,
                device,
                event_type,
                content,
                &our_device_keys,
            )?;
            events.push(json!({
                "type": ENCRYPTED_EVENT_TYPE,
                "sender": self.user_id,
                "content": encrypted,
            }));
        }
        entry.last_used = now_millis();
        entry.dirty = true;
        batch.dirty_sender_keys.insert(device.curve25519.to_bytes());
        let changes = self.collect_changes(&mut state, batch)?;
        self.commit(&mut state, changes).await?;
        Ok(events)
    }

    /// The `m.room.encrypted` content of one Olm-encrypted event for `device`, with the plaintext
    /// fields the spec requires and our `sender_device_keys`.
    fn encrypted_content(
        &self,
        session: &mut Session,
        device: &DeviceKeys,
        event_type: &str,
        content: &Value,
        our_device_keys: &Value,
    ) -> Result<Value, EncryptionError> {
        let plaintext = json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "recipient": device.user_id,
            "recipient_keys": {"ed25519": device.ed25519.to_base64()},
            "keys": {"ed25519": self.ed25519_base64},
            "sender_device_keys": our_device_keys,
        });
        let message = session
            .encrypt(plaintext.to_string())
            .map_err(|e| EncryptionError::Olm(e.to_string()))?;
        let (message_type, body) = message.to_parts();
        Ok(json!({
            "algorithm": OLM_V1_ALGORITHM,
            "sender_key": self.curve25519_base64,
            "ciphertext": {
                device.curve25519.to_base64(): {
                    "type": message_type,
                    "body": vodozemac::base64_encode(body),
                }
            }
        }))
    }

    async fn create_outbound_session(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        recipient: &PublishedKeys,
    ) -> Result<Session, EncryptionError> {
        let mut candidates: Vec<_> = recipient.one_time_keys.iter().collect();
        // Fallback keys only when no one-time key is left: they are shared by every sender.
        candidates.sort_by_key(|k| k.fallback);
        for key in candidates {
            let key_base64 = key.key.to_base64();
            if !key.fallback && self.store.is_one_time_key_claimed(&key_base64).await? {
                continue;
            }
            let session = state
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    recipient.device.curve25519,
                    key.key,
                )
                .map_err(|e| EncryptionError::Olm(e.to_string()))?;
            batch.claimed_one_time_keys.push(key_base64);
            return Ok(session);
        }
        Err(EncryptionError::NoOneTimeKey {
            user_id: recipient.device.user_id.clone(),
            device_id: recipient.device.device_id.clone(),
        })
    }
}

/// Placeholder until [`OlmMachine::apply_reporting_policy`] decides; never published.
const UNDECIDED: AnalyticsDecision = AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen);

/// The outbox id of a decrypted message.
fn result_id(hash: &MessageHash) -> String {
    crate::encoding::to_hex(&hash.0[..16])
}

fn failure_mark(facts: &EnvelopeFacts, reason: FailureReason, raw: &str) -> MessageHash {
    let mut hasher = Sha256::new();
    hasher.update(reason.as_str().as_bytes());
    match &facts.message_hash {
        Some(hash) => hasher.update(hash.0),
        None => hasher.update(raw.as_bytes()),
    }
    MessageHash(hasher.finalize().into())
}

async fn load_policy_state(store: &dyn CryptoStore) -> Result<PolicyState, StoreError> {
    match store.load_policy_state().await? {
        Some(json) => PolicyState::from_json(&json).map_err(corrupted("reporting policy state")),
        None => Ok(PolicyState::default()),
    }
}

fn unpickle_account(pickle: &str) -> Result<Account, StoreError> {
    let pickle: AccountPickle =
        serde_json::from_str(pickle).map_err(corrupted("account pickle"))?;
    Ok(Account::from_pickle(pickle))
}

fn stored_account(
    account: &Account,
    user_id: &str,
    device_id: &str,
    device_keys_published: bool,
) -> Result<StoredAccount, StoreError> {
    Ok(StoredAccount {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        pickle: serde_json::to_string(&account.pickle()).map_err(corrupted("account pickle"))?,
        device_keys_published,
    })
}

async fn load_devices(store: &dyn CryptoStore) -> Result<KnownDevices, StoreError> {
    let mut devices = KnownDevices::default();
    for stored in store.load_devices().await? {
        let value: Value = serde_json::from_str(&stored.json).map_err(corrupted("device keys"))?;
        // Re-verified on load: a tampered row is dropped rather than trusted.
        match DeviceKeys::from_signed_json(&value) {
            Ok(device) => devices.insert(device),
            Err(error) => {
                tracing::warn!(%error, "dropping stored device keys that no longer verify")
            }
        }
    }
    Ok(devices)
}
