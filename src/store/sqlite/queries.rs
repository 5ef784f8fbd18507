//! The store's [`CryptoStore`] methods: the reads, one query per question the machine asks, and
//! the cross-process write lock (a `.lock` file beside the database). A batch's writes are in
//! `transaction.rs`, rekeying in `rekey.rs`, wiping in `mod.rs`.
//!
//! A sealed value that does not open (edited, moved to another row, damaged) is refused: the
//! account and decrypted results with `StoreError::Corrupted`, since the machine cannot go on
//! without its identity and must not deliver results in an order or place it cannot vouch for.
//! A session, another device's keys or an outgoing request is dropped with a warning instead:
//! the machine goes on as if the row had been deleted (which nobody can detect anyway) — a lost
//! session is recovered like any wedged one, a lost device is learned again from `/keys/query`,
//! a lost request is queued again by the next recovery — rather than failing every batch.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::schema::{meta_number, meta_text};
use super::sealing::{
    account_context, device_context, request_context, session_context, DeviceTable, PendingRow,
};
use super::{SqliteStore, LOCK_TIMEOUT};
use crate::analytics::policy::AnalyticsOutboxStats;
use crate::error::StoreError;
use crate::olm::envelope::MessageHash;
use crate::store::cipher::StoreKey;
use crate::store::{
    AccountCreation, AnalyticsClaim, Changes, CryptoStore, StoredAccount, StoredAnalytics,
    StoredDevice, StoredRequest, StoredResult, StoredSession, WriteLock,
};

const LOG_TARGET: &str = "to_device_crypto::store";

/// How many replay hashes one lookup query checks.
const HASH_LOOKUP_CHUNK: usize = 64;

fn hash_lookup_sql(table: &str, column: &str) -> String {
    let placeholders = vec!["?"; HASH_LOOKUP_CHUNK].join(",");
    format!("SELECT {column} FROM {table} WHERE {column} IN ({placeholders})")
}

static REPLAY_KEY_LOOKUP_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_lookup_sql("replay_keys", "key"));

static LEGACY_HASH_LOOKUP_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_lookup_sql("message_hashes", "hash"));

impl SqliteStore {
    /// Which of `hashes` the lookup `sql` (from [`hash_lookup_sql`]) finds, chunk by chunk.
    fn known_hashes(
        &self,
        sql: &str,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        let mut known = HashSet::new();
        let Some(last) = hashes.last() else {
            return Ok(known);
        };
        let connection = self.lock();
        let mut statement = connection.prepare_cached(sql)?;
        for chunk in hashes.chunks(HASH_LOOKUP_CHUNK) {
            // One statement text for every chunk: a short chunk repeats its last hash.
            let parameters =
                (0..HASH_LOOKUP_CHUNK).map(|i| chunk.get(i).unwrap_or(last).0.as_slice());
            let mut rows = statement.query(rusqlite::params_from_iter(parameters))?;
            while let Some(row) = rows.next()? {
                let bytes: Vec<u8> = row.get(0)?;
                let hash =
                    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| StoreError::Corrupted {
                        what: "message hash",
                        detail: format!("a stored hash has {} bytes, not 32", bytes.len()),
                    })?;
                known.insert(MessageHash(hash));
            }
        }
        Ok(known)
    }
}

#[async_trait]
impl CryptoStore for SqliteStore {
    async fn load_account(&self) -> Result<Option<StoredAccount>, StoreError> {
        self.read_account()
    }

    async fn create_account(&self, account: StoredAccount) -> Result<AccountCreation, StoreError> {
        self.insert_account(account)
    }

