//! The schema: creating a new store (with its key check, and its salt for a passphrase store),
//! the migration history from version 1, and the `meta` table's values.
//!
//! Creation and migrations run in one `BEGIN IMMEDIATE` transaction that reads `user_version`
//! itself: of several processes opening a new or older store at once, one creates or migrates it
//! and the others, waiting on the write lock, then find it done (reading the version before the
//! transaction let two of them create the same tables: "table meta already exists").

use rusqlite::{params, Connection, OptionalExtension};

use super::migrate_v5;
use crate::error::StoreError;
use crate::store::cipher::StoreKey;

/// The schema version this build writes. Version 1 had no outbox; version 2 kept session pickles
/// in a `WITHOUT ROWID` table; version 3 sealed every pending result on its own row; version 4
/// sealed a batch's results together but bound them only to their batch number, kept device
/// keys and outgoing requests as plain JSON, and had no analytics outbox. [`migrate`] upgrades
/// them all.
pub const SCHEMA_VERSION: i64 = 5;

/// Schema 5, analytics outbox (issue 15): the PostHog payloads a batch decided to report,
/// committed with the batch's failure marks and removed once delivered. `id` is the
/// `AnalyticsPayloadId` (batch << 32 | index); `name` the payload's failure name, in the clear (the
/// payload holds nothing else, so nothing secret); `owner`/`lease_until` the claim of the machine
/// instance delivering it (NULL/0 when unclaimed); `attempts` the failed deliveries so far.
const SCHEMA_5_ANALYTICS_OUTBOX: &str = "
             CREATE TABLE analytics_outbox (
                 id INTEGER PRIMARY KEY,
                 name TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 owner BLOB,
                 lease_until INTEGER NOT NULL DEFAULT 0,
                 attempts INTEGER NOT NULL DEFAULT 0);";

/// Schema 5, replay keys (issue 19): the keys of decrypted messages
/// ([`MessageHash::replay_key`](crate::store::MessageHash::replay_key)), which replace the
/// whole-message hashes of `message_hashes`. That table stays, read-only: its hashes are never
/// pruned and still catch replays of messages decrypted before the migration (looked up only
/// where such a replay is possible: a pre-key message, or a message that failed to decrypt).
/// Keys start with their chain and chain index, so a batch's keys land on a few pages.
const SCHEMA_5_REPLAY_KEYS: &str =
    "CREATE TABLE replay_keys (key BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;";

pub(super) const KEY_CHECK_PLAINTEXT: &[u8] = b"to-device-crypto store key check";
pub(super) const KEY_CHECK_CONTEXT: &[u8] = b"key_check";

/// What a new store needs besides its tables.
pub(super) struct NewStore<'a> {
    pub key: &'a StoreKey,
    /// The PBKDF2 salt of a passphrase store, written in the same transaction as the tables.
    pub kdf_salt: Option<&'a [u8]>,
}

pub(super) fn user_version(connection: &Connection) -> Result<i64, StoreError> {
    Ok(connection.query_row("PRAGMA user_version", [], |row| row.get(0))?)
}

pub(super) fn check_key(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
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
    match key.decrypt(&check, KEY_CHECK_CONTEXT) {
        Some(plaintext) if plaintext.as_slice() == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => Err(StoreError::WrongStoreKey),
    }
}

