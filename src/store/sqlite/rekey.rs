//! Key rotation: every sealed value opened with the current key and sealed again with the new one
//! under the same row context, in one transaction.

use rusqlite::{params, Connection};

use super::schema::{immediate, KEY_CHECK_CONTEXT, KEY_CHECK_PLAINTEXT};
use super::sealing::{
    account_context, device_context, request_context, result_batch_context, session_context,
    DeviceTable,
};
use super::SqliteStore;
use crate::error::StoreError;
use crate::store::cipher::StoreKey;

/// One table's sealed column: how to list its rows (row id, the row's context, the value) and
/// how to write a value back by row id.
struct SealedColumn {
    what: &'static str,
    select: &'static str,
    update: &'static str,
    context: fn(&rusqlite::Row<'_>) -> rusqlite::Result<Vec<u8>>,
}

const SEALED_COLUMNS: [SealedColumn; 5] = [
    SealedColumn {
        what: "account pickle",
        select: "SELECT id, pickle, user_id, device_id, device_keys_published FROM account",
        update: "UPDATE account SET pickle = ?1 WHERE id = ?2",
        context: |row| {
            Ok(account_context(
                &row.get::<_, String>(2)?,
                &row.get::<_, String>(3)?,
                row.get(4)?,
            ))
        },
    },
    SealedColumn {
        what: "session pickle",
        select: "SELECT id, pickle, sender_key, session_id, last_used FROM sessions",
        update: "UPDATE sessions SET pickle = ?1 WHERE id = ?2",
        context: |row| {
            Ok(session_context(
                &row.get::<_, String>(2)?,
                &row.get::<_, String>(3)?,
                row.get(4)?,
            ))
        },
    },
    SealedColumn {
        what: "device keys",
        select: "SELECT id, data, user_id, device_id FROM devices",
        update: "UPDATE devices SET data = ?1 WHERE id = ?2",
        context: |row| {
            Ok(device_context(
                DeviceTable::KeysQuery,
                &row.get::<_, String>(2)?,
                &row.get::<_, String>(3)?,
            ))
        },
    },
    SealedColumn {
        what: "device keys",
        select: "SELECT id, data, user_id, device_id FROM recovery_devices",
        update: "UPDATE recovery_devices SET data = ?1 WHERE id = ?2",
        context: |row| {
            Ok(device_context(
                DeviceTable::Recovery,
                &row.get::<_, String>(2)?,
                &row.get::<_, String>(3)?,
            ))
        },
    },
    SealedColumn {
        what: "decrypted results",
        select: "SELECT id, data, batch FROM result_batches",
        update: "UPDATE result_batches SET data = ?1 WHERE id = ?2",
        context: |row| Ok(result_batch_context(row.get(0)?, row.get(2)?)),
    },
];

/// `outgoing_requests` has a text key: its own statement.
const REQUESTS: SealedColumn = SealedColumn {
    what: "outgoing request",
    select: "SELECT rowid, data, request_id, created_at FROM outgoing_requests",
    update: "UPDATE outgoing_requests SET data = ?1 WHERE rowid = ?2",
    context: |row| Ok(request_context(&row.get::<_, String>(2)?, row.get(3)?)),
};

fn reseal(
    connection: &Connection,
    column: &SealedColumn,
    old_key: &StoreKey,
    new_key: &StoreKey,
) -> Result<(), StoreError> {
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = connection
        .prepare(column.select)?
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, (column.context)(row)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut update = connection.prepare(column.update)?;
    for (row_id, data, context) in rows {
        let plaintext = old_key
            .decrypt(&data, &context)
            .ok_or(StoreError::Corrupted {
                what: column.what,
                detail: "the value does not open with the current store key and its row".to_owned(),
            })?;
        update.execute(params![new_key.encrypt(&plaintext, &context)?, row_id])?;
    }
    Ok(())
}

impl SqliteStore {
    /// Re-encrypts every secret with `new_key` in one transaction; afterwards only `new_key`
    /// opens the store. On failure nothing changes.
    pub fn rekey(&self, new_key: StoreKey) -> Result<(), StoreError> {
        let connection = self.lock();
        {
            let old_key = self.key();
            immediate(&connection, |connection| {
                let check = new_key.encrypt(KEY_CHECK_PLAINTEXT, KEY_CHECK_CONTEXT)?;
                connection.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'key_check'",
                    params![check],
                )?;
                for column in SEALED_COLUMNS.iter().chain([&REQUESTS]) {
                    reseal(connection, column, &old_key, &new_key)?;
                }
                Ok(())
            })?;
        }
        // The old key is dropped (zeroized) here; the connection is still held, so no read can
        // see the new rows with the old key.
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = new_key;
        Ok(())
    }
}
