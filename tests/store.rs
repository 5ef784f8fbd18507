//! The SQLite store: schema migration, newer and corrupted files, key rotation, wipe, the sync
//! token and the outbox across a restart.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use serde_json::json;
use to_device_crypto::simulator::SimulatedDevice;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{OlmMachine, StoreError, StoreKey};

async fn open(path: &Path, key: &StoreKey) -> OlmMachine {
    let store = SqliteStore::open(path, key.clone(), Synchronous::Normal).unwrap();
    OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .unwrap()
}

fn user_version(path: &Path) -> i64 {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_version_1_store_is_migrated_in_place_to_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let identity = open(&path, &key).await.identity_keys();
    // Turn it into what version 1 wrote: no outbox table.
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "DROP TABLE pending_results; DROP TABLE result_batches; DROP TABLE analytics_outbox;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
    }
    assert_eq!(user_version(&path), 1);
    let bob = open(&path, &key).await;
    assert_eq!(user_version(&path), 5);
    assert_eq!(
        bob.identity_keys(),
        identity,
        "the account survived the migration"
    );
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({}));
    bob.decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    assert_eq!(
        bob.pending_decrypted_events().await.unwrap().len(),
        1,
        "the new table works"
    );
}

/// Version 3 sealed each pending result on its own row; version 4 seals a batch's results
/// together. Rows a version-3 store holds are still delivered, rekeyed and acknowledged.
#[tokio::test]
async fn results_pending_in_a_version_3_store_survive_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    drop(open(&path, &key).await);
    let legacy = json!({
        "id": "legacy-result", "re_emitted": false, "event_type": "m.room_key",
        "content": {"session_key": "secret"}, "sender": ALICE,
        "sender_curve25519_key": "curve", "sender_ed25519_key": "ed",
        "sender_device_id": "ALICEPHONE", "sender_device_verified": true,
    });
    {
        // What version 3 wrote: no result_batches table, the result sealed on its row.
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "DROP TABLE result_batches; DROP TABLE analytics_outbox;
                 ALTER TABLE pending_results DROP COLUMN result_batch;
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        let sealed = key
            .encrypt(legacy.to_string().as_bytes(), b"result:legacy-result")
            .unwrap();
        connection
            .execute(
                "INSERT INTO pending_results (id, batch, idx, data) VALUES ('legacy-result', 0, 0, ?1)",
                [sealed],
            )
            .unwrap();
    }
    let bob = open(&path, &key).await;
    assert_eq!(user_version(&path), 5);
    // A new result next to the old one, sealed the version-4 way.
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({"n": 1}));
    bob.decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    let new_key = StoreKey::generate().unwrap();
    bob.rekey_store(new_key.clone()).await.unwrap();
    drop(bob);

    let bob = open(&path, &new_key).await;
    let pending = bob.pending_decrypted_events().await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].event.id, "legacy-result");
    assert_eq!(pending[0].event.content, json!({"session_key": "secret"}));
    assert_eq!(pending[1].event.content, json!({"n": 1}));
    let ids: Vec<String> = pending.iter().map(|p| p.event.id.clone()).collect();
    bob.acknowledge(&ids).await.unwrap();
    assert!(bob.pending_decrypted_events().await.unwrap().is_empty());
    let connection = rusqlite::Connection::open(&path).unwrap();
    let batches: i64 = connection
        .query_row("SELECT count(*) FROM result_batches", [], |row| row.get(0))
        .unwrap();
    assert_eq!(
        batches, 0,
        "an acknowledged batch's sealed results are deleted"
    );
}

#[tokio::test]
async fn newer_and_corrupted_files_are_refused_clearly_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let newer = dir.path().join("newer.sqlite3");
    open(&newer, &key).await;
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    let before = std::fs::read(&newer).unwrap();
    let error = SqliteStore::open(&newer, key.clone(), Synchronous::Normal).unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::NewerSchema {
                found: 99,
                supported: 5
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("newer"));
    assert_eq!(std::fs::read(&newer).unwrap(), before);

    let corrupted = dir.path().join("corrupted.sqlite3");
    std::fs::write(
        &corrupted,
        b"this is not a database, it is a shopping list".repeat(100),
    )
    .unwrap();
    let before = std::fs::read(&corrupted).unwrap();
    let error = SqliteStore::open(&corrupted, key, Synchronous::Normal).unwrap_err();
    assert!(matches!(error, StoreError::Corrupted { .. }), "{error}");
    assert!(
        error.to_string().contains("not a SQLite database"),
        "{error}"
    );
    assert_eq!(std::fs::read(&corrupted).unwrap(), before);
}

