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

/// The tables version 1 wrote, and version 2's and 3's steps (copied from the migration history:
/// these are the formats older stores are in).
const VERSION_1_TABLES: &str = "
    CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
    CREATE TABLE account (id INTEGER PRIMARY KEY CHECK (id = 0), user_id TEXT NOT NULL,
        device_id TEXT NOT NULL, pickle BLOB NOT NULL, device_keys_published INTEGER NOT NULL);
    CREATE TABLE sessions (sender_key TEXT NOT NULL, session_id TEXT NOT NULL,
        pickle BLOB NOT NULL, last_used INTEGER NOT NULL,
        PRIMARY KEY (sender_key, session_id)) WITHOUT ROWID;
    CREATE TABLE devices (user_id TEXT NOT NULL, device_id TEXT NOT NULL, json TEXT NOT NULL,
        PRIMARY KEY (user_id, device_id)) WITHOUT ROWID;
    CREATE TABLE message_hashes (hash BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;
    CREATE TABLE claimed_one_time_keys (key TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
    CREATE TABLE failure_marks (mark BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;
    CREATE TABLE outgoing_requests (request_id TEXT PRIMARY KEY NOT NULL, json TEXT NOT NULL,
        created_at INTEGER NOT NULL);
    CREATE TABLE recovery_attempts (sender_key TEXT PRIMARY KEY NOT NULL,
        attempted_at INTEGER NOT NULL) WITHOUT ROWID;
    PRAGMA user_version = 1;";
const VERSION_3_STEPS: &str = "
    CREATE TABLE pending_results (id TEXT PRIMARY KEY NOT NULL, batch INTEGER NOT NULL,
        idx INTEGER NOT NULL, data BLOB NOT NULL);
    CREATE INDEX pending_results_order ON pending_results (batch, idx);
    CREATE TABLE sessions_v3 (id INTEGER PRIMARY KEY, sender_key TEXT NOT NULL,
        session_id TEXT NOT NULL, pickle BLOB NOT NULL, last_used INTEGER NOT NULL,
        UNIQUE (sender_key, session_id));
    DROP TABLE sessions;
    ALTER TABLE sessions_v3 RENAME TO sessions;
    PRAGMA user_version = 3;";

/// A store as version 1 (or, with `version_3`, version 3) wrote it: its tables, its key check
/// and Bob's account sealed the way those versions sealed it. Returns Bob's identity.
async fn old_store(path: &Path, key: &StoreKey, version_3: bool) -> String {
    use to_device_crypto::store::CryptoStore;
    let memory = Arc::new(to_device_crypto::MemoryStore::new());
    let bob = OlmMachine::open(BOB, "BOBPHONE", memory.clone())
        .await
        .unwrap();
    let pickle = memory.load_account().await.unwrap().unwrap().pickle;
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .execute_batch("PRAGMA journal_mode = WAL;")
        .unwrap();
    connection.execute_batch(VERSION_1_TABLES).unwrap();
    if version_3 {
        connection.execute_batch(VERSION_3_STEPS).unwrap();
    }
    let check = key
        .encrypt(b"to-device-crypto store key check", b"key_check")
        .unwrap();
    connection
        .execute(
            "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
            [check],
        )
        .unwrap();
    let sealed = key.encrypt(pickle.as_bytes(), b"account").unwrap();
    connection
        .execute(
            "INSERT INTO account (id, user_id, device_id, pickle, device_keys_published)
             VALUES (0, ?1, 'BOBPHONE', ?2, 0)",
            rusqlite::params![BOB, sealed],
        )
        .unwrap();
    bob.identity_keys().curve25519.to_base64()
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
    let identity = old_store(&path, &key, false).await;
    assert_eq!(user_version(&path), 1);
    let bob = open(&path, &key).await;
    assert_eq!(user_version(&path), 5);
    assert_eq!(
        bob.identity_keys().curve25519.to_base64(),
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

/// Version 3 sealed each pending result on its own row; later versions seal a batch's results
/// together. Rows a version-3 store holds are still delivered, rekeyed and acknowledged.
#[tokio::test]
async fn results_pending_in_a_version_3_store_survive_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    old_store(&path, &key, true).await;
    let legacy = json!({
        "id": "legacy-result", "re_emitted": false, "event_type": "m.room_key",
        "content": {"session_key": "secret"}, "sender": ALICE,
        "sender_curve25519_key": "curve", "sender_ed25519_key": "ed",
        "sender_device_id": "ALICEPHONE", "sender_device_verified": true,
    });
    {
        // The result sealed on its own row, bound only to its id.
        let connection = rusqlite::Connection::open(&path).unwrap();
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
    // A new result next to the old one, sealed the current way.
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
        "replay_keys",
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

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v4")
        .join(name)
}

/// A real version-4 store (`tests/fixtures/v4`, written by the version-4 CLI: see its make.sh)
/// migrates to version 5 with everything in it: the account, the session with Alice (her later
/// messages decrypt), the devices from /keys/query (now sealed), the pending results in their
/// order (their position now sealed with them) and the queued /keys/claim (now sealed).
#[tokio::test]
async fn a_real_version_4_store_migrates_with_its_results_devices_and_requests() {
    use to_device_crypto::store::CryptoStore;
    use to_device_crypto::OutgoingRequestKind;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    std::fs::copy(fixture("store.sqlite3"), &path).unwrap();
    let key = StoreKey::from_hex(&std::fs::read_to_string(fixture("store.key")).unwrap()).unwrap();
    assert_eq!(user_version(&path), 4);
    let (request_id, account_pickle_v4): (String, Vec<u8>) = {
        let connection = rusqlite::Connection::open(&path).unwrap();
        (
            connection
                .query_row("SELECT request_id FROM outgoing_requests", [], |r| r.get(0))
                .unwrap(),
            connection
                .query_row("SELECT pickle FROM account", [], |r| r.get(0))
                .unwrap(),
        )
    };

    let store = Arc::new(SqliteStore::open(&path, key.clone(), Synchronous::Normal).unwrap());
    assert_eq!(user_version(&path), 5);
    let bob = OlmMachine::open(BOB, "BOBPHONE", store.clone())
        .await
        .unwrap();

    // The results, in their batch and index order, with their content.
    let pending = bob.pending_decrypted_events().await.unwrap();
    let positions: Vec<(u64, u64, u64)> = pending
        .iter()
        .map(|p| (p.batch, p.index, p.event.content["seq"].as_u64().unwrap()))
        .collect();
    // Batches 1 and 2 were Dave's (see make.sh), acknowledged.
    assert_eq!(positions, [(3, 0, 0), (3, 1, 1), (3, 2, 2)]);
    assert!(pending.iter().all(|p| p.event.sender == ALICE
        && p.event.sender_device_verified
        && p.event.content["session_key"] == "fixture"));

    // The devices and the request, sealed now.
    let mut devices: Vec<String> = store
        .load_devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| format!("{}/{}", d.user_id, d.device_id))
        .collect();
    devices.sort();
    assert_eq!(
        devices,
        [
            "@alice:example.org/ALICEPHONE",
            "@carol:example.net/CAROLPHONE",
            "@dave:example.org/DAVEPHONE"
        ]
    );
    let requests = bob.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].request_id, request_id, "a request keeps its id");
    let OutgoingRequestKind::KeysClaim { body } = &requests[0].request else {
        panic!("expected the claim for Carol, got {:?}", requests[0]);
    };
    assert_eq!(
        body["one_time_keys"]["@carol:example.net"]["CAROLPHONE"],
        "signed_curve25519"
    );
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        for (table, text) in [
            ("devices", "curve25519:"),
            ("outgoing_requests", "one_time_keys"),
        ] {
            let plain: i64 = connection
                .query_row(
                    &format!(
                        "SELECT count(*) FROM {table} WHERE instr(data, CAST(?1 AS BLOB)) > 0"
                    ),
                    [text],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(plain, 0, "{table} still holds plain JSON");
        }
        let account_pickle: Vec<u8> = connection
            .query_row("SELECT pickle FROM account", [], |r| r.get(0))
            .unwrap();
        assert_ne!(
            account_pickle, account_pickle_v4,
            "the account is sealed again"
        );
        assert!(
            key.decrypt(&account_pickle, b"account").is_none(),
            "the version-4 context no longer opens the account"
        );
    }

    // The migrated session decrypts Alice's next messages, from a device known from /keys/query.
    let later: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("later.json")).unwrap()).unwrap();
    let later: Vec<String> = later.iter().map(|e| e.to_string()).collect();
    for (seq, outcome) in (3..).zip(bob.receive_to_device_events(&later).await.unwrap()) {
        let to_device_crypto::ToDeviceOutcome::Decrypted(event) = outcome else {
            panic!("message {seq} did not decrypt: {outcome:?}");
        };
        assert_eq!(event.content["seq"], seq);
        assert!(event.sender_device_verified);
    }

    // And everything survives a key rotation and a restart.
    let new_key = StoreKey::generate().unwrap();
    bob.rekey_store(new_key.clone()).await.unwrap();
    drop(bob);
    drop(store);
    let bob = open(&path, &new_key).await;
    assert_eq!(bob.pending_decrypted_events().await.unwrap().len(), 6);
    assert_eq!(bob.outgoing_requests().await.unwrap().len(), 1);
}

