//! The analytics outbox in SQLite: payloads inserted with their batch (and the bound on how many
//! are kept), and the outbox's own small transactions — claims, removals, releases — which change
//! nothing the machine caches and so leave the generation alone.

use rusqlite::{params, Transaction};

use super::schema::meta_number;
use super::SqliteStore;
use crate::analytics::policy::AnalyticsOutboxStats;
use crate::error::StoreError;
use crate::store::{
    AnalyticsClaim, Changes, StoredAnalytics, MAX_ANALYTICS_DELIVERY_ATTEMPTS,
    MAX_PENDING_ANALYTICS,
};

const DROPPED_FULL: &str = "analytics_dropped_full";
const DROPPED_UNDELIVERABLE: &str = "analytics_dropped_undeliverable";

fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn add_to_counter(transaction: &Transaction<'_>, key: &str, added: u64) -> Result<(), StoreError> {
    if added == 0 {
        return Ok(());
    }
    let total = meta_number(transaction, key)?.saturating_add(added);
    transaction.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, total.to_string().as_bytes()],
    )?;
    Ok(())
}

/// Inserts a batch's payloads under its claim, then drops the oldest beyond the bound.
pub(super) fn insert_analytics(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), StoreError> {
    let (owner, lease_until) = match changes.analytics_claim {
        Some(claim) => (Some(claim.owner.to_vec()), claim.lease_until),
        None => (None, 0),
    };
    let mut statement = transaction.prepare_cached(
        "INSERT OR IGNORE INTO analytics_outbox (id, name, created_at, owner, lease_until)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for payload in &changes.analytics {
        statement.execute(params![
            sql_int(payload.id),
            payload.name,
            sql_int(payload.created_at),
            owner,
            sql_int(lease_until)
        ])?;
    }
    let dropped = transaction
        .prepare_cached(
            "DELETE FROM analytics_outbox WHERE id IN (
                 SELECT id FROM analytics_outbox ORDER BY id
                 LIMIT max(0, (SELECT COUNT(*) FROM analytics_outbox) - ?1))",
        )?
        .execute(params![sql_int(MAX_PENDING_ANALYTICS)])?;
    add_to_counter(transaction, DROPPED_FULL, dropped as u64)
}

impl SqliteStore {
    pub(super) fn claim_analytics_rows(
        &self,
        claim: AnalyticsClaim,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredAnalytics>, StoreError> {
        let connection = self.lock();
        // One statement, so atomic on its own: another process's claim either committed before
        // (and its lease excludes the row here) or comes after and finds this claim.
        let mut statement = connection.prepare_cached(
            "UPDATE analytics_outbox SET owner = ?1, lease_until = ?2
             WHERE id IN (
                 SELECT id FROM analytics_outbox
                 WHERE owner IS NULL OR owner = ?1 OR lease_until <= ?3
                 ORDER BY id LIMIT ?4)
             RETURNING id, name, created_at",
        )?;
        let mut claimed = statement
            .query_map(
                params![
                    &claim.owner[..],
                    sql_int(claim.lease_until),
                    sql_int(now),
                    sql_int(limit as u64)
                ],
                |row| {
                    Ok(StoredAnalytics {
                        id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or_default(),
                        name: row.get(1)?,
                        created_at: u64::try_from(row.get::<_, i64>(2)?).unwrap_or_default(),
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        claimed.sort_unstable_by_key(|payload| payload.id);
        Ok(claimed)
    }

    pub(super) fn remove_analytics_rows(&self, ids: &[u64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        {
            let mut statement =
                transaction.prepare_cached("DELETE FROM analytics_outbox WHERE id = ?1")?;
            for &id in ids {
                statement.execute(params![sql_int(id)])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    pub(super) fn release_analytics_rows(
        &self,
        owner: [u8; 16],
        ids: &[u64],
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let mut dropped = 0;
        {
            let mut release = transaction.prepare_cached(
                "UPDATE analytics_outbox SET owner = NULL, lease_until = 0, attempts = attempts + 1
                 WHERE id = ?1 AND owner = ?2",
            )?;
            let mut give_up = transaction
                .prepare_cached("DELETE FROM analytics_outbox WHERE id = ?1 AND attempts >= ?2")?;
            for &id in ids {
                if release.execute(params![sql_int(id), &owner[..]])? > 0 {
                    dropped += give_up.execute(params![
                        sql_int(id),
                        i64::from(MAX_ANALYTICS_DELIVERY_ATTEMPTS)
                    ])? as u64;
                }
            }
        }
        add_to_counter(&transaction, DROPPED_UNDELIVERABLE, dropped)?;
        transaction.commit()?;
        Ok(dropped)
    }

    pub(super) fn analytics_stats(&self) -> Result<AnalyticsOutboxStats, StoreError> {
        let connection = self.lock();
        let pending: i64 =
            connection.query_row("SELECT COUNT(*) FROM analytics_outbox", [], |row| {
                row.get(0)
            })?;
        Ok(AnalyticsOutboxStats {
            pending: u64::try_from(pending).unwrap_or_default(),
            dropped_full: meta_number(&connection, DROPPED_FULL)?,
            dropped_undeliverable: meta_number(&connection, DROPPED_UNDELIVERABLE)?,
        })
    }
}
