//! The schema-5 step that binds every stored value to its row (issue 16): values sealed under the
//! version-4 contexts are opened and sealed again under row contexts (`sealing.rs`), each batch of
//! results carries its results' batch and index inside the sealed value, pending results still
//! sealed one by one (version 3) move into batch values, and the device keys and outgoing
//! requests that version 4 kept as plain JSON are sealed. It runs inside the migration's
//! transaction: all of it commits, or the version-4 store is left exactly as it was.
//!
//! A session, device or request that no longer opened under version 4 is dropped with a warning,
//! as reading it would have dropped it; an account or result that does not open fails the
//! migration with `Corrupted`, as reading it would have failed.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};
use zeroize::Zeroizing;

use super::sealing::{
    account_context, device_context, request_context, result_batch_context, session_context,
    DeviceTable,
};
use crate::error::StoreError;
use crate::store::cipher::StoreKey;
use crate::store::result_batch::{self, FramedResult};

const LOG_TARGET: &str = "to_device_crypto::store";

/// The associated data version 4 sealed each value with.
mod v4_context {
    pub(super) const ACCOUNT: &[u8] = b"account";

    pub(super) fn session(sender_key: &str, session_id: &str) -> String {
        format!("session:{sender_key}:{session_id}")
    }

    pub(super) fn result(id: &str) -> String {
        format!("result:{id}")
    }

    pub(super) fn result_batch(batch: i64) -> String {
        format!("result_batch:{batch}")
    }
}

fn corrupted(what: &'static str) -> StoreError {
    StoreError::Corrupted {
        what,
        detail: "a version-4 value does not open with the store key; the store was left at \
                 version 4"
            .to_owned(),
    }
}

fn open(
    key: &StoreKey,
    data: &[u8],
    context: &[u8],
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    key.decrypt(data, context).ok_or_else(|| corrupted(what))
}

/// The whole step, in the caller's transaction.
pub(super) fn seal_every_row(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    reseal_account(connection, key)?;
    reseal_sessions(connection, key)?;
    seal_devices(connection, key)?;
    seal_outgoing_requests(connection, key)?;
    reseal_result_batches(connection, key)?;
    move_single_results_into_batches(connection, key)?;
    Ok(())
}

fn reseal_account(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let rows: Vec<(String, String, Vec<u8>, bool)> = connection
        .prepare("SELECT user_id, device_id, pickle, device_keys_published FROM account")?
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    for (user_id, device_id, pickle, published) in rows {
        let plaintext = open(key, &pickle, v4_context::ACCOUNT, "account pickle")?;
        let sealed = key.encrypt(
            &plaintext,
            &account_context(&user_id, &device_id, published),
        )?;
        connection.execute(
            "UPDATE account SET pickle = ?1 WHERE id = 0",
            params![sealed],
        )?;
    }
    Ok(())
}

fn reseal_sessions(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let rows: Vec<(i64, String, String, Vec<u8>, i64)> = connection
        .prepare("SELECT id, sender_key, session_id, pickle, last_used FROM sessions")?
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    for (id, sender_key, session_id, pickle, last_used) in rows {
        let context = v4_context::session(&sender_key, &session_id);
        match key.decrypt(&pickle, context.as_bytes()) {
            Some(plaintext) => {
                let sealed = key.encrypt(
                    &plaintext,
                    &session_context(&sender_key, &session_id, last_used),
                )?;
                connection.execute(
                    "UPDATE sessions SET pickle = ?1 WHERE id = ?2",
                    params![sealed, id],
                )?;
            }
            None => {
                tracing::warn!(target: LOG_TARGET, "migration: dropping a session pickle that does not open");
                connection.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
            }
        }
    }
    Ok(())
}

/// `devices` moves to sealed rows (a rowid table: a sealed device is ~800 bytes), and
/// `recovery_devices` is created with the same shape.
fn seal_devices(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let create = |table: &str| {
        format!(
            "CREATE TABLE {table} (
                 id INTEGER PRIMARY KEY,
                 user_id TEXT NOT NULL,
                 device_id TEXT NOT NULL,
                 data BLOB NOT NULL,
                 UNIQUE (user_id, device_id));"
        )
    };
    connection.execute_batch(&create("devices_v5"))?;
    let rows: Vec<(String, String, String)> = connection
        .prepare("SELECT user_id, device_id, json FROM devices")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (user_id, device_id, json) in rows {
        let sealed = key.encrypt(
            json.as_bytes(),
            &device_context(DeviceTable::KeysQuery, &user_id, &device_id),
        )?;
        connection.execute(
            "INSERT INTO devices_v5 (user_id, device_id, data) VALUES (?1, ?2, ?3)",
            params![user_id, device_id, sealed],
        )?;
    }
    connection.execute_batch("DROP TABLE devices; ALTER TABLE devices_v5 RENAME TO devices;")?;
    connection.execute_batch(&create("recovery_devices"))?;
    Ok(())
}