/// A wipe (logout) keeps a passphrase store's salt: the passphrase opens the wiped store, a new
/// account is made and used, and it opens again (a wipe that deleted the salt made the store
/// fail with WrongStoreKey for ever).
#[tokio::test]
async fn a_wiped_passphrase_store_opens_again_with_its_passphrase() {
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
    let first = open("correct horse battery staple").await.unwrap();
    let first_identity = first.identity_keys();
    publish(&first, 2).await;
    first.wipe().await.unwrap();
    drop(first);

    let bob = open("correct horse battery staple").await.unwrap();
    assert_ne!(
        bob.identity_keys(),
        first_identity,
        "a new account after the wipe"
    );
    let keys = publish(&bob, 1).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let to_bob = alice.create_session(&keys, None);
    let event = alice.encrypt(&to_bob, "m.room_key", json!({"after": "wipe"}));
    let decrypted = bob
        .decrypt_to_device_event(&event.to_string())
        .await
        .unwrap();
    assert_eq!(decrypted.content["after"], "wipe");
    let identity = bob.identity_keys();
    drop(bob);

    let again = open("correct horse battery staple").await.unwrap();
    assert_eq!(again.identity_keys(), identity);
    assert_eq!(again.pending_decrypted_events().await.unwrap().len(), 1);
    drop(again);
    assert!(matches!(
        open("Tr0ub4dor&3").await,
        Err(StoreError::WrongStoreKey)
    ));
}

