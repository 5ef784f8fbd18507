//! Someone who can write the SQLite file but does not hold the store key (a backup tool, another
//! app with access to the container, malware) edits rows. Every sealed value is bound to its row,
//! so an edited row is refused: the account and the outbox with `StoreError::Corrupted` (the
//! machine cannot go on without its identity, and must not deliver results in an order it cannot
//! vouch for), a session, another device's keys or an outgoing request dropped with a warning (as
//! if the row had been deleted, which nobody can detect): the machine goes on and recovers.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use to_device_crypto::simulator::{Recipient, SimulatedDevice};
use to_device_crypto::store::{CryptoStore, SqliteStore, Synchronous};
use to_device_crypto::{
    FailureReason, OlmMachine, OpenError, StoreError, StoreKey, ToDeviceOutcome,
};

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    key: StoreKey,
    alice: SimulatedDevice,
    to_bob_from_alice: Recipient,
    carol: SimulatedDevice,
    to_bob_from_carol: Recipient,
}

fn sqlite(path: &Path, key: &StoreKey) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(path, key.clone(), Synchronous::Normal).unwrap())
}

async fn bob(fixture: &Fixture) -> Result<OlmMachine, OpenError> {
    OlmMachine::open(BOB, "BOBPHONE", sqlite(&fixture.path, &fixture.key)).await
}

fn edit(fixture: &Fixture, sql: &str) {
    rusqlite::Connection::open(&fixture.path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// Bob on SQLite knowing Alice and Carol from /keys/query, with a session with each, and two
/// batches of pending results: batch 2 = Alice's n 0, 1; batch 3 = Alice's n 2, 3 (batch 1,
/// Carol's first message, is acknowledged).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let key = StoreKey::generate().unwrap();
    let bob = OlmMachine::open(BOB, "BOBPHONE", sqlite(&path, &key))
        .await
        .unwrap();
    let keys = publish(&bob, 2).await;
    let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
    let mut carol = SimulatedDevice::new(CAROL, "CAROLPHONE");
    for device in [&alice, &carol] {
        bob.receive_keys_query_response(&device.keys_query_response())
            .await
            .unwrap();
    }
    let to_bob_from_alice = alice.create_session(&keys, Some(keys.one_time_keys[0].key));
    let to_bob_from_carol = carol.create_session(&keys, Some(keys.one_time_keys[1].key));
    let hello = carol.encrypt(&to_bob_from_carol, "m.dummy", json!({}));
    bob.receive_to_device_events(&[hello.to_string()])
        .await
        .unwrap();
    for batch in [[0, 1], [2, 3]] {
        let events: Vec<String> = batch
            .iter()
            .map(|n| {
                alice
                    .encrypt(&to_bob_from_alice, "m.room_key", json!({ "n": n }))
                    .to_string()
            })
            .collect();
        bob.receive_to_device_events(&events).await.unwrap();
    }
    // Carol's hello is acknowledged: only Alice's four results are pending.
    let pending = bob.pending_decrypted_events().await.unwrap();
    bob.acknowledge(&[pending[0].event.id.clone()])
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        path,
        key,
        alice,
        to_bob_from_alice,
        carol,
        to_bob_from_carol,
    }
}

fn pending_order(results: &[to_device_crypto::PendingDecryptedEvent]) -> Vec<u64> {
    results
        .iter()
        .map(|p| p.event.content["n"].as_u64().unwrap())
        .collect()
}

fn assert_outbox_corrupted(
    result: Result<Vec<to_device_crypto::PendingDecryptedEvent>, StoreError>,
) {
    match result {
        Err(StoreError::Corrupted { what, .. }) => assert_eq!(what, "decrypted results"),
        Ok(results) => panic!(
            "the edited outbox was accepted, in the order {:?}",
            pending_order(&results)
        ),
        Err(other) => panic!("expected Corrupted, got {other}"),
    }
}

#[tokio::test]
async fn the_untouched_fixture_lists_the_results_in_order() {
    let fixture = fixture().await;
    let bob = bob(&fixture).await.unwrap();
    let pending = bob.pending_decrypted_events().await.unwrap();
    assert_eq!(pending_order(&pending), [0, 1, 2, 3]);
    let positions: Vec<(u64, u64)> = pending.iter().map(|p| (p.batch, p.index)).collect();
    assert_eq!(positions, [(2, 0), (2, 1), (3, 0), (3, 1)]);
}