fn seal_outgoing_requests(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    connection.execute_batch(
        "CREATE TABLE outgoing_requests_v5 (
             request_id TEXT PRIMARY KEY NOT NULL,
             data BLOB NOT NULL,
             created_at INTEGER NOT NULL);",
    )?;
    let rows: Vec<(String, String, i64)> = connection
        .prepare(
            "SELECT request_id, json, created_at FROM outgoing_requests ORDER BY created_at, rowid",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    // Inserted in listing order, so that the rowid keeps breaking ties in `created_at`.
    for (request_id, json, created_at) in rows {
        let sealed = key.encrypt(json.as_bytes(), &request_context(&request_id, created_at))?;
        connection.execute(
            "INSERT INTO outgoing_requests_v5 (request_id, data, created_at) VALUES (?1, ?2, ?3)",
            params![request_id, sealed, created_at],
        )?;
    }
    connection.execute_batch(
        "DROP TABLE outgoing_requests;
         ALTER TABLE outgoing_requests_v5 RENAME TO outgoing_requests;",
    )?;
    Ok(())
}

fn reseal_result_batches(connection: &Connection, key: &StoreKey) -> Result<(), StoreError> {
    let rows: Vec<(i64, i64, Vec<u8>)> = connection
        .prepare("SELECT id, batch, data FROM result_batches")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (row_id, batch, data) in rows {
        let context = v4_context::result_batch(batch);
        let framed = open(key, &data, context.as_bytes(), "decrypted results")?;
        let batch_number = u64::try_from(batch).unwrap_or_default();
        let results = result_batch::decode_v4(&framed, batch_number)?;
        let reframed = Zeroizing::new(result_batch::encode(results));
        let sealed = key.encrypt(&reframed, &result_batch_context(row_id, batch))?;
        connection.execute(
            "UPDATE result_batches SET data = ?1 WHERE id = ?2",
            params![sealed, row_id],
        )?;
    }
    Ok(())
}

/// Version 3 sealed each pending result on its own `pending_results` row; schema 5 keeps every
/// result in a batch value (where its position is sealed too), so those rows move into one new
/// value per batch and the `data` column goes.
fn move_single_results_into_batches(
    connection: &Connection,
    key: &StoreKey,
) -> Result<(), StoreError> {
    let rows: Vec<(String, i64, i64, Vec<u8>)> = connection
        .prepare(
            "SELECT id, batch, idx, data FROM pending_results
             WHERE length(data) > 0 ORDER BY batch, idx",
        )?
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut by_batch: BTreeMap<i64, Vec<(String, i64, String)>> = BTreeMap::new();
    for (id, batch, index, data) in rows {
        let context = v4_context::result(&id);
        let mut json = open(key, &data, context.as_bytes(), "decrypted result")?;
        let json =
            String::from_utf8(std::mem::take(&mut *json)).map_err(|e| StoreError::Corrupted {
                what: "decrypted result",
                detail: e.to_string(),
            })?;
        by_batch.entry(batch).or_default().push((id, index, json));
    }
    for (batch, results) in by_batch {
        connection.execute(
            "INSERT INTO result_batches (batch, remaining, data) VALUES (?1, ?2, x'')",
            params![batch, i64::try_from(results.len()).unwrap_or(i64::MAX)],
        )?;
        let row_id = connection.last_insert_rowid();
        let framed = Zeroizing::new(result_batch::encode(results.iter().map(
            |(id, index, json)| FramedResult {
                id,
                batch: u64::try_from(batch).unwrap_or_default(),
                index: u64::try_from(*index).unwrap_or_default(),
                json,
            },
        )));
        let sealed = key.encrypt(&framed, &result_batch_context(row_id, batch))?;
        connection.execute(
            "UPDATE result_batches SET data = ?1 WHERE id = ?2",
            params![sealed, row_id],
        )?;
        let mut point =
            connection.prepare("UPDATE pending_results SET result_batch = ?1 WHERE id = ?2")?;
        for (id, _, mut json) in results {
            point.execute(params![row_id, id])?;
            zeroize::Zeroize::zeroize(&mut json);
        }
    }
    connection.execute_batch("ALTER TABLE pending_results DROP COLUMN data;")?;
    Ok(())
}
