//! The writes: everything one batch (or key operation) changed, as one SQLite transaction, and
//! the creation of the account. Values are sealed before the connection is taken where their row
//! is known in advance, so it is held mostly for the SQL itself; a batch of results is sealed
//! once its row id exists, since the seal binds it to that row.

use std::collections::BTreeMap;

use rusqlite::params;
use rusqlite::types::ToSqlOutput;
use zeroize::Zeroizing;

use super::analytics::insert_analytics;
use super::multi_row;
use super::schema::meta_number;
use super::sealing::{
    account_context, device_context, request_context, result_batch_context, session_context,
    DeviceTable,
};
use super::SqliteStore;
use crate::error::StoreError;
use crate::store::result_batch::{self, FramedResult};
use crate::store::{AccountCreation, Changes, StoredAccount, StoredDevice, StoredResult};

fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

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
            .map(|account| self.seal_account(account).map(|p| (account, p)))
            .transpose()?;
        let sessions = changes
            .sessions
            .iter()
            .map(|s| {
                self.seal(
                    s.pickle.as_bytes(),
                    &session_context(&s.sender_key, &s.session_id, sql_int(s.last_used)),
                )
                .map(|p| (s, p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let devices = self.seal_devices(&changes.devices, DeviceTable::KeysQuery)?;
        let recovery_devices =
            self.seal_devices(&changes.recovery_devices, DeviceTable::Recovery)?;
        let requests = changes
            .outgoing_requests
            .iter()
            .map(|r| {
                let created_at = sql_int(r.created_at);
                self.seal(
                    r.json.as_bytes(),
                    &request_context(&r.request_id, created_at),
                )
                .map(|sealed| (r, created_at, sealed))
            })
            .collect::<Result<Vec<_>, _>>()?;

        // One sealed value per batch for its results (the AEAD's cost per call rivals sealing a
        // result's bytes), split every RESULTS_PER_SEAL results so that a huge batch never needs
        // several copies of all its results at once.
        let mut by_batch: BTreeMap<u64, Vec<&StoredResult>> = BTreeMap::new();
        for result in &changes.pending_results {
            by_batch.entry(result.batch).or_default().push(result);
        }
        let result_batches: Vec<_> = by_batch
            .iter()
            .flat_map(|(&batch, results)| {
                results
                    .chunks(RESULTS_PER_SEAL)
                    .map(move |results| (batch, results))
            })
            .map(|(batch, results)| {
                let framed =
                    Zeroizing::new(result_batch::encode(results.iter().map(|r| FramedResult {
                        id: &r.id,
                        batch,
                        index: r.index,
                        json: &r.json,
                    })));
                (sql_int(batch), results, framed)
            })
            .collect();

        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        if let Some((account, pickle)) = account {
            // An update of the account this machine opened (the creation is `create_account`).
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
                    sql_int(session.last_used)
                ])?;
            }
            let mut statement = transaction
                .prepare_cached("DELETE FROM sessions WHERE sender_key = ?1 AND session_id = ?2")?;
            for (sender_key, session_id) in &changes.removed_sessions {
                statement.execute(params![sender_key, session_id])?;
            }
            multi_row::execute(
                &transaction,
                "INSERT OR IGNORE INTO replay_keys (key) VALUES ",
                "(?)",
                "",
                &changes.message_hashes,
                |key, out| out.push(ToSqlOutput::from(&key.0[..])),
            )?;
            let mut statement = transaction.prepare_cached(
                "INSERT INTO devices (user_id, device_id, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET data = excluded.data",
            )?;
            // `/keys/query` is the authority: its answer replaces what sender_device_keys taught.
            let mut forget = transaction.prepare_cached(
                "DELETE FROM recovery_devices WHERE user_id = ?1 AND device_id = ?2",
            )?;
            for (device, sealed) in &devices {
                statement.execute(params![device.user_id, device.device_id, sealed])?;
                forget.execute(params![device.user_id, device.device_id])?;
            }
            let mut statement = transaction.prepare_cached(
                "INSERT INTO recovery_devices (user_id, device_id, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET data = excluded.data",
            )?;
            for (device, sealed) in &recovery_devices {
                statement.execute(params![device.user_id, device.device_id, sealed])?;
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
                "INSERT OR REPLACE INTO outgoing_requests (request_id, data, created_at) VALUES (?1, ?2, ?3)",
            )?;
            for (request, created_at, sealed) in &requests {
                statement.execute(params![request.request_id, sealed, created_at])?;
            }
            let mut statement = transaction.prepare_cached(
                "INSERT OR REPLACE INTO recovery_attempts (sender_key, attempted_at) VALUES (?1, ?2)",
            )?;
            for (sender_key, at) in &changes.recovery_attempts {
                statement.execute(params![sender_key, sql_int(*at)])?;
            }
            for (batch, results, framed) in &result_batches {
                transaction
                    .prepare_cached(
                        "INSERT INTO result_batches (batch, remaining, data) VALUES (?1, 0, x'')",
                    )?
                    .execute(params![batch])?;
                let batch_row = transaction.last_insert_rowid();
                let sealed = self.seal(framed, &result_batch_context(batch_row, *batch))?;
                transaction
                    .prepare_cached("UPDATE result_batches SET data = ?1 WHERE id = ?2")?
                    .execute(params![sealed, batch_row])?;
                // A result id already pending keeps its row (the same message gives the same
                // result): `remaining` counts only the rows that point here.
                let remaining = multi_row::execute(
                    &transaction,
                    "INSERT OR IGNORE INTO pending_results (id, batch, idx, result_batch) VALUES ",
                    "(?, ?, ?, ?)",
                    "",
                    results,
                    |result, out| {
                        out.push(ToSqlOutput::from(result.id.as_str()));
                        out.push(ToSqlOutput::from(*batch));
                        out.push(ToSqlOutput::from(sql_int(result.index)));
                        out.push(ToSqlOutput::from(batch_row));
                    },
                )?;
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
            multi_row::query_integers(
                &transaction,
                "DELETE FROM pending_results WHERE id IN (",
                "?",
                ") RETURNING result_batch",
                &changes.acknowledged,
                |id, out| out.push(ToSqlOutput::from(id.as_str())),
                |batch_row| {
                    if let Some(batch_row) = batch_row {
                        *acknowledged_in.entry(batch_row).or_default() += 1;
                    }
                },
            )?;
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
                statement.execute(params!["policy_state", policy_state.as_bytes()])?;
            }
            if !changes.analytics.is_empty() {
                insert_analytics(&transaction, &changes)?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn seal_devices<'a>(
        &self,
        devices: &'a [StoredDevice],
        table: DeviceTable,
    ) -> Result<Vec<(&'a StoredDevice, Vec<u8>)>, StoreError> {
        devices
            .iter()
            .map(|d| {
                self.seal(
                    d.json.as_bytes(),
                    &device_context(table, &d.user_id, &d.device_id),
                )
                .map(|sealed| (d, sealed))
            })
            .collect()
    }

    fn seal_account(&self, account: &StoredAccount) -> Result<Vec<u8>, StoreError> {
        self.seal(
            account.pickle.as_bytes(),
            &account_context(
                &account.user_id,
                &account.device_id,
                account.device_keys_published,
            ),
        )
    }

    /// A plain INSERT of the account: of several openers that found no account, the first to
    /// commit wins and the others get its account back (they held the cross-process lock in
    /// turn, but the constraint is what guarantees one identity).
    pub(super) fn insert_account(
        &self,
        account: StoredAccount,
    ) -> Result<AccountCreation, StoreError> {
        let pickle = self.seal_account(&account)?;
        let mut connection = self.lock();
        let transaction =
            connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let inserted = transaction.execute(
            "INSERT INTO account (id, user_id, device_id, pickle, device_keys_published)
             VALUES (0, ?1, ?2, ?3, ?4)",
            params![
                account.user_id,
                account.device_id,
                pickle,
                account.device_keys_published
            ],
        );
        match inserted {
            Ok(_) => {
                let generation = meta_number(&transaction, "generation")? + 1;
                transaction.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?1)",
                    params![generation.to_string().as_bytes()],
                )?;
                transaction.commit()?;
                Ok(AccountCreation::Created)
            }
            Err(error)
                if error.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
            {
                drop(transaction);
                drop(connection);
                let existing = self.read_account()?.ok_or_else(|| StoreError::Corrupted {
                    what: "account",
                    detail: "inserting the account conflicted, yet no account is stored".to_owned(),
                })?;
                Ok(AccountCreation::AlreadyExists(existing))
            }
            Err(error) => Err(error.into()),
        }
    }
}
