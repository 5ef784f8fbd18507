//! An in-memory [`CryptoStore`]: for apps that keep nothing across launches, for tests and
//! benchmarks. With the `testing` feature it can also fail its next commit and be snapshotted.

use std::collections::{BTreeMap, HashMap, HashSet};
#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    AccountCreation, AnalyticsClaim, Changes, CryptoStore, StoredAccount, StoredAnalytics,
    StoredDevice, StoredRequest, StoredResult, StoredSession, WriteLock,
    MAX_ANALYTICS_DELIVERY_ATTEMPTS, MAX_PENDING_ANALYTICS,
};
use crate::analytics::policy::AnalyticsOutboxStats;
use crate::error::StoreError;
use crate::olm::envelope::MessageHash;

#[derive(Clone, Debug, Default)]
struct Contents {
    account: Option<StoredAccount>,
    sessions: HashMap<String, HashMap<String, StoredSession>>,
    message_hashes: HashSet<MessageHash>,
    devices: HashMap<(String, String), StoredDevice>,
    recovery_devices: HashMap<(String, String), StoredDevice>,
    claimed_one_time_keys: HashSet<String>,
    failure_marks: HashSet<MessageHash>,
    policy_state: Option<String>,
    outgoing_requests: Vec<StoredRequest>,
    recovery_attempts: HashMap<String, u64>,
    /// By result id; ordered by (batch, index) only when listed.
    pending_results: HashMap<String, StoredResult>,
    sync_token: Option<String>,
    batch_number: u64,
    generation: u64,
    /// The analytics outbox by payload id (so in id order).
    analytics: BTreeMap<u64, PendingAnalytics>,
    analytics_dropped: AnalyticsOutboxStats,
}

#[derive(Clone, Debug)]
struct PendingAnalytics {
    stored: StoredAnalytics,
    claim: Option<AnalyticsClaim>,
    attempts: u32,
}

/// A store that keeps everything in memory, for as long as the process lives. `Debug` prints
/// counts.
#[derive(Default)]
pub struct MemoryStore {
    contents: Mutex<Contents>,
    #[cfg(feature = "testing")]
    fail_next_save: AtomicBool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let contents = self.lock();
        f.debug_struct("MemoryStore")
            .field("account", &contents.account)
            .field(
                "sessions",
                &contents.sessions.values().map(HashMap::len).sum::<usize>(),
            )
            .field("devices", &contents.devices.len())
            .field("recovery_devices", &contents.recovery_devices.len())
            .field("pending_results", &contents.pending_results.len())
            .field("outgoing_requests", &contents.outgoing_requests.len())
            .field("generation", &contents.generation)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new store holding a copy of this store's current contents: an old backup to restore
    /// (`testing` feature only).
    #[cfg(feature = "testing")]
    pub fn snapshot(&self) -> Self {
        Self {
            contents: Mutex::new(self.lock().clone()),
            fail_next_save: AtomicBool::new(false),
        }
    }

    /// Makes the next [`CryptoStore::save_changes`] fail without committing anything, to test
    /// that a failed commit leaves no trace (`testing` feature only).
    #[cfg(feature = "testing")]
    pub fn fail_next_save(&self) {
        self.fail_next_save.store(true, Ordering::SeqCst);
    }

    /// How many sessions are stored.
    pub fn session_count(&self) -> usize {
        self.lock().sessions.values().map(HashMap::len).sum()
    }

