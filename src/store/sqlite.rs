//! The embedded SQLite store: one file, WAL journal, every secret encrypted with the store key.
//!
//! Durability: `synchronous=NORMAL` by default — in WAL mode a committed batch survives a process
//! kill (the case on mobile), and a power loss may roll back the last few commits but never
//! corrupts the file. [`Synchronous::Full`] also survives power loss, at the cost of one fsync per
//! commit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::cipher::StoreKey;
use super::result_batch::{self, FramedResult};
use super::{
    Changes, CryptoStore, StoredAccount, StoredDevice, StoredRequest, StoredResult, StoredSession,
    WriteLock,
};
use crate::error::StoreError;
use crate::olm::envelope::MessageHash;

/// The schema version this build writes. Version 1 had no outbox; version 2 kept session pickles
/// in a `WITHOUT ROWID` table; version 3 sealed every pending result on its own row (such rows are
/// still read); [`migrate`] upgrades them all.
pub const SCHEMA_VERSION: i64 = 4;

/// How long a batch waits for another process's batch before failing.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

const KEY_CHECK_PLAINTEXT: &[u8] = b"to-device-crypto store key check";

/// SQLite's `synchronous` setting for the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process kill; a power loss may lose the last commits. The default.
    #[default]
    Normal,
    /// Also survives power loss: fsync on every commit.
    Full,
}

