//! The embedded SQLite store: one file, WAL journal, every secret encrypted with the store key.
//!
//! Durability: `synchronous=NORMAL` by default — in WAL mode a committed batch survives a process
//! kill (the case on mobile), and a power loss may roll back the last few commits but never
//! corrupts the file. [`Synchronous::Full`] also survives power loss, at the cost of one fsync per
//! commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::cipher::StoreKey;
use crate::error::StoreError;

// One concern per file: `schema` (creation, migrations, meta values), `migrate_v5` (the schema-5
// step that seals every row), `sealing` (encrypting values bound to their rows), `queries` (the
// reads), `transaction` (a batch's writes), `rekey` (re-encrypting everything), `analytics` (the
// analytics outbox's own claims, removals and releases), `multi_row` (statements of many rows),
// `options` (the `testing` feature's fault settings).
mod analytics;
mod migrate_v5;
mod multi_row;
mod options;
mod queries;
mod rekey;
mod schema;
mod sealing;
mod transaction;

#[cfg(feature = "testing")]
pub use options::SqliteTestOptions;
pub use schema::SCHEMA_VERSION;
use schema::{check_version, immediate, prepare, user_version, NewStore};

/// How long a batch waits for another process's batch before failing.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many prepared statements the connection keeps. A batch's commit and reads use about 30
/// distinct statements (`transaction.rs`, `queries.rs`, `analytics.rs`); rusqlite's default of 16
/// evicted each of them before its next use, so every batch prepared all of them again.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// How long opening waits for another process that is creating or migrating the store.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// SQLite's `synchronous` setting for the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process kill; a power loss may lose the last commits. The default.
    #[default]
    Normal,
    /// Also survives power loss: fsync on every commit.
    Full,
}

