//! The machine's cached state and the store: opening a machine (creating its account on first
//! use, under the cross-process write lock so that concurrent first opens agree on one identity),
//! keeping the cache in step with the store under that lock (reload, begin a write, commit),
//! re-encrypting and wiping the store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde_json::Value;
use to_device_analytics::json::to_compact_string;
use tokio::sync::Mutex;
use vodozemac::olm::{Account, AccountPickle};

use super::{corrupted, MachineState, OlmMachine};
use crate::analytics::policy::{PolicyState, ReportingPolicy};
use crate::error::{OpenError, StoreError};
use crate::olm::device_keys::{DeviceKeys, KnownDevices};
use crate::olm::plaintext::VerifiedDeviceKeysCache;
use crate::reporting::FailureReporter;
use crate::store::{
    AccountCreation, Changes, CryptoStore, MemoryStore, SqliteStore, StoreKey, StoredAccount,
    StoredDevice, Synchronous, WriteLock,
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
        // Read before the state it describes: if another process commits in between, the cache
        // looks older than the store and the first write reloads it (the other order would let
        // that write overwrite the other process's commit).
        let generation = store.generation().await?;
        let stored = match store.load_account().await? {
            Some(stored) => stored,
            None => create_or_load_account(store.as_ref(), user_id, device_id).await?,
        };
        if stored.user_id != user_id || stored.device_id != device_id {
            return Err(StoreError::AccountMismatch {
                stored_user: stored.user_id.clone(),
                stored_device: stored.device_id.clone(),
                user: user_id.to_owned(),
                device: device_id.to_owned(),
            }
            .into());
        }
        let account = unpickle_account(&stored.pickle)?;
        let device_keys_published = stored.device_keys_published;
        let devices = load_devices(store.load_devices().await?);
        let recovery_devices = load_devices(store.load_recovery_devices().await?);
        let policy_state = load_policy_state(store.as_ref()).await?;
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
                recovery_devices,
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

    /// Drops the cache after a failed commit, or after another process committed: the store is
    /// the truth again. A store whose account is gone or is another identity was wiped (by
    /// another process, possibly re-created since): this machine's identity no longer exists,
    /// and it must not write anything again.
    pub(super) async fn reload(&self, state: &mut MachineState) -> Result<(), StoreError> {
        let Some(stored) = self.store.load_account().await? else {
            state.wiped = true;
            return Err(StoreError::Wiped);
        };
        let account = unpickle_account(&stored.pickle)?;
        if stored.user_id != self.user_id
            || stored.device_id != self.device_id
            || account.identity_keys() != self.identity_keys
        {
            state.wiped = true;
            return Err(StoreError::Wiped);
        }
        state.account = account;
        state.device_keys_published = stored.device_keys_published;
        state.sessions.clear();
        state.devices = load_devices(self.store.load_devices().await?);
        state.recovery_devices = load_devices(self.store.load_recovery_devices().await?);
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
        pickle: to_compact_string(&account.pickle()).map_err(corrupted("account pickle"))?,
        device_keys_published,
    })
}

/// Creates the account on first use, under the cross-process write lock: a process that waited
/// for the lock finds the account another one created, and the store's plain insert settles any
/// remaining race (a store without a cross-process lock, e.g. threads on a `MemoryStore`).
async fn create_or_load_account(
    store: &dyn CryptoStore,
    user_id: &str,
    device_id: &str,
) -> Result<StoredAccount, StoreError> {
    let _lock = store.lock_for_writing().await?;
    if let Some(stored) = store.load_account().await? {
        return Ok(stored);
    }
    let account = stored_account(
        &crate::olm::account::new_account(),
        user_id,
        device_id,
        false,
    )?;
    match store.create_account(account.clone()).await? {
        AccountCreation::Created => Ok(account),
        AccountCreation::AlreadyExists(stored) => Ok(stored),
    }
}

/// The devices of `stored`, each verified again: the store authenticates its rows, and a row
/// that still does not verify is dropped with a warning rather than trusted.
fn load_devices(stored: Vec<StoredDevice>) -> KnownDevices {
    let mut devices = KnownDevices::default();
    for stored in stored {
        let verified = serde_json::from_str::<Value>(&stored.json)
            .map_err(|e| e.to_string())
            .and_then(|value| DeviceKeys::from_signed_json(&value).map_err(|e| e.to_string()))
            .and_then(|device| {
                if device.user_id == stored.user_id && device.device_id == stored.device_id {
                    Ok(device)
                } else {
                    Err("the keys are another device's".to_owned())
                }
            });
        match verified {
            Ok(device) => {
                devices.insert(device);
            }
            Err(error) => {
                tracing::warn!(target: super::LOG_TARGET, %error, "dropping stored device keys that no longer verify")
            }
        }
    }
    devices
}
