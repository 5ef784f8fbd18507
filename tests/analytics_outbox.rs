//! The analytics outbox: payloads survive a kill between their commit and their delivery, a
//! restart, a lagging subscriber and a huge batch; each is reported once across two processes; a
//! throwing listener gets its payload again and cannot grow the outbox without bound.
//!
//! Kills are real: the test re-runs its own binary as a child (`child_*` functions below, selected
//! by `TDC_ANALYTICS_CHILD`) with the `after_commit` fail point, which aborts the process right
//! after the batch committed, before anything was delivered.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::{FutureExt, StreamExt};
use serde_json::json;
use to_device_crypto::analytics::ReportingPolicy;
use to_device_crypto::ffi::{self, DecryptionFailureListener, PosthogErrorEvent};
use to_device_crypto::store::{
    AnalyticsClaim, Changes, CryptoStore, SqliteStore, StoredAnalytics, Synchronous,
    MAX_ANALYTICS_DELIVERY_ATTEMPTS, MAX_PENDING_ANALYTICS,
};
use to_device_crypto::{MemoryStore, OlmMachine, StoreKey};

const CHILD_ENV: &str = "TDC_ANALYTICS_CHILD";
const STORE_ENV: &str = "TDC_ANALYTICS_CHILD_STORE";
/// A fixed key: parent and child open the same store.
const KEY: [u8; 32] = [7; 32];

fn key() -> StoreKey {
    StoreKey::from_bytes(KEY)
}

/// A Megolm event sent as to-device: fails with UnsupportedAlgorithm, one window key per sender.
fn megolm_event(sender: &str, n: usize) -> String {
    json!({"type": "m.room.encrypted", "sender": sender, "content": {"algorithm": "m.megolm.v1.aes-sha2", "n": n}})
        .to_string()
}

async fn open_sqlite(path: &Path, policy: ReportingPolicy) -> OlmMachine {
    let store = SqliteStore::open(path, key(), Synchronous::Normal).unwrap();
    OlmMachine::open_with_policy(BOB, "BOBPHONE", Arc::new(store), policy)
        .await
        .unwrap()
}

