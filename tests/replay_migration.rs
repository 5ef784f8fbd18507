//! Replay keys (schema 5) and the whole-message hashes a version-4 store holds: messages decrypted
//! before the migration are still replays after it, their pending results are still re-emitted,
//! and the migrated store writes replay keys only. On the real version-4 store of
//! `tests/fixtures/v4` (written by the version-4 CLI; make.sh says what it holds).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{FailureReason, OlmMachine, StoreKey, ToDeviceOutcome};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v4")
        .join(name)
}

fn events(name: &str) -> Vec<String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap();
    events.iter().map(|event| event.to_string()).collect()
}

fn key() -> StoreKey {
    StoreKey::from_hex(
        std::fs::read_to_string(fixture("store.key"))
            .unwrap()
            .trim(),
    )
    .unwrap()
}

/// A copy of the version-4 store, migrated by opening it.
async fn migrated(dir: &Path) -> (PathBuf, OlmMachine) {
    let path = dir.join("store.sqlite3");
    std::fs::copy(fixture("store.sqlite3"), &path).unwrap();
    (path.clone(), open(&path).await)
}

async fn open(path: &Path) -> OlmMachine {
    let store = SqliteStore::open(path, key(), Synchronous::Normal).unwrap();
    OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .unwrap()
}

fn count(path: &Path, table: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
}

fn failure_reasons(outcomes: &[ToDeviceOutcome]) -> Vec<FailureReason> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            ToDeviceOutcome::Failed(failed) => failed.error.reason(),
            other => panic!("expected a failure, got {other:?}"),
        })
        .collect()
}

/// Dave's normal messages (acknowledged before the migration) fail to decrypt when replayed, and
/// their old hashes make that a ReplayedMessage, not a broken session; Dave's pre-key message is
/// a ReplayedMessage too; Alice's pending results come back re-emitted under their old ids; the
/// migrated store keeps the old hashes and writes only replay keys.
#[tokio::test]
async fn messages_decrypted_before_the_migration_are_still_replays_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bob) = migrated(dir.path()).await;
    assert_eq!(count(&path, "message_hashes"), 6, "the old hashes are kept");
    assert_eq!(count(&path, "replay_keys"), 0);

    let replayed = bob
        .receive_to_device_events(&events("dave-normal.json"))
        .await
        .unwrap();
    assert_eq!(
        failure_reasons(&replayed),
        [FailureReason::ReplayedMessage; 2]
    );
    let replayed = bob
        .receive_to_device_events(&events("dave-first.json"))
        .await
        .unwrap();
    assert_eq!(failure_reasons(&replayed), [FailureReason::ReplayedMessage]);

    // Alice's three messages of the batch whose results are pending: re-emitted, same ids.
    let pending = pending_result_ids(&bob).await;
    assert_eq!(pending.len(), 3);
    let earlier = events("earlier.json");
    let outcomes = bob.receive_to_device_events(&earlier[..3]).await.unwrap();
    for (seq, outcome) in outcomes.iter().enumerate() {
        let ToDeviceOutcome::Decrypted(event) = outcome else {
            panic!("pending message {seq} was not re-emitted: {outcome:?}");
        };
        assert!(event.re_emitted, "message {seq} decrypted a second time");
        assert_eq!(event.id, pending[seq]);
        assert_eq!(event.content["seq"], seq);
    }
    assert_eq!(
        count(&path, "replay_keys"),
        0,
        "re-emitting decrypts nothing"
    );

    // New messages get replay keys, never old hashes.
    let later = bob
        .receive_to_device_events(&events("later.json"))
        .await
        .unwrap();
    assert!(later
        .iter()
        .all(|outcome| matches!(outcome, ToDeviceOutcome::Decrypted(e) if !e.re_emitted)));
    assert_eq!(count(&path, "replay_keys"), 3);
    assert_eq!(count(&path, "message_hashes"), 6);

    // Once acknowledged, all of Alice's messages are replays, after a restart as well.
    let later_ids: Vec<String> = later
        .iter()
        .map(|outcome| match outcome {
            ToDeviceOutcome::Decrypted(event) => event.id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    bob.acknowledge(&pending).await.unwrap();
    bob.acknowledge(&later_ids).await.unwrap();
    drop(bob);
    let bob = open(&path).await;
    let replayed = bob.receive_to_device_events(&earlier[..3]).await.unwrap();
    assert_eq!(
        failure_reasons(&replayed),
        [FailureReason::ReplayedMessage; 3]
    );
    let replayed = bob
        .receive_to_device_events(&events("later.json"))
        .await
        .unwrap();
    assert_eq!(
        failure_reasons(&replayed),
        [FailureReason::ReplayedMessage; 3],
        "replays of messages decrypted after the migration, by their replay keys"
    );
}

/// Dave's session was made on Bob's fallback key, which Bob still holds: once the session is gone
/// (pruned as least recently used), Dave's first message would make a new session and decrypt
/// again. Its old hash, looked up for every pre-key message, stops it; without that hash it does
/// decrypt (the control), so the lookup is what stopped it.
#[tokio::test]
async fn a_pre_key_message_from_before_the_migration_is_a_replay_even_where_it_would_decrypt_again()
{
    let dir = tempfile::tempdir().unwrap();
    let (path, bob) = migrated(dir.path()).await;
    drop(bob);
    let first = events("dave-first.json");
    let dave_key = serde_json::from_str::<serde_json::Value>(&first[0]).unwrap()["content"]
        ["sender_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let connection = rusqlite::Connection::open(&path).unwrap();
    let removed = connection
        .execute("DELETE FROM sessions WHERE sender_key = ?1", [&dave_key])
        .unwrap();
    assert_eq!(removed, 1, "Dave's one session");

    let bob = open(&path).await;
    let replayed = bob.receive_to_device_events(&first).await.unwrap();
    assert_eq!(failure_reasons(&replayed), [FailureReason::ReplayedMessage]);
    drop(bob);

    // The control: the same, with the old hashes gone.
    connection
        .execute("DELETE FROM message_hashes", [])
        .unwrap();
    let bob = open(&path).await;
    let outcomes = bob.receive_to_device_events(&first).await.unwrap();
    let [ToDeviceOutcome::Decrypted(event)] = outcomes.as_slice() else {
        panic!("expected the fallback key to decrypt it again, got {outcomes:?}");
    };
    assert_eq!(event.content["from"], "dave");
}