    async fn load_sessions(&self, sender_key: &str) -> Result<Vec<StoredSession>, StoreError> {
        let rows: Vec<(String, Vec<u8>, i64)> = {
            let connection = self.lock();
            let mut statement = connection.prepare_cached(
                "SELECT session_id, pickle, last_used FROM sessions WHERE sender_key = ?1",
            )?;
            let rows = statement
                .query_map(params![sender_key], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            rows
        };
        let mut sessions = Vec::with_capacity(rows.len());
        for (session_id, pickle, last_used) in rows {
            let context = session_context(sender_key, &session_id, last_used);
            match self.open_sealed(&pickle, &context, "session pickle") {
                Ok(pickle) => sessions.push(StoredSession {
                    pickle,
                    sender_key: sender_key.to_owned(),
                    session_id,
                    last_used: u64::try_from(last_used).unwrap_or_default(),
                }),
                Err(error) => {
                    tracing::warn!(target: LOG_TARGET, %error, "dropping an Olm session whose stored row does not open; the sender's next message will start recovery");
                }
            }
        }
        Ok(sessions)
    }

    async fn load_devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        self.read_devices(DeviceTable::KeysQuery)
    }

    async fn load_recovery_devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        self.read_devices(DeviceTable::Recovery)
    }

    async fn known_message_hashes(
        &self,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        self.known_hashes(&REPLAY_KEY_LOOKUP_SQL, hashes)
    }

    fn has_legacy_message_hashes(&self) -> bool {
        self.has_legacy_hashes()
    }

    async fn known_legacy_message_hashes(
        &self,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        if !self.has_legacy_hashes() {
            return Ok(HashSet::new());
        }
        self.known_hashes(&LEGACY_HASH_LOOKUP_SQL, hashes)
    }

    async fn is_one_time_key_claimed(&self, key: &str) -> Result<bool, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT 1 FROM claimed_one_time_keys WHERE key = ?1")?;
        Ok(statement.exists(params![key])?)
    }

    async fn contains_failure_mark(&self, mark: &MessageHash) -> Result<bool, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT 1 FROM failure_marks WHERE mark = ?1")?;
        Ok(statement.exists(params![&mark.0[..]])?)
    }

    async fn load_policy_state(&self) -> Result<Option<String>, StoreError> {
        let value: Option<Vec<u8>> = self
            .lock()
            .query_row(
                "SELECT value FROM meta WHERE key = 'policy_state'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        value
            .map(|v| {
                String::from_utf8(v).map_err(|e| StoreError::Corrupted {
                    what: "reporting policy state",
                    detail: e.to_string(),
                })
            })
            .transpose()
    }

    async fn load_outgoing_requests(&self) -> Result<Vec<StoredRequest>, StoreError> {
        let rows: Vec<(String, Vec<u8>, i64)> = {
            let connection = self.lock();
            let mut statement = connection.prepare_cached(
                "SELECT request_id, data, created_at FROM outgoing_requests ORDER BY created_at, rowid",
            )?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<_, _>>()?;
            rows
        };
        let mut requests = Vec::with_capacity(rows.len());
        for (request_id, data, created_at) in rows {
            let context = request_context(&request_id, created_at);
            match self.open_sealed(&data, &context, "outgoing request") {
                Ok(json) => requests.push(StoredRequest {
                    request_id,
                    json,
                    created_at: u64::try_from(created_at).unwrap_or_default(),
                }),
                Err(error) => {
                    tracing::warn!(target: LOG_TARGET, %error, "dropping an outgoing request whose stored row does not open");
                }
            }
        }
        Ok(requests)
    }

    async fn last_recovery_attempt(&self, sender_key: &str) -> Result<Option<u64>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT attempted_at FROM recovery_attempts WHERE sender_key = ?1")?;
        let at: Option<i64> = statement
            .query_row(params![sender_key], |row| row.get(0))
            .optional()?;
        Ok(at.map(|at| u64::try_from(at).unwrap_or_default()))
    }

    async fn load_pending_results(&self) -> Result<Vec<StoredResult>, StoreError> {
        let connection = self.lock();
        let rows = connection
            .prepare_cached(
                "SELECT id, batch, idx, result_batch FROM pending_results ORDER BY batch, idx",
            )?
            .query_map([], PendingRow::read)?
            .collect::<Result<Vec<_>, _>>()?;
        self.open_results(&connection, rows)
    }

    async fn pending_results(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, StoredResult>, StoreError> {
        let connection = self.lock();
        let mut rows = Vec::new();
        let mut statement = connection.prepare_cached(
            "SELECT id, batch, idx, result_batch FROM pending_results WHERE id = ?1",
        )?;
        for id in ids {
            if let Some(row) = statement
                .query_row(params![id], PendingRow::read)
                .optional()?
            {
                rows.push(row);
            }
        }
        Ok(self
            .open_results(&connection, rows)?
            .into_iter()
            .map(|result| (result.id.clone(), result))
            .collect())
    }

    async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        meta_text(&self.lock(), "sync_token")
    }

    async fn last_batch_number(&self) -> Result<u64, StoreError> {
        meta_number(&self.lock(), "batch_number")
    }

    async fn generation(&self) -> Result<u64, StoreError> {
        meta_number(&self.lock(), "generation")
    }

    async fn lock_for_writing(&self) -> Result<WriteLock, StoreError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        let deadline = std::time::Instant::now() + LOCK_TIMEOUT;
        #[cfg(feature = "testing")]
        let mut announced_wait = false;
        // Polled rather than blocking, so that waiting never blocks the async runtime's thread.
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(WriteLock::file(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    #[cfg(feature = "testing")]
                    if !std::mem::replace(&mut announced_wait, true) {
                        crate::fail_point::lock_waiting();
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "another process held the store's write lock for over 30 s",
                    )))
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(error.into()),
            }
        }
    }

    async fn rekey(&self, new_key: StoreKey) -> Result<(), StoreError> {
        SqliteStore::rekey(self, new_key)
    }

    async fn wipe(&self) -> Result<(), StoreError> {
        SqliteStore::wipe(self)
    }

    async fn save_changes(&self, changes: Changes) -> Result<(), StoreError> {
        self.write_changes(changes)
    }

    async fn claim_analytics(
        &self,
        claim: AnalyticsClaim,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredAnalytics>, StoreError> {
        self.claim_analytics_rows(claim, now, limit)
    }

    async fn remove_analytics(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.remove_analytics_rows(ids)
    }

    async fn release_analytics(&self, owner: [u8; 16], ids: &[u64]) -> Result<u64, StoreError> {
        self.release_analytics_rows(owner, ids)
    }

    async fn analytics_outbox_stats(&self) -> Result<AnalyticsOutboxStats, StoreError> {
        self.analytics_stats()
    }
}

