//! The embedded SQLite store: one file, WAL journal, every secret encrypted with the store key.
//!
//! Durability: `synchronous=NORMAL` by default — in WAL mode a committed batch survives a process
//! kill (the case on mobile), and a power loss may roll back the last few commits but never
//! corrupts the file. [`Synchronous::Full`] also survives power loss, at the cost of one fsync per
//! commit.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::cipher::StoreKey;
use crate::error::StoreError;

// One concern per file: `schema` (creation, migrations, meta values), `sealing` (encrypting values
// bound to their rows), `queries` (the reads), `transaction` (a batch's writes), `options` (the
// `testing` feature's fault settings).
mod options;
mod queries;
mod schema;
mod sealing;
mod transaction;

#[cfg(feature = "testing")]
pub use options::SqliteTestOptions;
pub use schema::SCHEMA_VERSION;
use schema::{check_key, create_schema, migrate, KEY_CHECK_PLAINTEXT};
use sealing::{result_batch_context, result_context, session_context};

/// How long a batch waits for another process's batch before failing.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
        Self::open_configured(
            path,
            key,
            synchronous,
            &options::SqliteTestOptions::default(),
        )
    }

    /// [`open`](Self::open) with settings that make the store fail as a real one does (read-only,
    /// busy, full), for tests of the failure paths (the `testing` feature).
    #[cfg(feature = "testing")]
    pub fn open_with_options(
        path: impl AsRef<Path>,
        key: StoreKey,
        synchronous: Synchronous,
        options: &SqliteTestOptions,
    ) -> Result<Self, StoreError> {
        Self::open_configured(path, key, synchronous, options)
    }

    fn open_configured(
        path: impl AsRef<Path>,
        key: StoreKey,
        synchronous: Synchronous,
        options: &options::SqliteTestOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let connection = if options.read_only {
            Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
        } else {
            Connection::open(&path)
        }
        .map_err(describe_open_error)?;
        connection.busy_timeout(
            options
                .busy_timeout
                .unwrap_or(options::DEFAULT_BUSY_TIMEOUT),
        )?;
        if let Some(pages) = options.max_page_count {
            connection.pragma_update(None, "max_page_count", pages)?;
        }
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
