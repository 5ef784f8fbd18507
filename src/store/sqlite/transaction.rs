//! The writes: everything one batch (or key operation) changed, as one SQLite transaction.
//! Values are sealed before the connection is taken, so it is held only for the SQL itself.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::analytics::insert_analytics;
use super::schema::meta_number;
use super::sealing::{result_batch_context, session_context};
use super::SqliteStore;
use crate::error::StoreError;
use crate::store::result_batch::{self, FramedResult};
use crate::store::{Changes, StoredResult};

/// How many decrypted results one `result_batches` row holds at most.
const RESULTS_PER_SEAL: usize = 256;

impl SqliteStore {
    /// Commits `changes` in one transaction (or not at all).
    pub(super) fn write_changes(&self, changes: Changes) -> Result<(), StoreError> {
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
            if !changes.analytics.is_empty() {
                insert_analytics(&transaction, &changes)?;
            }
        }
        transaction.commit()?;
        Ok(())
    }
}
