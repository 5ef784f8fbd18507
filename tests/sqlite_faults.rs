//! Store failures from real SQLite faults, not the memory store's switch: a read-only database,
//! SQLITE_BUSY past the busy timeout, and a full disk (`max_page_count`). In each case the batch
//! fails with the SQLite error, exactly one `Store` failure is published, nothing is committed
//! (the file's generation, sessions, hashes and outbox are as before, and every message still
//! decrypts), and the same batch succeeds once the fault clears.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::{FutureExt, StreamExt};
use rusqlite::ErrorCode;
use serde_json::json;
use to_device_crypto::simulator::SimulatedDevice;
use to_device_crypto::store::sqlite::SqliteTestOptions;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{
    FailureReason, FailureStream, OlmMachine, StoreError, StoreKey, ToDeviceOutcome,
};

/// What a commit changes, read with a connection of its own.
#[derive(Debug, PartialEq, Eq)]
struct Committed {
    generation: String,
    sessions: i64,
    replay_keys: i64,
    pending_results: i64,
}

fn committed(path: &Path) -> Committed {
    let connection = rusqlite::Connection::open(path).unwrap();
    let count = |table: &str| -> i64 {
        connection
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap()
    };
    Committed {
        generation: connection
            .query_row(
                "SELECT CAST(value AS TEXT) FROM meta WHERE key = 'generation'",
                [],
                |row| row.get(0),
            )
            .unwrap_or_default(),
        sessions: count("sessions"),
        replay_keys: count("replay_keys"),
        pending_results: count("pending_results"),
    }
}

async fn open(path: &Path, key: &StoreKey, options: &SqliteTestOptions) -> OlmMachine {
    let store = SqliteStore::open_with_options(path, key.clone(), Synchronous::Normal, options)
        .expect("the store opens");
    OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .expect("the machine opens")
}

/// Bob's store with published one-time keys, and a batch of 20 pre-key messages from two new
/// senders: committing it adds sessions, hashes and results, and uses two one-time keys.
async fn store_and_batch(path: &Path, key: &StoreKey) -> Vec<String> {
    let bob = open(path, key, &SqliteTestOptions::default()).await;
    let keys = publish(&bob, 5).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let mut carol = SimulatedDevice::new(CAROL, "CAROLPHONE");
    let to_bob = alice.create_session(&keys, Some(keys.one_time_keys[0].key));
    carol.create_session(&keys, Some(keys.one_time_keys[1].key));
    (0..20)
        .map(|seq| {
            let sender = if seq % 2 == 0 { &mut alice } else { &mut carol };
            sender
                .encrypt(
                    &to_bob,
                    "m.room_key",
                    json!({"seq": seq, "pad": "x".repeat(500)}),
                )
                .to_string()
        })
        .collect()
}

/// Receives `batch` on a machine whose store is faulty: the SQLite error `code`, one `Store`
/// failure, nothing committed.
async fn fails_with_one_store_failure(
    bob: &OlmMachine,
    path: &Path,
    batch: &[String],
    code: ErrorCode,
) -> StoreError {
    let mut failures: FailureStream = bob.to_device_decryption_failure_stream();
    let before = committed(path);
    let error = bob
        .receive_to_device_events(batch)
        .await
        .expect_err("the faulty store fails the batch");
    match &error {
        StoreError::Sqlite(sqlite) => assert_eq!(sqlite.sqlite_error_code(), Some(code), "{error}"),
        other => panic!("expected SQLite error {code:?}, got {other}"),
    }
    let item = failures
        .next()
        .now_or_never()
        .flatten()
        .expect("a Store failure was published")
        .unwrap();
    assert_eq!(item.reason, FailureReason::Store);
    assert!(
        failures.next().now_or_never().is_none(),
        "exactly one failure for the failed batch"
    );
    assert_eq!(
        committed(path),
        before,
        "nothing of the batch was committed"
    );
    error
}

/// The batch, received again, decrypts every message: nothing of the failed attempt was kept
/// (a used one-time key or a stored hash would fail it), and it commits.
async fn retry_succeeds(bob: &OlmMachine, path: &Path, batch: &[String]) {
    let mut failures = bob.to_device_decryption_failure_stream();
    let before = committed(path);
    let outcomes = bob.receive_to_device_events(batch).await.unwrap();
    for outcome in &outcomes {
        assert!(
            matches!(outcome, ToDeviceOutcome::Decrypted(_)),
            "{outcome:?}"
        );
    }
    assert!(failures.next().now_or_never().is_none(), "no failure");
    let after = committed(path);
    assert_eq!(after.replay_keys, before.replay_keys + 20);
    assert_eq!(after.pending_results, before.pending_results + 20);
    assert_eq!(after.sessions, before.sessions + 2);
}

#[tokio::test]
async fn a_read_only_database_fails_the_batch_cleanly_and_a_writable_reopen_retries_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let batch = store_and_batch(&path, &key).await;
    let read_only = SqliteTestOptions {
        read_only: true,
        ..SqliteTestOptions::default()
    };
    {
        let bob = open(&path, &key, &read_only).await;
        fails_with_one_store_failure(&bob, &path, &batch, ErrorCode::ReadOnly).await;
    }
    // The app relaunches once the file is writable again (e.g. the device was unlocked).
    let bob = open(&path, &key, &SqliteTestOptions::default()).await;
    retry_succeeds(&bob, &path, &batch).await;
}

#[tokio::test]
async fn sqlite_busy_past_the_timeout_fails_the_batch_cleanly_and_the_same_machine_retries_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let batch = store_and_batch(&path, &key).await;
    let timeout = Duration::from_millis(300);
    let bob = open(
        &path,
        &key,
        &SqliteTestOptions {
            busy_timeout: Some(timeout),
            ..SqliteTestOptions::default()
        },
    )
    .await;
    // Another connection (one that ignores the cross-process lock file) holds SQLite's write lock.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    fails_with_one_store_failure(&bob, &path, &batch, ErrorCode::DatabaseBusy).await;
    assert!(
        started.elapsed() >= timeout,
        "SQLITE_BUSY only after the busy timeout, not after {:?}",
        started.elapsed()
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    retry_succeeds(&bob, &path, &batch).await;
}

#[tokio::test]
async fn a_full_disk_fails_the_batch_cleanly_and_the_same_machine_retries_it_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let batch = store_and_batch(&path, &key).await;
    let pages = |connection: &rusqlite::Connection| -> u64 {
        connection
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .unwrap()
    };
    let other = rusqlite::Connection::open(&path).unwrap();
    let page_size: u64 = other
        .query_row("PRAGMA page_size", [], |row| row.get(0))
        .unwrap();
    // Bob may grow the file by 64 pages; another app then takes almost all of that room.
    let room = 64;
    let bob = open(
        &path,
        &key,
        &SqliteTestOptions {
            max_page_count: Some(pages(&other) + room),
            ..SqliteTestOptions::default()
        },
    )
    .await;
    other
        .execute_batch(&format!(
            "CREATE TABLE filler (data BLOB); INSERT INTO filler VALUES (zeroblob({}));",
            (room - 4) * page_size
        ))
        .unwrap();
    fails_with_one_store_failure(&bob, &path, &batch, ErrorCode::DiskFull).await;
    // Space is freed: the pages go to SQLite's free list, which Bob's writes reuse.
    other.execute_batch("DROP TABLE filler").unwrap();
    retry_succeeds(&bob, &path, &batch).await;
}
