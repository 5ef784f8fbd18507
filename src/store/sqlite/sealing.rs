//! Sealing: every secret value (pickles, decrypted results) is encrypted with the store key and
//! bound to where it belongs by its associated data (its context); opening checks both.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStore;
use crate::error::StoreError;
use crate::store::result_batch;
use crate::store::StoredResult;

pub(super) fn result_context(id: &str) -> String {
    format!("result:{id}")
}

pub(super) fn result_batch_context(batch: i64) -> String {
    format!("result_batch:{batch}")
}

pub(super) fn session_context(sender_key: &str, session_id: &str) -> String {
    format!("session:{sender_key}:{session_id}")
}

/// A `pending_results` row.
pub(super) struct PendingRow {
    id: String,
    batch: i64,
    index: i64,
    /// The result sealed on its own (schema 3 rows); empty when `result_batch` is set.
    data: Vec<u8>,
    /// The `result_batches` row holding the result (schema 4).
    result_batch: Option<i64>,
}

impl PendingRow {
    pub(super) fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            batch: row.get(1)?,
            index: row.get(2)?,
            data: row.get(3)?,
            result_batch: row.get(4)?,
        })
    }
}

impl SqliteStore {
    pub(super) fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, StoreError> {
        self.current_key().encrypt(plaintext, context.as_bytes())
    }

    /// Opens the pending results `rows` point at: their own sealed `data` (schema 3), or their
    /// batch's sealed value (schema 4), each opened once however many rows share it.
    pub(super) fn open_results(
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

    pub(super) fn open_result_batch(
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

    pub(super) fn open_sealed_bytes(
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

    pub(super) fn open_sealed(
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