/// A [`CryptoStore`] in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    connection: Mutex<Connection>,
    key: Mutex<StoreKey>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, encrypted with `key`.
    ///
    /// A wrong key fails with [`StoreError::WrongStoreKey`] before anything is written; a store
    /// written by a newer version fails with [`StoreError::NewerSchema`].
    pub fn open(
        path: impl AsRef<Path>,
        key: StoreKey,
        synchronous: Synchronous,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let connection = Connection::open(&path).map_err(describe_open_error)?;
        connection.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(describe_open_error)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version > 0 {
            check_key(&connection, &key)?;
        }
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(
            None,
            "synchronous",
            match synchronous {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            },
        )?;
        if version == 0 {
            create_schema(&connection, &key)?;
        }
        migrate(&connection)?;
        Ok(Self {
            connection: Mutex::new(connection),
            key: Mutex::new(key),
            path,
        })
    }

    /// Opens (or creates) the store at `path` with a key derived from `passphrase`
    /// ([`StoreKey::from_passphrase`]); the random salt is kept in the store, unencrypted.
    pub fn open_with_passphrase(
        path: impl AsRef<Path>,
        passphrase: &str,
        synchronous: Synchronous,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let stored_salt = if path.exists() {
            let connection = Connection::open(path).map_err(describe_open_error)?;
            let has_meta: bool = connection
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                    [],
                    |row| row.get::<_, i64>(0),
                )
                .map_err(describe_open_error)?
                > 0;
            if has_meta {
                connection
                    .query_row("SELECT value FROM meta WHERE key = 'kdf_salt'", [], |row| {
                        row.get::<_, Vec<u8>>(0)
                    })
                    .optional()?
            } else {
                None
            }
        } else {
            None
        };
        let salt = match &stored_salt {
            Some(salt) => salt.clone(),
            None => {
                let mut salt = vec![0u8; 16];
                getrandom::fill(&mut salt)
                    .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
                salt
            }
        };
        let store = Self::open(
            path,
            StoreKey::from_passphrase(passphrase, &salt),
            synchronous,
        )?;
        if stored_salt.is_none() {
            store.lock().execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('kdf_salt', ?1)",
                params![salt],
            )?;
        }
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current_key(&self) -> StoreKey {
        self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-encrypts every secret with `new_key` in one transaction; afterwards only `new_key`
    /// opens the store. On failure nothing changes.
    pub fn rekey(&self, new_key: StoreKey) -> Result<(), StoreError> {
        let old_key = self.current_key();
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let reseal = |data: &[u8], context: &str, what: &'static str| {
            let plaintext =
                old_key
                    .decrypt(data, context.as_bytes())
                    .ok_or(StoreError::Corrupted {
                        what,
                        detail: "the value does not decrypt with the current store key".to_owned(),
                    })?;
            new_key.encrypt(&plaintext, context.as_bytes())
        };
        let check = new_key.encrypt(KEY_CHECK_PLAINTEXT, b"key_check")?;
        transaction.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'key_check'",
            params![check],
        )?;
        let account: Option<Vec<u8>> = transaction
            .query_row("SELECT pickle FROM account WHERE id = 0", [], |row| {
                row.get(0)
            })
            .optional()?;
        if let Some(pickle) = account {
            let sealed = reseal(&pickle, "account", "account pickle")?;
            transaction.execute(
                "UPDATE account SET pickle = ?1 WHERE id = 0",
                params![sealed],
            )?;
        }
        let sessions: Vec<(String, String, Vec<u8>)> = transaction
            .prepare("SELECT sender_key, session_id, pickle FROM sessions")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (sender_key, session_id, pickle) in sessions {
            let context = session_context(&sender_key, &session_id);
            let sealed = reseal(&pickle, &context, "session pickle")?;
            transaction.execute(
                "UPDATE sessions SET pickle = ?1 WHERE sender_key = ?2 AND session_id = ?3",
                params![sealed, sender_key, session_id],
            )?;
        }
        let results: Vec<(String, Vec<u8>)> = transaction
            .prepare("SELECT id, data FROM pending_results")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, data) in results {
            if data.is_empty() {
                continue; // sealed with its batch, in result_batches
            }
            let sealed = reseal(&data, &result_context(&id), "decrypted result")?;
            transaction.execute(
                "UPDATE pending_results SET data = ?1 WHERE id = ?2",
                params![sealed, id],
            )?;
        }
        let batches: Vec<(i64, i64, Vec<u8>)> = transaction
            .prepare("SELECT id, batch, data FROM result_batches")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (batch_row, batch, data) in batches {
            let sealed = reseal(&data, &result_batch_context(batch), "decrypted results")?;
            transaction.execute(
                "UPDATE result_batches SET data = ?1 WHERE id = ?2",
                params![sealed, batch_row],
            )?;
        }
        transaction.commit()?;
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = new_key;
        Ok(())
    }

    /// Deletes everything (logout): every row is removed with SQLite's secure delete, which
    /// overwrites the freed content, and the file is compacted. The store is empty afterwards.
    pub fn wipe(&self) -> Result<(), StoreError> {
        let connection = self.lock();
        connection.pragma_update(None, "secure_delete", "ON")?;
        connection.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM account; DELETE FROM sessions; DELETE FROM devices;
             DELETE FROM message_hashes; DELETE FROM claimed_one_time_keys;
             DELETE FROM failure_marks; DELETE FROM outgoing_requests;
             DELETE FROM recovery_attempts; DELETE FROM pending_results;
             DELETE FROM result_batches;
             DELETE FROM meta WHERE key != 'key_check';
             COMMIT;",
        )?;
        connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // SQLite rolls back an unfinished transaction when its guard is dropped during a panic,
        // so a poisoned connection is still consistent.
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, StoreError> {
        self.current_key().encrypt(plaintext, context.as_bytes())
    }

    /// Opens the pending results `rows` point at: their own sealed `data` (schema 3), or their
    /// batch's sealed value (schema 4), each opened once however many rows share it.
    fn open_results(
        &self,
        connection: &Connection,
        rows: Vec<PendingRow>,
    ) -> Result<Vec<StoredResult>, StoreError> {
        let mut batches: HashMap<i64, HashMap<String, String>> = HashMap::new();
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let json = match row.result_batch {
                None => {
                    self.open_sealed(&row.data, &result_context(&row.id), "decrypted result")?
                }
                Some(batch_row) => {
                    let batch_results = match batches.entry(batch_row) {
                        Entry::Occupied(entry) => entry.into_mut(),
                        Entry::Vacant(entry) => {
                            entry.insert(self.open_result_batch(connection, batch_row)?)
                        }
                    };
                    batch_results
                        .get(&row.id)
                        .cloned()
                        .ok_or_else(|| StoreError::Corrupted {
                            what: "decrypted results",
                            detail: format!("result {} is missing from its batch", row.id),
                        })?
                }
            };
            results.push(StoredResult {
                json,
                id: row.id,
                batch: u64::try_from(row.batch).unwrap_or_default(),
                index: u64::try_from(row.index).unwrap_or_default(),
            });
        }
        Ok(results)
    }

    fn open_result_batch(
        &self,
        connection: &Connection,
        batch_row: i64,
    ) -> Result<HashMap<String, String>, StoreError> {
        let (batch, data): (i64, Vec<u8>) = connection
            .prepare_cached("SELECT batch, data FROM result_batches WHERE id = ?1")?
            .query_row(params![batch_row], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?
            .ok_or_else(|| StoreError::Corrupted {
                what: "decrypted results",
                detail: "a pending result's batch is missing".to_owned(),
            })?;
        let framed =
            self.open_sealed_bytes(&data, &result_batch_context(batch), "decrypted results")?;
        Ok(result_batch::decode(&framed)?
            .into_iter()
            .map(|result| (result.id.to_owned(), result.json.to_owned()))
            .collect())
    }

    fn open_sealed_bytes(
        &self,
        data: &[u8],
        context: &str,
        what: &'static str,
    ) -> Result<Vec<u8>, StoreError> {
        self.current_key()
            .decrypt(data, context.as_bytes())
            .ok_or_else(|| StoreError::Corrupted {
                what,
                detail: "the value does not decrypt with the store key".to_owned(),
            })
    }

    fn open_sealed(
        &self,
        data: &[u8],
        context: &str,
        what: &'static str,
    ) -> Result<String, StoreError> {
        let bytes = self.open_sealed_bytes(data, context, what)?;
        String::from_utf8(bytes).map_err(|e| StoreError::Corrupted {
            what,
            detail: e.to_string(),
        })
    }
}