    /// How many message hashes are stored.
    pub fn message_hash_count(&self) -> usize {
        self.lock().message_hashes.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        // A panic while holding this lock cannot leave the contents half-updated (every update
        // below is a sequence of infallible inserts), so a poisoned lock is safe to reuse.
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl CryptoStore for MemoryStore {
    async fn load_account(&self) -> Result<Option<StoredAccount>, StoreError> {
        Ok(self.lock().account.clone())
    }

    async fn create_account(&self, account: StoredAccount) -> Result<AccountCreation, StoreError> {
        let mut contents = self.lock();
        // Checked and inserted under one lock: of several threads opening this store at once,
        // exactly one creates the account (as SQLite's plain INSERT does across processes).
        if let Some(existing) = &contents.account {
            return Ok(AccountCreation::AlreadyExists(existing.clone()));
        }
        contents.account = Some(account);
        contents.generation += 1;
        Ok(AccountCreation::Created)
    }

    async fn load_sessions(&self, sender_key: &str) -> Result<Vec<StoredSession>, StoreError> {
        Ok(self
            .lock()
            .sessions
            .get(sender_key)
            .map(|sessions| sessions.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn load_devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        Ok(self.lock().devices.values().cloned().collect())
    }

    async fn load_recovery_devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        Ok(self.lock().recovery_devices.values().cloned().collect())
    }

    async fn known_message_hashes(
        &self,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        let state = self.lock();
        Ok(hashes
            .iter()
            .filter(|hash| state.message_hashes.contains(hash))
            .copied()
            .collect())
    }

    async fn is_one_time_key_claimed(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().claimed_one_time_keys.contains(key))
    }

    async fn contains_failure_mark(&self, mark: &MessageHash) -> Result<bool, StoreError> {
        Ok(self.lock().failure_marks.contains(mark))
    }

    async fn load_policy_state(&self) -> Result<Option<String>, StoreError> {
        Ok(self.lock().policy_state.clone())
    }

    async fn load_outgoing_requests(&self) -> Result<Vec<StoredRequest>, StoreError> {
        Ok(self.lock().outgoing_requests.clone())
    }

    async fn last_recovery_attempt(&self, sender_key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.lock().recovery_attempts.get(sender_key).copied())
    }

    async fn load_pending_results(&self) -> Result<Vec<StoredResult>, StoreError> {
        let mut results: Vec<StoredResult> =
            self.lock().pending_results.values().cloned().collect();
        results.sort_unstable_by_key(|r| (r.batch, r.index));
        Ok(results)
    }

    async fn pending_results(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, StoredResult>, StoreError> {
        let contents = self.lock();
        Ok(ids
            .iter()
            .filter_map(|id| contents.pending_results.get(id))
            .map(|result| (result.id.clone(), result.clone()))
            .collect())
    }

    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        Ok(self.lock().sync_token.clone())
    }

    async fn last_batch_number(&self) -> Result<u64, StoreError> {
        Ok(self.lock().batch_number)
    }

    async fn generation(&self) -> Result<u64, StoreError> {
        Ok(self.lock().generation)
    }

    async fn lock_for_writing(&self) -> Result<WriteLock, StoreError> {
        Ok(WriteLock::none())
    }

    async fn rekey(&self, _new_key: crate::store::StoreKey) -> Result<(), StoreError> {
        Ok(()) // nothing is encrypted in memory
    }

    async fn wipe(&self) -> Result<(), StoreError> {
        let mut contents = self.lock();
        // Like SQLite: the generation goes on counting, so that a machine opened before the wipe
        // reloads (and finds the store wiped) instead of writing its old account back.
        let generation = contents.generation + 1;
        *contents = Contents {
            generation,
            ..Contents::default()
        };
        Ok(())
    }

    async fn save_changes(&self, changes: Changes) -> Result<(), StoreError> {
        #[cfg(feature = "testing")]
        if self.fail_next_save.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Simulated("save_changes failed".to_owned()));
        }
        if changes.is_empty() {
            return Ok(()); // like SQLite: no write, no new generation
        }
        let mut contents = self.lock();
        if let Some(account) = changes.account {
            contents.account = Some(account);
        }
        for session in changes.sessions {
            contents
                .sessions
                .entry(session.sender_key.clone())
                .or_default()
                .insert(session.session_id.clone(), session);
        }
        for (sender_key, session_id) in &changes.removed_sessions {
            if let Some(sessions) = contents.sessions.get_mut(sender_key) {
                sessions.remove(session_id);
            }
        }
        contents.message_hashes.extend(changes.message_hashes);
        for device in changes.devices {
            let id = (device.user_id.clone(), device.device_id.clone());
            contents.recovery_devices.remove(&id);
            contents.devices.insert(id, device);
        }
        for device in changes.recovery_devices {
            contents
                .recovery_devices
                .insert((device.user_id.clone(), device.device_id.clone()), device);
        }
        contents
            .claimed_one_time_keys
            .extend(changes.claimed_one_time_keys);
        contents.failure_marks.extend(changes.failure_marks);
        if let Some(policy_state) = changes.policy_state {
            contents.policy_state = Some(policy_state);
        }
        contents
            .outgoing_requests
            .retain(|r| !changes.sent_requests.contains(&r.request_id));
        contents.outgoing_requests.extend(changes.outgoing_requests);
        contents.recovery_attempts.extend(changes.recovery_attempts);
        for id in &changes.acknowledged {
            contents.pending_results.remove(id);
        }
        for result in changes.pending_results {
            // Like SQLite: an id already pending keeps its result (the same message).
            contents
                .pending_results
                .entry(result.id.clone())
                .or_insert(result);
        }
        if let Some(token) = changes.sync_token {
            contents.sync_token = Some(token);
        }
        if let Some(batch_number) = changes.batch_number {
            contents.batch_number = batch_number;
        }
        for stored in changes.analytics {
            contents.analytics.insert(
                stored.id,
                PendingAnalytics {
                    stored,
                    claim: changes.analytics_claim,
                    attempts: 0,
                },
            );
        }
        // Like SQLite: beyond the bound the oldest payloads go, counted.
        while contents.analytics.len() as u64 > MAX_PENDING_ANALYTICS {
            contents.analytics.pop_first();
            contents.analytics_dropped.dropped_full += 1;
        }
        contents.generation += 1;
        Ok(())
    }

    async fn claim_analytics(
        &self,
        claim: AnalyticsClaim,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredAnalytics>, StoreError> {
        let mut contents = self.lock();
        let mut claimed = Vec::new();
        for pending in contents.analytics.values_mut() {
            if claimed.len() >= limit {
                break;
            }
            let free = match pending.claim {
                None => true,
                Some(held) => held.owner == claim.owner || held.lease_until <= now,
            };
            if free {
                pending.claim = Some(claim);
                claimed.push(pending.stored.clone());
            }
        }
        Ok(claimed)
    }

    async fn remove_analytics(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut contents = self.lock();
        for id in ids {
            contents.analytics.remove(id);
        }
        Ok(())
    }

    async fn release_analytics(&self, owner: [u8; 16], ids: &[u64]) -> Result<u64, StoreError> {
        let mut contents = self.lock();
        let mut dropped = 0;
        for id in ids {
            let Some(pending) = contents.analytics.get_mut(id) else {
                continue;
            };
            if pending.claim.map(|claim| claim.owner) != Some(owner) {
                continue; // another owner's now: not ours to release
            }
            pending.attempts += 1;
            pending.claim = None;
            if pending.attempts >= MAX_ANALYTICS_DELIVERY_ATTEMPTS {
                contents.analytics.remove(id);
                dropped += 1;
            }
        }
        contents.analytics_dropped.dropped_undeliverable += dropped;
        Ok(dropped)
    }

    async fn analytics_outbox_stats(&self) -> Result<AnalyticsOutboxStats, StoreError> {
        let contents = self.lock();
        Ok(AnalyticsOutboxStats {
            pending: contents.analytics.len() as u64,
            ..contents.analytics_dropped
        })
    }
}