/// Runs `child` in a new process of this test binary; returns whether it exited normally.
fn run_child(child: &str, store: &Path, fail_point: Option<&str>) -> bool {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([child, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, child)
        .env(STORE_ENV, store);
    match fail_point {
        Some(point) => command.env("TDC_FAIL_POINT", point),
        None => command.env_remove("TDC_FAIL_POINT"),
    };
    let output = command.output().unwrap();
    output.status.success()
}

fn child_store() -> Option<std::path::PathBuf> {
    std::env::var_os(STORE_ENV).map(Into::into)
}

/// Child: decrypts a batch with three failures from three senders (three payloads), with a short
/// lease so the parent need not wait a minute for the abandoned claims. Every distinct message is
/// reported (no window, no cap), so only the once-per-message marks keep a redelivery quiet.
#[tokio::test]
async fn child_decrypts_three_failures() {
    let Some(store) = child_store() else { return };
    let bob = open_sqlite(&store, ReportingPolicy::every_message()).await;
    bob.set_analytics_lease(Duration::from_millis(300));
    let batch: Vec<String> = (0..3)
        .map(|i| megolm_event(&format!("@s{i}:x"), i))
        .collect();
    bob.receive_to_device_events(&batch).await.unwrap();
    // Never acknowledged: the process ends (or is killed at `after_commit` before this line).
}

fn names(payloads: &[to_device_crypto::PendingAnalyticsEvent]) -> Vec<String> {
    payloads
        .iter()
        .map(|p| p.event.reason().analytics_name().to_owned())
        .collect()
}

/// Also two processes on one store: the "extension" (the child) fails three messages and is killed
/// before delivering; the "app" gets the same messages redelivered and reports none of them again,
/// and delivers the extension's three payloads once.
#[tokio::test]
async fn a_kill_after_the_commit_and_before_delivery_loses_no_payload() {
    if child_store().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    drop(open_sqlite(&path, ReportingPolicy::every_message()).await);
    assert!(
        !run_child("child_decrypts_three_failures", &path, Some("after_commit")),
        "the fail point aborts the child"
    );
    let app = open_sqlite(&path, ReportingPolicy::every_message()).await;
    // The killed process's claims hold for their lease; then its payloads are the app's.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pending = app.flush_pending_analytics().await.unwrap();
    assert_eq!(
        names(&pending),
        vec!["ToDeviceFailedToDecrypt_UnsupportedAlgorithm"; 3]
    );
    app.acknowledge_analytics(&pending.iter().map(|p| p.id).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(app.flush_pending_analytics().await.unwrap().is_empty());
    // The marks committed with the payloads: the redelivered batch is not reported again.
    let batch: Vec<String> = (0..3)
        .map(|i| megolm_event(&format!("@s{i}:x"), i))
        .collect();
    app.receive_to_device_events(&batch).await.unwrap();
    assert!(app.flush_pending_analytics().await.unwrap().is_empty());
    let seen = &app.reporting_stats().await.total.failures
        [&to_device_crypto::FailureReason::UnsupportedAlgorithm];
    assert_eq!(
        (seen.seen, seen.reported, seen.suppressed_already_seen),
        (6, 3, 3)
    );
    assert_eq!(app.reporting_stats().await.outbox.pending, 0);
}

#[tokio::test]
async fn a_kill_before_the_commit_leaves_neither_mark_nor_payload() {
    if child_store().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    drop(open_sqlite(&path, ReportingPolicy::default()).await);
    assert!(!run_child(
        "child_decrypts_three_failures",
        &path,
        Some("before_commit")
    ));
    let app = open_sqlite(&path, ReportingPolicy::every_message()).await;
    assert!(app.flush_pending_analytics().await.unwrap().is_empty());
    // The batch is decided afresh when it comes again.
    let batch: Vec<String> = (0..3)
        .map(|i| megolm_event(&format!("@s{i}:x"), i))
        .collect();
    app.receive_to_device_events(&batch).await.unwrap();
    assert_eq!(app.flush_pending_analytics().await.unwrap().len(), 3);
}

#[tokio::test]
async fn undelivered_payloads_survive_a_restart_and_wait_for_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    let first = open_sqlite(&path, ReportingPolicy::default()).await;
    first.set_analytics_lease(Duration::from_millis(500));
    let mut stream = first.to_device_decryption_failure_stream();
    first
        .receive_to_device_events(&[megolm_event("@a:x", 0), megolm_event("@b:x", 1)])
        .await
        .unwrap();
    let item = stream.next().await.unwrap().unwrap();
    let id = item
        .analytics_id
        .expect("a reported failure carries its id");
    assert_eq!(
        item.payload().unwrap().reason().analytics_name(),
        "ToDeviceFailedToDecrypt_UnsupportedAlgorithm"
    );
    // The first payload was sent and acknowledged; the second never was.
    first.acknowledge_analytics(&[id]).await.unwrap();
    drop(first);

    let started = Instant::now();
    let second = open_sqlite(&path, ReportingPolicy::default()).await;
    let early = second.flush_pending_analytics().await.unwrap();
    if started.elapsed() < Duration::from_millis(400) {
        assert!(
            early.is_empty(),
            "a live claim of another instance is left alone"
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pending = second.flush_pending_analytics().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert!(
        pending[0].id > id,
        "the unacknowledged one, not the acknowledged one"
    );
    assert_eq!(second.reporting_stats().await.outbox.pending, 1);
    second
        .acknowledge_analytics(&[pending[0].id])
        .await
        .unwrap();
    assert_eq!(second.reporting_stats().await.outbox.pending, 0);
}

/// 5,000 failures from one sender in one batch, with a subscriber that reads nothing until the
/// end (it lags by far more than the stream's 1,024 items).
async fn five_thousand_failures(policy: ReportingPolicy) -> (usize, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let bob = open_sqlite(&dir.path().join("store.sqlite3"), policy).await;
    let mut lagging = bob.to_device_decryption_failure_stream();
    let batch: Vec<String> = (0..5_000).map(|n| megolm_event("@mallory:x", n)).collect();
    bob.receive_to_device_events(&batch).await.unwrap();
    let mut missed = 0;
    let mut seen_ids = 0;
    while let Some(Some(item)) = lagging.next().now_or_never() {
        match item {
            Ok(failure) => seen_ids += u64::from(failure.analytics_id.is_some()),
            Err(lag) => missed += lag.missed,
        }
    }
    assert!(missed > 0, "the subscriber lagged");
    let stats = bob.reporting_stats().await;
    let reported =
        stats.total.failures[&to_device_crypto::FailureReason::UnsupportedAlgorithm].reported;
    let pending = bob.flush_pending_analytics().await.unwrap();
    assert_eq!(stats.outbox.pending, pending.len() as u64);
    assert!(seen_ids <= pending.len() as u64);
    (pending.len(), reported, missed)
}

#[tokio::test]
async fn a_batch_of_5000_failures_from_one_sender_yields_exactly_the_payloads_the_policy_allows() {
    // Defaults: one per (sender, key, name) per hour.
    let (pending, reported, _) = five_thousand_failures(ReportingPolicy::default()).await;
    assert_eq!((pending, reported), (1, 1));
    // No window, the cap of 30 a minute.
    let capped = ReportingPolicy {
        suppression_window_secs: 0,
        ..ReportingPolicy::default()
    };
    let (pending, reported, _) = five_thousand_failures(capped).await;
    assert_eq!((pending, reported), (30, 30));
    // Every distinct message: all 5,000, whatever the subscriber missed.
    let (pending, reported, missed) =
        five_thousand_failures(ReportingPolicy::every_message()).await;
    assert_eq!((pending, reported), (5_000, 5_000));
    assert!(missed >= 5_000 - 1_024);
}

#[tokio::test]
async fn the_outbox_keeps_at_most_its_bound_dropping_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open(dir.path().join("s.sqlite3"), key(), Synchronous::Normal).unwrap();
    let memory = MemoryStore::new();
    let stores: [&dyn CryptoStore; 2] = [&sqlite, &memory];
    for store in stores {
        let over = 50;
        let analytics = (0..MAX_PENDING_ANALYTICS + over)
            .map(|id| StoredAnalytics {
                id,
                name: "ToDeviceFailedToDecrypt_SessionWedged".to_owned(),
                created_at: 1,
            })
            .collect();
        store
            .save_changes(Changes {
                analytics,
                ..Changes::default()
            })
            .await
            .unwrap();
        let stats = store.analytics_outbox_stats().await.unwrap();
        assert_eq!(stats.pending, MAX_PENDING_ANALYTICS);
        assert_eq!(stats.dropped_full, over);
        let claim = AnalyticsClaim {
            owner: [1; 16],
            lease_until: 10,
        };
        let oldest = store.claim_analytics(claim, 2, 1).await.unwrap();
        assert_eq!(oldest[0].id, over, "the oldest were dropped");
        // Another owner cannot claim it while the lease holds, and can once it ended.
        let other = AnalyticsClaim {
            owner: [2; 16],
            lease_until: 100,
        };
        let claimed = store.claim_analytics(other, 5, 1).await.unwrap();
        assert_eq!(claimed[0].id, over + 1);
        let claimed = store.claim_analytics(other, 10, 1).await.unwrap();
        assert_eq!(claimed[0].id, over, "an ended lease is abandoned");
    }
}

/// A listener that throws its first `throws` calls, then collects.
struct Flaky {
    calls: AtomicUsize,
    throws: usize,
    collected: Mutex<Vec<PosthogErrorEvent>>,
}

impl Flaky {
    fn new(throws: usize) -> Arc<Self> {
        quiet_listener_panics();
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            throws,
            collected: Mutex::new(Vec::new()),
        })
    }
}