fn describe_open_error(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::Corrupted {
            what: "database file",
            detail: "the file is not a SQLite database (corrupted or not a store)".to_owned(),
        },
        _ => StoreError::Sqlite(error),
    }
}

fn check_key(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let check: Option<Vec<u8>> = connection
        .query_row(
            "SELECT value FROM meta WHERE key = 'key_check'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    let check = check.ok_or_else(|| StoreError::Corrupted {
        what: "key check",
        detail: "the store has no key check value".to_owned(),
    })?;
    match key.decrypt(&check, b"key_check") {
        Some(plaintext) if plaintext == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => Err(StoreError::WrongStoreKey),
    }
}

fn create_schema(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let check = key.encrypt(KEY_CHECK_PLAINTEXT, b"key_check")?;
    connection.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
         CREATE TABLE account (
             id INTEGER PRIMARY KEY CHECK (id = 0),
             user_id TEXT NOT NULL,
             device_id TEXT NOT NULL,
             pickle BLOB NOT NULL,
             device_keys_published INTEGER NOT NULL);
         CREATE TABLE sessions (
             sender_key TEXT NOT NULL,
             session_id TEXT NOT NULL,
             pickle BLOB NOT NULL,
             last_used INTEGER NOT NULL,
             PRIMARY KEY (sender_key, session_id)) WITHOUT ROWID;
         CREATE TABLE devices (
             user_id TEXT NOT NULL,
             device_id TEXT NOT NULL,
             json TEXT NOT NULL,
             PRIMARY KEY (user_id, device_id)) WITHOUT ROWID;
         CREATE TABLE message_hashes (hash BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;
         CREATE TABLE claimed_one_time_keys (key TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
         CREATE TABLE failure_marks (mark BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;
         CREATE TABLE outgoing_requests (
             request_id TEXT PRIMARY KEY NOT NULL,
             json TEXT NOT NULL,
             created_at INTEGER NOT NULL);
         CREATE TABLE recovery_attempts (
             sender_key TEXT PRIMARY KEY NOT NULL,
             attempted_at INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    let result = connection
        .execute(
            "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
            params![check],
        )
        .and_then(|_| connection.pragma_update(None, "user_version", 1))
        .and_then(|_| connection.execute_batch("COMMIT"));
    if let Err(error) = result {
        let _ = connection.execute_batch("ROLLBACK");
        return Err(error.into());
    }
    Ok(())
}

/// Upgrades an older schema in place, one version per transaction; every new store goes through
/// the same steps, so the migrations are exercised on every run.
fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version < 2 {
        connection.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE pending_results (
                 id TEXT PRIMARY KEY NOT NULL,
                 batch INTEGER NOT NULL,
                 idx INTEGER NOT NULL,
                 data BLOB NOT NULL);
             CREATE INDEX pending_results_order ON pending_results (batch, idx);
             PRAGMA user_version = 2;
             COMMIT;",
        )?;
    }
    if version < 3 {
        // Pickles are ~3.5 KB: SQLite advises rowid tables for rows that large, since a
        // WITHOUT ROWID b-tree holds only a few of them per page and grows deep.
        connection.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE sessions_v3 (
                 id INTEGER PRIMARY KEY,
                 sender_key TEXT NOT NULL,
                 session_id TEXT NOT NULL,
                 pickle BLOB NOT NULL,
                 last_used INTEGER NOT NULL,
                 UNIQUE (sender_key, session_id));
             INSERT INTO sessions_v3 (sender_key, session_id, pickle, last_used)
                 SELECT sender_key, session_id, pickle, last_used FROM sessions;
             DROP TABLE sessions;
             ALTER TABLE sessions_v3 RENAME TO sessions;
             PRAGMA user_version = 3;
             COMMIT;",
        )?;
    }
    if version < 4 {
        // A batch's results are sealed together in one `result_batches` row (see
        // store/result_batch.rs); `pending_results` keeps one small row per result for lookups by
        // id and order, pointing at it. Rows written before keep their own sealed `data`.
        connection.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE result_batches (
                 id INTEGER PRIMARY KEY,
                 batch INTEGER NOT NULL,
                 remaining INTEGER NOT NULL,
                 data BLOB NOT NULL);
             ALTER TABLE pending_results ADD COLUMN result_batch INTEGER;
             PRAGMA user_version = 4;
             COMMIT;",
        )?;
    }
    Ok(())
}