#[tokio::test]
async fn rekey_re_encrypts_everything_and_wipe_deletes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let old_key = StoreKey::generate().unwrap();
    let new_key = StoreKey::generate().unwrap();
    let bob = open(&path, &old_key).await;
    let identity = bob.identity_keys();
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let first = alice.encrypt(&to_bob, "m.room_key", json!({"n": 1}));
    bob.decrypt_to_device_event(&first.to_string())
        .await
        .unwrap();
    bob.rekey_store(new_key.clone()).await.unwrap();
    drop(bob);

    let error = SqliteStore::open(&path, old_key, Synchronous::Normal).unwrap_err();
    assert!(matches!(error, StoreError::WrongStoreKey));
    let bob = open(&path, &new_key).await;
    assert_eq!(bob.identity_keys(), identity);
    assert_eq!(
        bob.pending_decrypted_events().await.unwrap()[0]
            .event
            .content["n"],
        1
    );
    let second = alice.encrypt(&to_bob, "m.room_key", json!({"n": 2}));
    bob.decrypt_to_device_event(&second.to_string())
        .await
        .unwrap();

    bob.wipe().await.unwrap();
    let third = alice.encrypt(&to_bob, "m.room_key", json!({"n": 3}));
    assert!(bob
        .decrypt_to_device_event(&third.to_string())
        .await
        .is_err());
    drop(bob);
    let connection = rusqlite::Connection::open(&path).unwrap();
    for table in [
        "account",
        "sessions",
        "message_hashes",
        "pending_results",
        "devices",
    ] {
        let rows: i64 = connection
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(rows, 0, "{table} still has rows");
    }
}

#[tokio::test]
async fn the_sync_token_commits_with_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let bob = open(&path, &key).await;
    assert_eq!(bob.sync_token().await.unwrap(), None);
    bob.receive_sync(&["not json"], Some("s72594_4483_1934"))
        .await
        .unwrap();
    drop(bob);
    let bob = open(&path, &key).await;
    assert_eq!(
        bob.sync_token().await.unwrap().as_deref(),
        Some("s72594_4483_1934")
    );
}

#[tokio::test]
async fn a_store_opened_with_a_passphrase_reopens_with_it_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let open = |passphrase: &'static str| {
        let path = path.clone();
        async move {
            let store = SqliteStore::open_with_passphrase(&path, passphrase, Synchronous::Normal)?;
            Ok::<_, StoreError>(
                OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
                    .await
                    .unwrap(),
            )
        }
    };
    let identity = open("correct horse battery staple")
        .await
        .unwrap()
        .identity_keys();
    let again = open("correct horse battery staple").await.unwrap();
    assert_eq!(again.identity_keys(), identity);
    drop(again);
    let before = std::fs::read(&path).unwrap();
    assert!(matches!(
        open("Tr0ub4dor&3").await,
        Err(StoreError::WrongStoreKey)
    ));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a wrong passphrase changes nothing"
    );
    assert!(
        !before.windows(7).any(|w| w == b"correct"),
        "the passphrase is not stored"
    );
}

/// The replay check asks the store about a whole batch at once; SQLite answers in chunks of 64.
#[tokio::test]
async fn known_message_hashes_answers_for_batches_of_any_size() {
    use to_device_crypto::olm::envelope::MessageHash;
    use to_device_crypto::store::{Changes, CryptoStore};
    use to_device_crypto::MemoryStore;

    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn CryptoStore>; 2] = [
        Arc::new(new_sqlite_store(dir.path().join("hashes.sqlite3"))),
        Arc::new(MemoryStore::new()),
    ];
    let hash = |i: u32| {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        bytes[31] = 0xA5;
        MessageHash(bytes)
    };
    let stored: Vec<MessageHash> = (0..150).map(|i| hash(i * 2)).collect();
    for store in stores {
        store
            .save_changes(Changes {
                message_hashes: stored.clone(),
                ..Changes::default()
            })
            .await
            .unwrap();
        assert!(store.known_message_hashes(&[]).await.unwrap().is_empty());
        for asked in [1, 63, 64, 65, 129, 300] {
            // Stored and unknown hashes interleaved, so every chunk holds some of each.
            let query: Vec<MessageHash> = (0..asked as u32).map(hash).collect();
            let known = store.known_message_hashes(&query).await.unwrap();
            let expected: std::collections::HashSet<MessageHash> = query
                .iter()
                .filter(|h| stored.contains(h))
                .copied()
                .collect();
            assert_eq!(known, expected, "{asked} hashes asked");
        }
    }
}