/// Exchanges `column` between the two rows of `table` that `filter` selects (through a copy, so
/// that each row gets the other's original value).
fn swap(table: &str, column: &str, key: &str, filter: &str) -> String {
    format!(
        "CREATE TEMP TABLE original AS SELECT {key} AS k, {column} AS v FROM {table} WHERE {filter};
         UPDATE {table} SET {column} = (SELECT v FROM original WHERE k != {table}.{key})
         WHERE {filter};
         DROP TABLE original;"
    )
}

/// Swapping two rows' positions (the plain columns the outbox sorts by) was accepted and
/// delivered the results in another order; the positions are now sealed with the results.
#[tokio::test]
async fn swapped_pending_results_are_refused() {
    let fixture = fixture().await;
    edit(&fixture, &swap("pending_results", "idx", "id", "batch = 2"));
    let bob = bob(&fixture).await.unwrap();
    assert_outbox_corrupted(bob.pending_decrypted_events().await);
}

#[tokio::test]
async fn a_rewritten_index_or_batch_is_refused() {
    for sql in [
        "UPDATE pending_results SET idx = 7 WHERE batch = 3 AND idx = 1;".to_owned(),
        "UPDATE pending_results SET batch = 4 WHERE batch = 3 AND idx = 1;".to_owned(),
        // The first result of each batch exchanging their positions (batch and index).
        swap("pending_results", "batch", "id", "idx = 0"),
        // The first result of each batch pointing at the other batch's sealed value.
        swap("pending_results", "result_batch", "id", "idx = 0"),
    ] {
        let fixture = fixture().await;
        edit(&fixture, &sql);
        let bob = bob(&fixture).await.unwrap();
        assert_outbox_corrupted(bob.pending_decrypted_events().await);
    }
}

/// The two batches' sealed values swapped between their rows (each row pointing at the other's
/// results, batch column included).
#[tokio::test]
async fn a_sealed_batch_moved_to_another_row_is_refused() {
    let fixture = fixture().await;
    edit(
        &fixture,
        &(swap("result_batches", "data", "id", "batch IN (2, 3)")
            + &swap("result_batches", "batch", "id", "batch IN (2, 3)")
            + "UPDATE pending_results SET batch = CASE batch WHEN 2 THEN 3 ELSE 2 END;"),
    );
    let bob = bob(&fixture).await.unwrap();
    assert_outbox_corrupted(bob.pending_decrypted_events().await);
}

/// The account row edited to another device id: our identity must not open as that device.
#[tokio::test]
async fn an_account_moved_to_another_device_id_does_not_open() {
    let fixture = fixture().await;
    edit(&fixture, "UPDATE account SET device_id = 'MALLORYPHONE';");
    let error = OlmMachine::open(BOB, "MALLORYPHONE", sqlite(&fixture.path, &fixture.key))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            OpenError::Store(StoreError::Corrupted {
                what: "account pickle",
                ..
            })
        ),
        "{error}"
    );
}

/// Alice's session pickle moved under Carol's sender key: it is not used for Carol (it is
/// dropped with a warning), Carol's message fails as one with no session — and recovery starts —
/// while Alice's message in the same batch still decrypts: one bad row does not fail every batch.
#[tokio::test]
async fn a_session_moved_to_another_sender_key_is_dropped_and_recovered() {
    let mut fixture = fixture().await;
    let alice_key = fixture.alice.curve25519_key().to_base64();
    let carol_key = fixture.carol.curve25519_key().to_base64();
    // Alice's pickle copied into Carol's row (the row keeps Carol's identity).
    edit(
        &fixture,
        &format!(
            "UPDATE sessions SET pickle = (SELECT pickle FROM sessions WHERE sender_key = '{alice_key}')
             WHERE sender_key = '{carol_key}';"
        ),
    );
    let store = sqlite(&fixture.path, &fixture.key);
    assert!(store.load_sessions(&carol_key).await.unwrap().is_empty());
    let bob = OlmMachine::open(BOB, "BOBPHONE", store).await.unwrap();
    let from_carol = fixture
        .carol
        .encrypt(&fixture.to_bob_from_carol, "m.dummy", json!({}));
    let from_alice =
        fixture
            .alice
            .encrypt(&fixture.to_bob_from_alice, "m.room_key", json!({ "n": 4 }));
    let outcomes = bob
        .receive_to_device_events(&[from_carol.to_string(), from_alice.to_string()])
        .await
        .unwrap();
    match &outcomes[0] {
        // Carol never got a reply, so her message is a pre-key message whose one-time key is
        // used: it cannot create the session again.
        ToDeviceOutcome::Failed(failed) => assert!(
            failed.error.reason().needs_new_session(),
            "{:?}",
            failed.error
        ),
        other => panic!("Carol's message decrypted with a moved session: {other:?}"),
    }
    assert!(matches!(&outcomes[1], ToDeviceOutcome::Decrypted(e) if e.content["n"] == 4));
    let requests = bob.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "recovery queued a claim for Carol");
}