fn meta_text(connection: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    let value: Option<Vec<u8>> = connection
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![key],
            |row| row.get(0),
        )
        .optional()?;
    value
        .map(|v| {
            String::from_utf8(v).map_err(|e| StoreError::Corrupted {
                what: "meta value",
                detail: e.to_string(),
            })
        })
        .transpose()
}

fn meta_number(connection: &Connection, key: &str) -> Result<u64, StoreError> {
    Ok(meta_text(connection, key)?
        .and_then(|text| text.parse().ok())
        .unwrap_or_default())
}

/// How many replay hashes one lookup query checks.
const HASH_LOOKUP_CHUNK: usize = 64;

static HASH_LOOKUP_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let placeholders = vec!["?"; HASH_LOOKUP_CHUNK].join(",");
    format!("SELECT hash FROM message_hashes WHERE hash IN ({placeholders})")
});

fn result_context(id: &str) -> String {
    format!("result:{id}")
}

/// How many decrypted results one `result_batches` row holds at most.
const RESULTS_PER_SEAL: usize = 256;

/// A `pending_results` row.
struct PendingRow {
    id: String,
    batch: i64,
    index: i64,
    /// The result sealed on its own (schema 3 rows); empty when `result_batch` is set.
    data: Vec<u8>,
    /// The `result_batches` row holding the result (schema 4).
    result_batch: Option<i64>,
}

impl PendingRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            batch: row.get(1)?,
            index: row.get(2)?,
            data: row.get(3)?,
            result_batch: row.get(4)?,
        })
    }
}

fn result_batch_context(batch: i64) -> String {
    format!("result_batch:{batch}")
}

fn session_context(sender_key: &str, session_id: &str) -> String {
    format!("session:{sender_key}:{session_id}")
}