/// A store made with a raw key has no salt: a passphrase does not open it, and the attempt
/// writes nothing (no salt is added to it).
#[tokio::test]
async fn a_passphrase_does_not_open_a_raw_key_store_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    drop(open(&path, &key).await);
    let before = std::fs::read(&path).unwrap();
    assert!(matches!(
        SqliteStore::open_with_passphrase(&path, "a passphrase", Synchronous::Normal),
        Err(StoreError::WrongStoreKey)
    ));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    open(&path, &key).await;
}

/// Pickles and decrypted results are secrets: the types that carry them print redacted `Debug`
/// output (a log line or a panic message must not leak them), and so does a memory store that
/// holds them.
#[tokio::test]
async fn debug_output_never_shows_pickles_or_decrypted_results() {
    use to_device_crypto::store::{
        Changes, CryptoStore, StoredAccount, StoredResult, StoredSession,
    };
    const SECRET: &str = "SECRET-PICKLE-OR-PLAINTEXT";
    let account = StoredAccount {
        user_id: BOB.to_owned(),
        device_id: "BOBPHONE".to_owned(),
        pickle: SECRET.to_owned(),
        device_keys_published: true,
    };
    let session = StoredSession {
        sender_key: "SENDERKEY".to_owned(),
        session_id: "SESSIONID".to_owned(),
        pickle: SECRET.to_owned(),
        last_used: 7,
    };
    let result = StoredResult {
        id: "RESULTID".to_owned(),
        batch: 1,
        index: 2,
        json: SECRET.to_owned(),
    };
    let changes = Changes {
        account: Some(account.clone()),
        sessions: vec![session.clone()],
        pending_results: vec![result.clone()],
        ..Changes::default()
    };
    let memory = to_device_crypto::MemoryStore::new();
    memory.save_changes(changes.clone()).await.unwrap();
    for (printed, shown) in [
        (format!("{account:?}"), "BOBPHONE"),
        (format!("{session:?}"), "SESSIONID"),
        (format!("{result:?}"), "RESULTID"),
        (format!("{changes:?}"), "SESSIONID"),
        (format!("{changes:#?}"), "RESULTID"),
        (format!("{memory:?}"), "BOBPHONE"),
        (format!("{memory:#?}"), "pending_results"),
    ] {
        assert!(!printed.contains(SECRET), "{printed}");
        assert!(
            printed.contains(shown),
            "{printed} should still say {shown}"
        );
    }
}