/// Runs `work` in a `BEGIN IMMEDIATE` transaction (waiting for another writer up to the busy
/// timeout), committing on success and rolling back on any error.
pub(super) fn immediate<T>(
    connection: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    match work(connection) {
        Ok(value) => match connection.execute_batch("COMMIT") {
            Ok(()) => Ok(value),
            Err(error) => {
                let _ = connection.execute_batch("ROLLBACK");
                Err(error.into())
            }
        },
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

/// Makes the store current for `key`: creates it when empty, checks the key, migrates an older
/// schema. A current store with the right key is checked without taking the write lock; anything
/// else is decided again inside one `BEGIN IMMEDIATE` transaction. A store from a newer version
/// or a wrong key fails before anything is written.
pub(super) fn prepare(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let version = user_version(connection)?;
    check_version(version)?;
    if version == SCHEMA_VERSION {
        return check_key(connection, key);
    }
    immediate(connection, |connection| {
        let version = user_version(connection)?;
        check_version(version)?;
        if version == 0 {
            create(
                connection,
                &NewStore {
                    key,
                    kdf_salt: None,
                },
            )
        } else {
            check_key(connection, key)?;
            migrate(connection, version, key)
        }
    })
}

pub(super) fn check_version(version: i64) -> Result<(), StoreError> {
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Creates a new store inside the caller's transaction: the version-1 tables and key check, then
/// every migration, so that the migrations run on every new store too.
pub(super) fn create(connection: &Connection, new: &NewStore<'_>) -> Result<(), StoreError> {
    let check = new.key.encrypt(KEY_CHECK_PLAINTEXT, KEY_CHECK_CONTEXT)?;
    connection.execute_batch(
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
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
             attempted_at INTEGER NOT NULL) WITHOUT ROWID;
         PRAGMA user_version = 1;",
    )?;
    connection.execute(
        "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
        params![check],
    )?;
    if let Some(salt) = new.kdf_salt {
        connection.execute(
            "INSERT INTO meta (key, value) VALUES ('kdf_salt', ?1)",
            params![salt],
        )?;
    }
    migrate(connection, 1, new.key)
}

/// Upgrades a schema of `version` in place, inside the caller's transaction (all steps commit
/// together or not at all).
fn migrate(connection: &Connection, version: i64, key: &StoreKey) -> Result<(), StoreError> {
    if version < 2 {
        connection.execute_batch(
            "CREATE TABLE pending_results (
                 id TEXT PRIMARY KEY NOT NULL,
                 batch INTEGER NOT NULL,
                 idx INTEGER NOT NULL,
                 data BLOB NOT NULL);
             CREATE INDEX pending_results_order ON pending_results (batch, idx);
             PRAGMA user_version = 2;",
        )?;
    }
    if version < 3 {
        // Pickles are ~3.5 KB: SQLite advises rowid tables for rows that large, since a
        // WITHOUT ROWID b-tree holds only a few of them per page and grows deep.
        connection.execute_batch(
            "CREATE TABLE sessions_v3 (
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
             PRAGMA user_version = 3;",
        )?;
    }
    if version < 4 {
        // A batch's results are sealed together in one `result_batches` row (see
        // store/result_batch.rs); `pending_results` keeps one small row per result for lookups by
        // id and order, pointing at it. Rows written before keep their own sealed `data` (until
        // version 5 moves them into batches too).
        connection.execute_batch(
            "CREATE TABLE result_batches (
                 id INTEGER PRIMARY KEY,
                 batch INTEGER NOT NULL,
                 remaining INTEGER NOT NULL,
                 data BLOB NOT NULL);
             ALTER TABLE pending_results ADD COLUMN result_batch INTEGER;
             PRAGMA user_version = 4;",
        )?;
    }
    if version < 5 {
        // Issue 16, store integrity: every sealed value bound to its row, results' order sealed
        // with them, device keys and outgoing requests sealed, the devices known only from
        // `sender_device_keys` kept for recovery. (Other schema-5 changes go in this step too,
        // as separate statements: users see one migration.)
        migrate_v5::seal_every_row(connection, key)?;
        // Issue 15, the analytics outbox: a new table.
        connection.execute_batch(SCHEMA_5_ANALYTICS_OUTBOX)?;
        // Issue 19, replay keys instead of whole-message hashes: a new table.
        connection.execute_batch(SCHEMA_5_REPLAY_KEYS)?;
        connection.execute_batch("PRAGMA user_version = 5;")?;
    }
    Ok(())
}

pub(super) fn meta_text(connection: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    let value: Option<Vec<u8>> = connection
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |row| row.get(0))
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

pub(super) fn meta_number(connection: &Connection, key: &str) -> Result<u64, StoreError> {
    Ok(meta_text(connection, key)?
        .and_then(|text| text.parse().ok())
        .unwrap_or_default())
}