#[async_trait]
impl CryptoStore for SqliteStore {
    async fn load_account(&self) -> Result<Option<StoredAccount>, StoreError> {
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
            Ok(StoredAccount {
                pickle: self.open_sealed(&pickle, "account", "account pickle")?,
                user_id,
                device_id,
                device_keys_published: published,
            })
        })
        .transpose()
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
        rows.into_iter()
            .map(|(session_id, pickle, last_used)| {
                Ok(StoredSession {
                    pickle: self.open_sealed(
                        &pickle,
                        &session_context(sender_key, &session_id),
                        "session pickle",
                    )?,
                    sender_key: sender_key.to_owned(),
                    session_id,
                    last_used: u64::try_from(last_used).unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn load_devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT user_id, device_id, json FROM devices")?;
        let devices = statement
            .query_map([], |row| {
                Ok(StoredDevice {
                    user_id: row.get(0)?,
                    device_id: row.get(1)?,
                    json: row.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(devices)
    }

    async fn known_message_hashes(
        &self,
        hashes: &[MessageHash],
    ) -> Result<HashSet<MessageHash>, StoreError> {
        let mut known = HashSet::new();
        let Some(last) = hashes.last() else {
            return Ok(known);
        };
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&HASH_LOOKUP_SQL)?;
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
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT request_id, json, created_at FROM outgoing_requests ORDER BY created_at, rowid",
        )?;
        let requests = statement
            .query_map([], |row| {
                Ok(StoredRequest {
                    request_id: row.get(0)?,
                    json: row.get(1)?,
                    created_at: u64::try_from(row.get::<_, i64>(2)?).unwrap_or_default(),
                })
            })?
            .collect::<Result<_, _>>()?;
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
                "SELECT id, batch, idx, data, result_batch FROM pending_results ORDER BY batch, idx",
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
            "SELECT id, batch, idx, data, result_batch FROM pending_results WHERE id = ?1",
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
        // Polled rather than blocking, so that waiting never blocks the async runtime's thread.
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(WriteLock::file(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
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
        if changes.is_empty() {
            return Ok(());
        }
        // Encrypt before taking the lock: the connection is held only for the SQL itself.
        let account = changes
            .account
            .as_ref()
            .map(|account| {
                self.seal(account.pickle.as_bytes(), "account")
                    .map(|p| (account, p))
            })
            .transpose()?;
        let sessions = changes
            .sessions
            .iter()
            .map(|s| {
                self.seal(
                    s.pickle.as_bytes(),
                    &session_context(&s.sender_key, &s.session_id),
                )
                .map(|p| (s, p))
            })
            .collect::<Result<Vec<_>, _>>()?;

        // One sealed value per batch for its results (the AEAD's cost per call rivals sealing a
        // result's bytes), split every RESULTS_PER_SEAL results so that a huge batch never needs
        // several copies of all its results at once.
        let mut by_batch: BTreeMap<u64, Vec<&StoredResult>> = BTreeMap::new();
        for result in &changes.pending_results {
            by_batch.entry(result.batch).or_default().push(result);
        }
        let result_batches = by_batch
            .iter()
            .flat_map(|(&batch, results)| {
                results
                    .chunks(RESULTS_PER_SEAL)
                    .map(move |results| (batch, results))
            })
            .map(|(batch, results)| {
                let batch = i64::try_from(batch).unwrap_or(i64::MAX);
                let framed = result_batch::encode(results.iter().map(|r| FramedResult {
                    id: &r.id,
                    index: r.index,
                    json: &r.json,
                }));
                let sealed = self.seal(&framed, &result_batch_context(batch))?;
                Ok((batch, results, sealed))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;

        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        if let Some((account, pickle)) = account {
            transaction.execute(
                "INSERT OR REPLACE INTO account (id, user_id, device_id, pickle, device_keys_published)
                 VALUES (0, ?1, ?2, ?3, ?4)",
                params![account.user_id, account.device_id, pickle, account.device_keys_published],
            )?;
        }
        {
            let mut statement = transaction.prepare_cached(
                "INSERT INTO sessions (sender_key, session_id, pickle, last_used)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sender_key, session_id)
                 DO UPDATE SET pickle = excluded.pickle, last_used = excluded.last_used",
            )?;
            for (session, pickle) in &sessions {
                statement.execute(params![
                    session.sender_key,
                    session.session_id,
                    pickle,
                    i64::try_from(session.last_used).unwrap_or(i64::MAX)
                ])?;
            }
            let mut statement = transaction
                .prepare_cached("DELETE FROM sessions WHERE sender_key = ?1 AND session_id = ?2")?;
            for (sender_key, session_id) in &changes.removed_sessions {
                statement.execute(params![sender_key, session_id])?;
            }
            let mut statement = transaction
                .prepare_cached("INSERT OR IGNORE INTO message_hashes (hash) VALUES (?1)")?;
            for hash in &changes.message_hashes {
                statement.execute(params![&hash.0[..]])?;
            }
            let mut statement = transaction.prepare_cached(
                "INSERT OR REPLACE INTO devices (user_id, device_id, json) VALUES (?1, ?2, ?3)",
            )?;
            for device in &changes.devices {
                statement.execute(params![device.user_id, device.device_id, device.json])?;
            }
            let mut statement = transaction
                .prepare_cached("INSERT OR IGNORE INTO claimed_one_time_keys (key) VALUES (?1)")?;
            for key in &changes.claimed_one_time_keys {
                statement.execute(params![key])?;
            }
            let mut statement = transaction
                .prepare_cached("INSERT OR IGNORE INTO failure_marks (mark) VALUES (?1)")?;
            for mark in &changes.failure_marks {
                statement.execute(params![&mark.0[..]])?;
            }
            let mut statement = transaction
                .prepare_cached("DELETE FROM outgoing_requests WHERE request_id = ?1")?;
            for request_id in &changes.sent_requests {
                statement.execute(params![request_id])?;
            }
            let mut statement = transaction.prepare_cached(
                "INSERT OR REPLACE INTO outgoing_requests (request_id, json, created_at) VALUES (?1, ?2, ?3)",
            )?;
            for request in &changes.outgoing_requests {
                statement.execute(params![
                    request.request_id,
                    request.json,
                    i64::try_from(request.created_at).unwrap_or(i64::MAX)
                ])?;
            }
            let mut statement = transaction.prepare_cached(
                "INSERT OR REPLACE INTO recovery_attempts (sender_key, attempted_at) VALUES (?1, ?2)",
            )?;
            for (sender_key, at) in &changes.recovery_attempts {
                statement.execute(params![sender_key, i64::try_from(*at).unwrap_or(i64::MAX)])?;
            }
            for (batch, results, sealed) in &result_batches {
                transaction
                    .prepare_cached(
                        "INSERT INTO result_batches (batch, remaining, data) VALUES (?1, 0, ?2)",
                    )?
                    .execute(params![batch, sealed])?;
                let batch_row = transaction.last_insert_rowid();
                // A result id already pending keeps its row (the same message gives the same
                // result): `remaining` counts only the rows that point here.
                let mut statement = transaction.prepare_cached(
                    "INSERT OR IGNORE INTO pending_results (id, batch, idx, data, result_batch)
                     VALUES (?1, ?2, ?3, x'', ?4)",
                )?;
                let mut remaining = 0;
                for result in results.iter() {
                    remaining += statement.execute(params![
                        result.id,
                        batch,
                        i64::try_from(result.index).unwrap_or(i64::MAX),
                        batch_row
                    ])?;
                }
                if remaining == 0 {
                    transaction
                        .prepare_cached("DELETE FROM result_batches WHERE id = ?1")?
                        .execute(params![batch_row])?;
                } else {
                    transaction
                        .prepare_cached("UPDATE result_batches SET remaining = ?1 WHERE id = ?2")?
                        .execute(params![remaining, batch_row])?;
                }
            }
            let mut acknowledged_in = BTreeMap::<i64, i64>::new();
            let mut statement = transaction.prepare_cached(
                "DELETE FROM pending_results WHERE id = ?1 RETURNING result_batch",
            )?;
            for id in &changes.acknowledged {
                let deleted: Option<Option<i64>> = statement
                    .query_row(params![id], |row| row.get(0))
                    .optional()?;
                if let Some(Some(batch_row)) = deleted {
                    *acknowledged_in.entry(batch_row).or_default() += 1;
                }
            }
            for (batch_row, count) in acknowledged_in {
                transaction
                    .prepare_cached(
                        "UPDATE result_batches SET remaining = remaining - ?1 WHERE id = ?2",
                    )?
                    .execute(params![count, batch_row])?;
                transaction
                    .prepare_cached("DELETE FROM result_batches WHERE id = ?1 AND remaining <= 0")?
                    .execute(params![batch_row])?;
            }
            let mut statement = transaction
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
            if let Some(token) = &changes.sync_token {
                statement.execute(params!["sync_token", token.as_bytes()])?;
            }
            if let Some(batch_number) = changes.batch_number {
                statement.execute(params!["batch_number", batch_number.to_string().as_bytes()])?;
            }
            let generation = meta_number(&transaction, "generation")? + 1;
            statement.execute(params!["generation", generation.to_string().as_bytes()])?;
            if let Some(policy_state) = &changes.policy_state {
                transaction.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('policy_state', ?1)",
                    params![policy_state.as_bytes()],
                )?;
            }
        }
        transaction.commit()?;
        Ok(())
    }
}