/// A [`CryptoStore`](crate::CryptoStore) in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    connection: Mutex<Connection>,
    /// The one copy of the store key (zeroized on drop), lent by reference to every seal and
    /// open; replaced only by [`rekey`](Self::rekey).
    key: RwLock<StoreKey>,
    path: PathBuf,
    /// Whether `message_hashes` (the version-4 replay hashes, never written since schema 5)
    /// holds anything: read once at open, cleared by a wipe. No process adds to that table, so
    /// it can only go from true to false.
    legacy_message_hashes: AtomicBool,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, encrypted with `key`.
    ///
    /// A wrong key fails with [`StoreError::WrongStoreKey`] before anything is written; a store
    /// written by a newer version fails with [`StoreError::NewerSchema`]. Several processes may
    /// open a new store at once: one creates it, the others wait for it and open it.
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
        let connection = connect_with(&path, synchronous, options)?;
        prepare(&connection, &key).map_err(describe_store_error)?;
        Ok(Self::from_parts(connection, key, path))
    }

    /// Opens (or creates) the store at `path` with a key derived from `passphrase`
    /// ([`StoreKey::from_passphrase`]); the random salt is kept in the store, unencrypted. A new
    /// store gets its salt in the same transaction as its tables, so concurrent first opens agree
    /// on one salt (and [`wipe`](Self::wipe) keeps it). A store made with a raw key, or one
    /// whose salt was lost (a wipe by version 0.1), fails with [`StoreError::WrongStoreKey`].
    pub fn open_with_passphrase(
        path: impl AsRef<Path>,
        passphrase: &str,
        synchronous: Synchronous,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let connection = connect(&path, synchronous)?;
        let key = match read_salt(&connection).map_err(describe_store_error)? {
            Some(salt) => StoreKey::from_passphrase(passphrase, &salt),
            None => {
                // No salt yet: decide under the write lock, so that of several first openers
                // one makes the salt and the others use it.
                let created = immediate(&connection, |connection| {
                    let version = user_version(connection)?;
                    check_version(version)?;
                    if let Some(salt) = read_salt(connection)? {
                        return Ok(FirstOpen::SaltMadeByAnother(salt));
                    }
                    if version != 0 {
                        // A store without a salt was made with a raw key.
                        return Err(StoreError::WrongStoreKey);
                    }
                    let salt = new_salt()?;
                    let key = StoreKey::from_passphrase(passphrase, &salt);
                    schema::create(
                        connection,
                        &NewStore {
                            key: &key,
                            kdf_salt: Some(&salt),
                        },
                    )?;
                    Ok(FirstOpen::Created(key))
                })
                .map_err(describe_store_error)?;
                match created {
                    FirstOpen::Created(key) => return Ok(Self::from_parts(connection, key, path)),
                    FirstOpen::SaltMadeByAnother(salt) => {
                        StoreKey::from_passphrase(passphrase, &salt)
                    }
                }
            }
        };
        prepare(&connection, &key).map_err(describe_store_error)?;
        Ok(Self::from_parts(connection, key, path))
    }

    fn from_parts(connection: Connection, key: StoreKey, path: PathBuf) -> Self {
        // If the question fails, the old hashes are assumed present: looking them up costs time,
        // missing one would let a replay through.
        let legacy_message_hashes = connection
            .query_row("SELECT EXISTS (SELECT 1 FROM message_hashes)", [], |row| {
                row.get(0)
            })
            .unwrap_or(true);
        Self {
            connection: Mutex::new(connection),
            key: RwLock::new(key),
            path,
            legacy_message_hashes: AtomicBool::new(legacy_message_hashes),
        }
    }

    /// Whether the store still holds version-4 replay hashes.
    fn has_legacy_hashes(&self) -> bool {
        self.legacy_message_hashes.load(Ordering::Relaxed)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store key, borrowed (no copy is made).
    fn key(&self) -> RwLockReadGuard<'_, StoreKey> {
        // Only `rekey` writes, by swapping in a whole key: a poisoned lock still holds a key.
        self.key.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes everything (logout): every row is removed with SQLite's secure delete, which
    /// overwrites the freed content, and the file is compacted. The store is empty afterwards
    /// but keeps its key check, a passphrase store's salt (so that the passphrase still opens
    /// it) and its generation counter, incremented (so that a machine in another process notices
    /// the wipe instead of writing its old account back).
    pub fn wipe(&self) -> Result<(), StoreError> {
        let connection = self.lock();
        connection.pragma_update(None, "secure_delete", "ON")?;
        immediate(&connection, |connection| {
            let generation = schema::meta_number(connection, "generation")? + 1;
            connection.execute_batch(
                "DELETE FROM account; DELETE FROM sessions; DELETE FROM devices;
                 DELETE FROM recovery_devices;
                 DELETE FROM message_hashes; DELETE FROM replay_keys;
                 DELETE FROM claimed_one_time_keys;
                 DELETE FROM failure_marks; DELETE FROM outgoing_requests;
                 DELETE FROM recovery_attempts; DELETE FROM pending_results;
                 DELETE FROM result_batches; DELETE FROM analytics_outbox;
                 DELETE FROM meta WHERE key NOT IN ('key_check', 'kdf_salt');",
            )?;
            connection.execute(
                "INSERT INTO meta (key, value) VALUES ('generation', ?1)",
                params![generation.to_string().as_bytes()],
            )?;
            Ok(())
        })?;
        self.legacy_message_hashes.store(false, Ordering::Relaxed);
        connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // SQLite rolls back an unfinished transaction when its guard is dropped during a panic,
        // so a poisoned connection is still consistent.
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens the connection: busy timeout first (so that every later step waits for a process that
/// is creating or migrating the store), then WAL and the durability setting. Switching to WAL
/// writes nothing on a store that is already WAL (every store this crate made).
fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    connect_with(path, synchronous, &options::SqliteTestOptions::default())
}

/// [`connect`] with the `testing` feature's fault settings (the defaults change nothing).
fn connect_with(
    path: &Path,
    synchronous: Synchronous,
    options: &options::SqliteTestOptions,
) -> Result<Connection, StoreError> {
    let connection = if options.read_only {
        Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    } else {
        Connection::open(path)
    }
    .map_err(describe_open_error)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    let busy_timeout = options.busy_timeout.unwrap_or(BUSY_TIMEOUT);
    connection.busy_timeout(busy_timeout)?;
    if let Some(pages) = options.max_page_count {
        connection.pragma_update(None, "max_page_count", pages)?;
    }
    // A new file starts in rollback-journal mode, where SQLite answers a lock conflict that could
    // deadlock with an immediate SQLITE_BUSY instead of calling the busy handler: several first
    // opens switching the same new file to WAL at once then fail at random. Retried here, within
    // the same bound as the busy handler.
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        match connection.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => break,
            Err(error)
                if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(error) => return Err(describe_open_error(error)),
        }
    }
    connection.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        },
    )?;
    Ok(connection)
}

/// What the first open of a passphrase store found under the write lock.
enum FirstOpen {
    /// The store was new: it was created with this key (derived from a new salt).
    Created(StoreKey),
    /// Another opener created the salt while this one waited for the lock.
    SaltMadeByAnother(Vec<u8>),
}

/// The PBKDF2 salt of a passphrase store, if the store has one.
fn read_salt(connection: &Connection) -> Result<Option<Vec<u8>>, StoreError> {
    let has_meta = connection
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map_err(describe_open_error)?
        > 0;
    if !has_meta {
        return Ok(None);
    }
    Ok(connection
        .query_row("SELECT value FROM meta WHERE key = 'kdf_salt'", [], |row| {
            row.get::<_, Vec<u8>>(0)
        })
        .optional()?)
}

fn new_salt() -> Result<Vec<u8>, StoreError> {
    let mut salt = vec![0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    Ok(salt)
}

fn describe_store_error(error: StoreError) -> StoreError {
    match error {
        StoreError::Sqlite(error) => describe_open_error(error),
        other => other,
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