impl SqliteStore {
    pub(super) fn read_account(&self) -> Result<Option<StoredAccount>, StoreError> {
        let row = self
            .lock()
            .query_row(
                "SELECT user_id, device_id, pickle, device_keys_published FROM account WHERE id = 0",
                [],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(user_id, device_id, pickle, published)| {
            // Bound to the user and device: an account row edited to another device id (or
            // copied into another store's row) does not open.
            let context = account_context(&user_id, &device_id, published);
            Ok(StoredAccount {
                pickle: self.open_sealed(&pickle, &context, "account pickle")?,
                user_id,
                device_id,
                device_keys_published: published,
            })
        })
        .transpose()
    }

    fn read_devices(&self, table: DeviceTable) -> Result<Vec<StoredDevice>, StoreError> {
        let rows: Vec<(String, String, Vec<u8>)> = {
            let connection = self.lock();
            let mut statement = connection.prepare_cached(&format!(
                "SELECT user_id, device_id, data FROM {}",
                table.name()
            ))?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<_, _>>()?;
            rows
        };
        let mut devices = Vec::with_capacity(rows.len());
        for (user_id, device_id, data) in rows {
            let context = device_context(table, &user_id, &device_id);
            match self.open_sealed(&data, &context, "device keys") {
                Ok(json) => devices.push(StoredDevice {
                    user_id,
                    device_id,
                    json,
                }),
                Err(error) => {
                    tracing::warn!(target: LOG_TARGET, %error, "dropping another device's keys whose stored row does not open; /keys/query will teach them again");
                }
            }
        }
        Ok(devices)
    }
}
