//! The schema: creating a new store (with its key check), the migration history from version 1,
//! and the `meta` table's values.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::StoreError;
use crate::store::cipher::StoreKey;

/// The schema version this build writes. Version 1 had no outbox; version 2 kept session pickles
/// in a `WITHOUT ROWID` table; version 3 sealed every pending result on its own row (such rows are
/// still read); version 4 had no analytics outbox; [`migrate`] upgrades them all.
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

pub(super) const KEY_CHECK_PLAINTEXT: &[u8] = b"to-device-crypto store key check";

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
    match key.decrypt(&check, b"key_check") {
        Some(plaintext) if plaintext == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => Err(StoreError::WrongStoreKey),
    }
}

pub(super) fn create_schema(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
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
pub(super) fn migrate(connection: &Connection) -> Result<(), StoreError> {
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
    if version < 5 {
        // One step for every format change of this release (users see one migration); each change
        // keeps its own statements, in its own constant, listed here.
        connection.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             {SCHEMA_5_ANALYTICS_OUTBOX}
             PRAGMA user_version = 5;
             COMMIT;"
        ))?;
    }
    Ok(())
}

pub(super) fn meta_text(connection: &Connection, key: &str) -> Result<Option<String>, StoreError> {
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

pub(super) fn meta_number(connection: &Connection, key: &str) -> Result<u64, StoreError> {
    Ok(meta_text(connection, key)?
        .and_then(|text| text.parse().ok())
        .unwrap_or_default())
}