const THROWN: &str = "the app's analytics client is not ready";

/// Keeps the listener's expected panics quiet (printing a backtrace takes long enough to blur
/// the order of deliveries); every other panic is reported as usual.
fn quiet_listener_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if message != Some(THROWN) {
                default(info);
            }
        }));
    });
}

impl DecryptionFailureListener for Flaky {
    fn on_decryption_failure(&self, event: PosthogErrorEvent) {
        // A foreign exception comes back from UniFFI as a panic: the same path.
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.throws {
            panic!("{}", THROWN);
        }
        self.collected.lock().unwrap().push(event);
    }
}

async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn outbox_stats(machine: &ffi::OlmMachine) -> serde_json::Value {
    let stats: serde_json::Value =
        serde_json::from_str(&machine.reporting_stats_json().await).unwrap();
    stats["outbox"].clone()
}

async fn wait_for_pending(machine: &ffi::OlmMachine, pending: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while outbox_stats(machine).await["pending"] != pending {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn events_json(events: &[String]) -> String {
    format!("[{}]", events.join(","))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throwing_listener_leaves_its_payload_for_the_next_delivery() {
    let machine = ffi::OlmMachine::open_in_memory(BOB.into(), "BOBPHONE".into())
        .await
        .unwrap();
    let listener = Flaky::new(1);
    let handle = machine.add_decryption_failure_listener(listener.clone());
    // The claim made when a listener is added is done (nothing was pending).
    assert!(handle.flush(5_000).await);
    machine
        .receive_to_device_events(events_json(&[megolm_event("@a:x", 0)]))
        .await
        .unwrap();
    wait_for("the first call", || {
        listener.calls.load(Ordering::SeqCst) == 1
    })
    .await;
    // The throw released the payload: it waits for the next delivery, not delivered meanwhile.
    wait_for_pending(&machine, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(listener.collected.lock().unwrap().is_empty());
    assert_eq!(machine.flush_pending_analytics().await.unwrap(), 1);
    wait_for("the second delivery", || {
        listener.collected.lock().unwrap().len() == 1
    })
    .await;
    wait_for_pending(&machine, 0).await;
    assert_eq!(
        listener.collected.lock().unwrap()[0].analytics_name,
        "ToDeviceFailedToDecrypt_UnsupportedAlgorithm"
    );
    // Delivered once: nothing more goes out.
    assert_eq!(machine.flush_pending_analytics().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listener_that_always_throws_cannot_grow_the_outbox_without_bound() {
    let machine = ffi::OlmMachine::open_in_memory(BOB.into(), "BOBPHONE".into())
        .await
        .unwrap();
    let listener = Flaky::new(usize::MAX);
    let handle = machine.add_decryption_failure_listener(listener.clone());
    assert!(handle.flush(5_000).await);
    // One new payload per batch; each batch also retries every earlier one.
    let batches = 12;
    for n in 0..batches {
        machine
            .receive_to_device_events(events_json(&[megolm_event(&format!("@s{n}:x"), n)]))
            .await
            .unwrap();
        let pending = outbox_stats(&machine).await["pending"].as_u64().unwrap();
        assert!(
            pending <= u64::from(MAX_ANALYTICS_DELIVERY_ATTEMPTS),
            "{pending} payloads pending after batch {n}"
        );
        // Let this batch's deliveries finish before the next one.
        let expected: usize = (0..=n)
            .map(|k| (n - k + 1).min(MAX_ANALYTICS_DELIVERY_ATTEMPTS as usize))
            .sum();
        let deadline = Instant::now() + Duration::from_secs(20);
        while listener.calls.load(Ordering::SeqCst) < expected {
            assert!(
                Instant::now() < deadline,
                "batch {n}: {} calls, expected {expected}; outbox {}",
                listener.calls.load(Ordering::SeqCst),
                outbox_stats(&machine).await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The last call's release commits just after it threw.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = outbox_stats(&machine).await;
    let attempts = u64::from(MAX_ANALYTICS_DELIVERY_ATTEMPTS);
    assert_eq!(stats["pending"], attempts - 1);
    assert_eq!(
        stats["dropped_undeliverable"],
        batches as u64 - (attempts - 1)
    );
    assert!(listener.collected.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listener_added_after_a_restart_gets_what_an_earlier_run_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite3");
    {
        let earlier = open_sqlite(&path, ReportingPolicy::default()).await;
        earlier.set_analytics_lease(Duration::from_millis(1));
        earlier
            .receive_to_device_events(&[megolm_event("@a:x", 0), megolm_event("@b:x", 0)])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let machine = ffi::OlmMachine::open_sqlite(
        BOB.into(),
        "BOBPHONE".into(),
        path.to_str().unwrap().into(),
        KEY.to_vec(),
    )
    .await
    .unwrap();
    let listener = Flaky::new(0);
    let _handle = machine.add_decryption_failure_listener(listener.clone());
    wait_for("the leftovers", || {
        listener.collected.lock().unwrap().len() == 2
    })
    .await;
    wait_for_pending(&machine, 0).await;
}
