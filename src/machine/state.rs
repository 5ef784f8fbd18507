//! The machine's cached state and the store: opening a machine (creating its account on first
//! use), keeping the cache in step with the store under the cross-process write lock (reload,
//! begin a write, commit), re-encrypting and wiping the store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Mutex;
use vodozemac::olm::{Account, AccountPickle};

use super::{corrupted, MachineState, OlmMachine};
use crate::analytics::policy::{PolicyState, ReportingPolicy};
use crate::error::{OpenError, StoreError};
use crate::olm::device_keys::{DeviceKeys, KnownDevices};
use crate::olm::plaintext::VerifiedDeviceKeysCache;
use crate::reporting::FailureReporter;
use crate::store::{
    Changes, CryptoStore, MemoryStore, SqliteStore, StoreKey, StoredAccount, Synchronous, WriteLock,
};

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
            analytics_owner: super::analytics_outbox::new_owner_token()?,
            analytics_lease_ms: AtomicU64::new(super::analytics_outbox::lease_millis(
                super::DEFAULT_ANALYTICS_LEASE,
            )),
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

    /// Drops the cache after a failed commit: the store is the truth again.
    pub(super) async fn reload(&self, state: &mut MachineState) -> Result<(), StoreError> {
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

    pub(super) async fn save_account(&self, state: &mut MachineState) -> Result<(), StoreError> {
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
    pub(super) async fn begin_write(
        &self,
        state: &mut MachineState,
    ) -> Result<WriteLock, StoreError> {
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
    pub(super) async fn commit(
        &self,
        state: &mut MachineState,
        changes: Changes,
    ) -> Result<(), StoreError> {
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

pub(super) fn stored_account(
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
                tracing::warn!(target: super::LOG_TARGET, %error, "dropping stored device keys that no longer verify")
            }
        }
    }
    Ok(devices)
}