/// Both stores keep the outbox the same way: listed in (batch, index) order, found by id, and
/// acknowledged results gone, however many are pending.
#[tokio::test]
async fn the_outbox_lists_in_order_finds_by_id_and_forgets_acknowledged_results() {
    use to_device_crypto::store::{Changes, CryptoStore, StoredResult};
    use to_device_crypto::MemoryStore;

    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn CryptoStore>; 2] = [
        Arc::new(new_sqlite_store(dir.path().join("outbox.sqlite3"))),
        Arc::new(MemoryStore::new()),
    ];
    let result = |batch: u64, index: u64| StoredResult {
        id: format!("r{batch}-{index}"),
        batch,
        index,
        json: format!(r#"{{"batch":{batch},"index":{index}}}"#),
    };
    for store in stores {
        // Batches committed newest first, each with its results in reverse.
        for batch in (1..=3).rev() {
            store
                .save_changes(Changes {
                    pending_results: (0..500).rev().map(|index| result(batch, index)).collect(),
                    ..Changes::default()
                })
                .await
                .unwrap();
        }
        let acknowledged: Vec<String> = (0..500)
            .filter(|index| index % 3 != 0)
            .map(|index| result(2, index).id)
            .collect();
        store
            .save_changes(Changes {
                acknowledged: acknowledged.clone(),
                ..Changes::default()
            })
            .await
            .unwrap();

        let listed = store.load_pending_results().await.unwrap();
        let expected: Vec<(u64, u64)> = (1..=3)
            .flat_map(|batch| (0..500).map(move |index| (batch, index)))
            .filter(|&(batch, index)| batch != 2 || index % 3 == 0)
            .collect();
        let order: Vec<(u64, u64)> = listed.iter().map(|r| (r.batch, r.index)).collect();
        assert_eq!(order, expected);
        let asked = [
            "r2-3".to_owned(),
            acknowledged[0].clone(),
            "r3-499".to_owned(),
        ];
        let found = store.pending_results(&asked).await.unwrap();
        assert_eq!(found.len(), 2, "the acknowledged one is gone");
        assert_eq!(found["r2-3"], result(2, 3));
        assert_eq!(found["r3-499"], result(3, 499));

        let everything: Vec<String> = listed.iter().map(|r| r.id.clone()).collect();
        store
            .save_changes(Changes {
                acknowledged: everything,
                ..Changes::default()
            })
            .await
            .unwrap();
        assert!(store.load_pending_results().await.unwrap().is_empty());
    }
    // 500 results a batch were sealed 256 at a time; none is kept once all are acknowledged.
    let connection = rusqlite::Connection::open(dir.path().join("outbox.sqlite3")).unwrap();
    let sealed: i64 = connection
        .query_row("SELECT count(*) FROM result_batches", [], |row| row.get(0))
        .unwrap();
    assert_eq!(sealed, 0);
}

/// Version 4 had no analytics outbox: a real version-4 store (results pending) is upgraded in
/// place, keeps its results, and its new table holds payloads — failure names and nothing else.
#[tokio::test]
async fn a_version_4_store_gains_the_analytics_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let bob = open(&path, &key).await;
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({"kept": true}));
    bob.decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    drop(bob);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE analytics_outbox; PRAGMA user_version = 4;")
        .unwrap();

    let bob = open(&path, &key).await;
    assert_eq!(user_version(&path), 5);
    let pending = bob.pending_decrypted_events().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event.content, json!({"kept": true}));
    let megolm = json!({"type": "m.room.encrypted", "sender": "@mallory:evil.example", "content": {"algorithm": "m.megolm.v1.aes-sha2", "sender_key": "KEYKEYKEY"}});
    bob.decrypt_to_device_event(&megolm.to_string())
        .await
        .unwrap_err();
    let payloads = bob.flush_pending_analytics().await.unwrap();
    assert_eq!(payloads.len(), 1);
    let rows: Vec<(i64, String, i64)> = rusqlite::Connection::open(&path)
        .unwrap()
        .prepare("SELECT id, name, created_at FROM analytics_outbox")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "ToDeviceFailedToDecrypt_UnsupportedAlgorithm");
    assert_eq!(rows[0].0 as u64, payloads[0].id.0);
    bob.acknowledge_analytics(&[payloads[0].id]).await.unwrap();
    assert!(bob.flush_pending_analytics().await.unwrap().is_empty());
}