/// Another device's keys decide whether a message's `keys.ed25519` is accepted. Edited keys —
/// here Alice's and Carol's sealed rows exchanged, or Mallory's self-signed keys written under
/// Alice's ids — are dropped, not trusted: Alice's genuine message is then judged by its own
/// `sender_device_keys`, and one without them is MissingSigningKey.
#[tokio::test]
async fn edited_device_keys_are_dropped_not_trusted() {
    let mallory = SimulatedDevice::new(ALICE, "ALICEPHONE");
    for sql in [
        swap("devices", "data", "id", "1"),
        format!(
            "UPDATE devices SET data = CAST('{}' AS BLOB) WHERE device_id = 'ALICEPHONE';",
            mallory.device_keys()
        ),
    ] {
        let mut fixture = fixture().await;
        edit(&fixture, &sql);
        let store = sqlite(&fixture.path, &fixture.key);
        let devices = store.load_devices().await.unwrap();
        assert!(
            devices.iter().all(|d| d.device_id != "ALICEPHONE"),
            "{sql}: {devices:?}"
        );
        let bob = OlmMachine::open(BOB, "BOBPHONE", store).await.unwrap();
        let to_bob = fixture.to_bob_from_alice.clone();
        let with_keys = fixture
            .alice
            .plaintext(&to_bob, "m.dummy", json!({"with": "keys"}), true);
        let with_keys = fixture
            .alice
            .encrypt_raw(&to_bob, with_keys.to_string().as_bytes());
        let without_keys = fixture
            .alice
            .plaintext(&to_bob, "m.dummy", json!({}), false);
        let without_keys = fixture
            .alice
            .encrypt_raw(&to_bob, without_keys.to_string().as_bytes());
        let outcomes = bob
            .receive_to_device_events(&[with_keys.to_string(), without_keys.to_string()])
            .await
            .unwrap();
        assert!(
            matches!(&outcomes[0], ToDeviceOutcome::Decrypted(e) if e.sender_device_verified),
            "{sql}: {:?}",
            outcomes[0]
        );
        assert!(
            matches!(&outcomes[1], ToDeviceOutcome::Failed(f)
                if f.error.reason() == FailureReason::MissingSigningKey),
            "{sql}: {:?}",
            outcomes[1]
        );
    }
}

/// An outgoing request is what the app sends on our behalf: an edited one (here moved in time,
/// or its sealed body exchanged with another request's) is dropped, not sent.
#[tokio::test]
async fn edited_outgoing_requests_are_dropped_not_sent() {
    let mut fixture = fixture().await;
    let bob = bob(&fixture).await.unwrap();
    // Two recoveries queue two claims: messages from Alice and Carol that need new sessions.
    for (device, to_bob) in [
        (&mut fixture.alice, &fixture.to_bob_from_alice),
        (&mut fixture.carol, &fixture.to_bob_from_carol),
    ] {
        let mut wedged: Value = device.encrypt(to_bob, "m.dummy", json!({}));
        wedged = to_device_crypto::simulator::tamper_with_body(wedged);
        bob.receive_to_device_events(&[wedged.to_string()])
            .await
            .unwrap();
    }
    let requests = bob.outgoing_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    drop(bob);
    for sql in [
        format!(
            "UPDATE outgoing_requests SET created_at = 1 WHERE request_id = '{}';",
            requests[0].request_id
        ),
        swap("outgoing_requests", "data", "request_id", "1"),
    ] {
        let copy = tempfile::tempdir().unwrap();
        let path = copy.path().join("store.sqlite3");
        rusqlite::Connection::open(&fixture.path)
            .unwrap()
            .execute("VACUUM INTO ?1", [path.to_str().unwrap()])
            .unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(&sql)
            .unwrap();
        let bob = OlmMachine::open(BOB, "BOBPHONE", sqlite(&path, &fixture.key))
            .await
            .unwrap();
        let left = bob.outgoing_requests().await.unwrap();
        let expected = if sql.contains("created_at") { 1 } else { 0 };
        assert_eq!(left.len(), expected, "{sql}: {left:?}");
    }
}
