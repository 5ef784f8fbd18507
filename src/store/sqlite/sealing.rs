//! Sealing: every value the store must be able to trust — pickles, decrypted results, other
//! devices' keys, outgoing requests — is encrypted with the store key and bound to its row by its
//! associated data (the row's table, its identifying columns and every plain column it must agree
//! with). A value copied into another row, or a row whose plain columns were edited, no longer
//! opens. What sealing cannot catch — the whole file, or one row, rolled back to an older copy of
//! itself, or a row deleted — needs a trusted counter outside the file (see the README).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use super::SqliteStore;
use crate::error::StoreError;
use crate::store::result_batch;
use crate::store::StoredResult;

/// The tables whose rows hold another device's signed keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DeviceTable {
    /// Devices from `/keys/query`.
    KeysQuery,
    /// Devices known only from a verified `sender_device_keys`, kept for session recovery.
    Recovery,
}

impl DeviceTable {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::KeysQuery => "devices",
            Self::Recovery => "recovery_devices",
        }
    }
}

/// The associated data binding a sealed value to its row: a format tag, the table, then each
/// column, length-prefixed so that no two different rows can share a context (user ids contain
/// `:`, so a separator alone would be ambiguous).
fn row_context(table: &str, columns: &[&[u8]]) -> Vec<u8> {
    const TAG: &[u8] = b"to-device-crypto row v5\0";
    let mut context = Vec::with_capacity(
        TAG.len() + 4 + table.len() + columns.iter().map(|c| 4 + c.len()).sum::<usize>(),
    );
    context.extend_from_slice(TAG);
    for part in std::iter::once(table.as_bytes()).chain(columns.iter().copied()) {
        let length = u32::try_from(part.len()).expect("a column is far smaller than 4 GiB");
        context.extend_from_slice(&length.to_le_bytes());
        context.extend_from_slice(part);
    }
    context
}

/// The account row: bound to the user and device it belongs to, so that editing those columns
/// cannot hand our identity to another device id.
pub(super) fn account_context(user_id: &str, device_id: &str, keys_published: bool) -> Vec<u8> {
    row_context(
        "account",
        &[
            user_id.as_bytes(),
            device_id.as_bytes(),
            &[u8::from(keys_published)],
        ],
    )
}

pub(super) fn session_context(sender_key: &str, session_id: &str, last_used: i64) -> Vec<u8> {
    row_context(
        "sessions",
        &[
            sender_key.as_bytes(),
            session_id.as_bytes(),
            &last_used.to_le_bytes(),
        ],
    )
}

pub(super) fn device_context(table: DeviceTable, user_id: &str, device_id: &str) -> Vec<u8> {
    row_context(table.name(), &[user_id.as_bytes(), device_id.as_bytes()])
}

pub(super) fn request_context(request_id: &str, created_at: i64) -> Vec<u8> {
    row_context(
        "outgoing_requests",
        &[request_id.as_bytes(), &created_at.to_le_bytes()],
    )
}

/// A `result_batches` row: its own row id (a value moved to another row does not open) and the
/// batch number, which the framed results repeat.
pub(super) fn result_batch_context(row_id: i64, batch: i64) -> Vec<u8> {
    row_context(
        "result_batches",
        &[&row_id.to_le_bytes(), &batch.to_le_bytes()],
    )
}

/// A `pending_results` row: a result's place in the outbox, pointing at its sealed batch.
pub(super) struct PendingRow {
    id: String,
    batch: i64,
    index: i64,
    result_batch: i64,
}

impl PendingRow {
    /// Reads `id, batch, idx, result_batch`.
    pub(super) fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            batch: row.get(1)?,
            index: row.get(2)?,
            result_batch: row.get(3)?,
        })
    }
}

/// The results of one sealed batch value, by id: (batch, index, JSON).
type OpenedBatch = HashMap<String, (u64, u64, String)>;

fn tampered(detail: String) -> StoreError {
    StoreError::Corrupted {
        what: "decrypted results",
        detail,
    }
}

impl SqliteStore {
    pub(super) fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.key().encrypt(plaintext, context)
    }

    /// Opens the results `rows` point at, each batch value once however many rows share it, and
    /// checks every row against its sealed copy: a row whose batch or index was rewritten, or
    /// that was swapped with another, is refused.
    pub(super) fn open_results(
        &self,
        connection: &Connection,
        rows: Vec<PendingRow>,
    ) -> Result<Vec<StoredResult>, StoreError> {
        let mut batches: HashMap<i64, OpenedBatch> = HashMap::new();
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let batch_results = match batches.entry(row.result_batch) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    entry.insert(self.open_result_batch(connection, row.result_batch)?)
                }
            };
            let (batch, index, json) = batch_results.get(&row.id).ok_or_else(|| {
                tampered(format!(
                    "result {} is missing from its sealed batch",
                    row.id
                ))
            })?;
            let (batch, index) = (*batch, *index);
            if i64::try_from(batch).ok() != Some(row.batch)
                || i64::try_from(index).ok() != Some(row.index)
            {
                return Err(tampered(format!(
                    "result {} is listed at batch {} index {} but was sealed at batch {batch} \
                     index {index}: the outbox's order was edited",
                    row.id, row.batch, row.index
                )));
            }
            results.push(StoredResult {
                json: json.clone(),
                id: row.id,
                batch,
                index,
            });
        }
        Ok(results)
    }

    fn open_result_batch(
        &self,
        connection: &Connection,
        row_id: i64,
    ) -> Result<OpenedBatch, StoreError> {
        let (batch, data): (i64, Vec<u8>) = connection
            .prepare_cached("SELECT batch, data FROM result_batches WHERE id = ?1")?
            .query_row(params![row_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?
            .ok_or_else(|| tampered("a pending result's batch is missing".to_owned()))?;
        let framed = self.open_sealed_bytes(
            &data,
            &result_batch_context(row_id, batch),
            "decrypted results",
        )?;
        let mut opened = HashMap::new();
        for result in result_batch::decode(&framed)? {
            if i64::try_from(result.batch).ok() != Some(batch) {
                return Err(tampered(format!(
                    "a value of batch {batch} holds a result of batch {}",
                    result.batch
                )));
            }
            opened.insert(
                result.id.to_owned(),
                (result.batch, result.index, result.json.to_owned()),
            );
        }
        Ok(opened)
    }

    /// Opens a sealed value; `Corrupted` when it does not open with the store key and `context`
    /// (tampered, moved to another row, or damaged). The plaintext is zeroized on drop.
    pub(super) fn open_sealed_bytes(
        &self,
        data: &[u8],
        context: &[u8],
        what: &'static str,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.key()
            .decrypt(data, context)
            .ok_or_else(|| StoreError::Corrupted {
                what,
                detail: "the value does not open with the store key and its row (edited, moved \
                         to another row, or damaged)"
                    .to_owned(),
            })
    }

    /// [`open_sealed_bytes`](Self::open_sealed_bytes) for UTF-8 text.
    pub(super) fn open_sealed(
        &self,
        data: &[u8],
        context: &[u8],
        what: &'static str,
    ) -> Result<String, StoreError> {
        let mut bytes = self.open_sealed_bytes(data, context, what)?;
        // Moved out of the zeroizing buffer rather than copied: the String is the only copy.
        String::from_utf8(std::mem::take(&mut *bytes)).map_err(|e| StoreError::Corrupted {
            what,
            detail: e.to_string(),
        })
    }
}