/// Two machines on one store (the app and the notification extension): one logs out (wipe) and
/// a new account is created; the other, opened before, must not adopt that identity nor write
/// its old account back — it fails with `Wiped` and the new identity stays.
#[tokio::test]
async fn a_machine_opened_before_another_wiped_the_store_stops_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let app = open(&path, &key).await;
    let extension = open(&path, &key).await;
    let old_identity = extension.identity_keys();
    app.wipe().await.unwrap();
    drop(app);
    let new_app = open(&path, &key).await;
    let new_identity = new_app.identity_keys();
    assert_ne!(new_identity, old_identity);

    for attempt in 0..2 {
        let error = extension.generate_one_time_keys(1).await.unwrap_err();
        assert!(
            matches!(error, StoreError::Wiped),
            "attempt {attempt}: {error}"
        );
    }
    assert!(matches!(
        extension.receive_to_device_events(&["{}"]).await,
        Err(StoreError::Wiped)
    ));
    drop(extension);
    assert_eq!(open(&path, &key).await.identity_keys(), new_identity);
    assert_eq!(new_app.identity_keys(), new_identity);
    new_app.generate_one_time_keys(1).await.unwrap();
}

/// The store half of "one identity": `create_account` is a plain insert in both stores — the
/// second of two creations gets the first account back and writes nothing, however close
/// together they come (the machine relies on it where no cross-process lock exists).
#[tokio::test]
async fn create_account_never_replaces_an_account() {
    use to_device_crypto::store::{AccountCreation, CryptoStore, StoredAccount};
    use to_device_crypto::MemoryStore;

    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn CryptoStore>; 2] = [
        Arc::new(new_sqlite_store(dir.path().join("account.sqlite3"))),
        Arc::new(MemoryStore::new()),
    ];
    let account = |pickle: &str| StoredAccount {
        user_id: BOB.to_owned(),
        device_id: "BOBPHONE".to_owned(),
        pickle: pickle.to_owned(),
        device_keys_published: false,
    };
    for store in stores {
        let generation = store.generation().await.unwrap();
        assert!(matches!(
            store.create_account(account("first")).await.unwrap(),
            AccountCreation::Created
        ));
        assert!(
            store.generation().await.unwrap() > generation,
            "a commit others notice"
        );
        match store.create_account(account("second")).await.unwrap() {
            AccountCreation::AlreadyExists(existing) => assert_eq!(existing.pickle, "first"),
            AccountCreation::Created => panic!("{store:?} replaced the account"),
        }
        assert_eq!(store.load_account().await.unwrap().unwrap().pickle, "first");
    }
}

/// Version 4 had no analytics outbox: a real version-4 store (`tests/fixtures/v4`, results
/// pending) is upgraded in place, keeps its results, and its new table holds payloads — failure
/// names and nothing else.
#[tokio::test]
async fn a_version_4_store_gains_the_analytics_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    std::fs::copy(fixture("store.sqlite3"), &path).unwrap();
    let key = StoreKey::from_hex(&std::fs::read_to_string(fixture("store.key")).unwrap()).unwrap();
    assert_eq!(user_version(&path), 4);
    let store = Arc::new(SqliteStore::open(&path, key, Synchronous::Normal).unwrap());
    assert_eq!(user_version(&path), 5);
    let bob = OlmMachine::open(BOB, "BOBPHONE", store).await.unwrap();
    assert_eq!(bob.pending_decrypted_events().await.unwrap().len(), 3);
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
