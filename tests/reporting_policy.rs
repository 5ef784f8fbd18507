//! The reporting policy end to end: once per message, the suppression window, the global cap, the
//! consent switch, persisted state and counts, and listener isolation over the FFI adapter.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::{FutureExt, StreamExt};
use serde_json::json;
use to_device_crypto::analytics::{AnalyticsDecision, ReportingPolicy, SuppressionRule};
use to_device_crypto::ffi::{
    self, DecryptionFailureListener, PosthogErrorEvent, ReportingPolicyFfi,
};
use to_device_crypto::simulator::tamper_with_body;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{FailureReason, FailureStream, OlmMachine, StoreKey};

fn drain(stream: &mut FailureStream) -> Vec<AnalyticsDecision> {
    let mut decisions = Vec::new();
    while let Some(Some(item)) = stream.next().now_or_never() {
        decisions.push(item.unwrap().analytics);
    }
    decisions
}

fn reported(decisions: &[AnalyticsDecision]) -> usize {
    decisions.iter().filter(|d| d.payload().is_some()).count()
}

async fn sqlite_bob(dir: &std::path::Path, key: &StoreKey) -> OlmMachine {
    let store =
        SqliteStore::open(dir.join("bob.sqlite3"), key.clone(), Synchronous::Normal).unwrap();
    OlmMachine::open(BOB, "BOBPHONE", Arc::new(store))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_wedged_session_yields_one_event_per_window_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let bob = sqlite_bob(dir.path(), &key).await;
    let keys = publish(&bob, 2).await;
    let (mut alice, to_bob) = established_peer(&bob, &keys, ALICE, "ALICEPHONE", 0).await;
    let mut wedged = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                tamper_with_body(alice.encrypt(&to_bob, "m.room_key", json!({"i": i}))).to_string()
            })
            .collect()
    };
    let mut failures = bob.to_device_decryption_failure_stream();
    bob.receive_to_device_events(&wedged(50)).await.unwrap();
    let decisions = drain(&mut failures);
    assert_eq!(decisions.len(), 50);
    assert_eq!(reported(&decisions), 1);
    assert!(decisions[1..]
        .iter()
        .all(|d| *d == AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow)));
    drop(bob);

    let bob = sqlite_bob(dir.path(), &key).await;
    let mut failures = bob.to_device_decryption_failure_stream();
    bob.receive_to_device_events(&wedged(10)).await.unwrap();
    assert_eq!(
        reported(&drain(&mut failures)),
        0,
        "the window survived the restart"
    );
    let stats = bob.reporting_stats().await;
    let wedged_stats = stats.total.failures[&FailureReason::SessionWedged];
    assert_eq!(
        (
            wedged_stats.seen,
            wedged_stats.reported,
            wedged_stats.suppressed_window
        ),
        (60, 1, 59)
    );
    // One message decrypted while the session was established; counted for the failure rate.
    assert_eq!(stats.total.decrypted, 1);
    // Summed over the hourly buckets: the two batches may straddle an hour boundary.
    let seen_per_hour: u64 = stats
        .hours
        .iter()
        .filter_map(|hour| hour.failures.get(&FailureReason::SessionWedged))
        .map(|counts| counts.seen)
        .sum();
    assert_eq!(seen_per_hour, 60);
}

#[tokio::test]
async fn a_redelivered_failure_is_never_reported_twice_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let open = || async {
        let store = SqliteStore::open(
            dir.path().join("bob.sqlite3"),
            key.clone(),
            Synchronous::Normal,
        )
        .unwrap();
        OlmMachine::open_with_policy(
            BOB,
            "BOBPHONE",
            Arc::new(store),
            ReportingPolicy::every_message(),
        )
        .await
        .unwrap()
    };
    let bob = open().await;
    let batch: Vec<String> = (0..5)
        .map(|i| json!({"type": "m.room.encrypted", "sender": format!("@s{i}:x"), "content": {"algorithm": "m.megolm.v1.aes-sha2"}}).to_string())
        .collect();
    let mut failures = bob.to_device_decryption_failure_stream();
    bob.receive_to_device_events(&batch).await.unwrap();
    assert_eq!(reported(&drain(&mut failures)), 5);
    bob.receive_to_device_events(&batch).await.unwrap();
    let again = drain(&mut failures);
    assert!(again
        .iter()
        .all(|d| *d == AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen)));
    drop(bob);
    let bob = open().await;
    let mut failures = bob.to_device_decryption_failure_stream();
    let outcomes = bob.receive_to_device_events(&batch).await.unwrap();
    assert_eq!(
        outcomes.len(),
        5,
        "the events still fail, each with its reason"
    );
    assert_eq!(reported(&drain(&mut failures)), 0);
}

#[tokio::test]
async fn the_global_cap_limits_payloads_per_minute() {
    let (bob, _store, _keys) = bob_with_store().await;
    bob.set_reporting_policy(ReportingPolicy {
        max_events_per_minute: Some(5),
        ..ReportingPolicy::every_message()
    })
    .await;
    let mut failures = bob.to_device_decryption_failure_stream();
    let batch: Vec<String> = (0..20).map(|i| format!("not json {i}")).collect();
    bob.receive_to_device_events(&batch).await.unwrap();
    let decisions = drain(&mut failures);
    assert_eq!(reported(&decisions), 5);
    assert_eq!(
        decisions
            .iter()
            .filter(|d| **d == AnalyticsDecision::Suppressed(SuppressionRule::GlobalCap))
            .count(),
        15
    );
    assert_eq!(
        bob.reporting_stats().await.total.failures[&FailureReason::MalformedEvent].suppressed_cap,
        15
    );
}

#[tokio::test]
async fn without_consent_nothing_is_produced_and_consent_does_not_replay() {
    let (bob, _store, _keys) = bob_with_store().await;
    let mut failures = bob.to_device_decryption_failure_stream();
    bob.set_analytics_enabled(false).await;
    bob.receive_to_device_events(&["not json 1", "not json 2"])
        .await
        .unwrap();
    let decisions = drain(&mut failures);
    assert_eq!(decisions.len(), 2, "the stream still carries every failure");
    assert!(decisions
        .iter()
        .all(|d| *d == AnalyticsDecision::Suppressed(SuppressionRule::AnalyticsDisabled)));
    bob.set_analytics_enabled(true).await;
    assert!(
        drain(&mut failures).is_empty(),
        "nothing was queued for later"
    );
    bob.receive_to_device_events(&["not json 3"]).await.unwrap();
    assert_eq!(reported(&drain(&mut failures)), 1);
    // The marks were still recorded while consent was off: a redelivery stays unreported.
    bob.receive_to_device_events(&["not json 1"]).await.unwrap();
    assert_eq!(
        drain(&mut failures),
        [AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen)]
    );
}

/// Bob over the FFI adapter, in memory, with a policy that reports every failure (no window, no
/// cap), so that each failure is one payload.
async fn ffi_bob_reporting_every_failure() -> std::sync::Arc<ffi::OlmMachine> {
    let machine = ffi::OlmMachine::open_in_memory(BOB.into(), "BOBPHONE".into())
        .await
        .unwrap();
    machine
        .set_reporting_policy(ReportingPolicyFfi {
            analytics_enabled: true,
            suppression_window_secs: 0,
            max_events_per_minute: None,
        })
        .await;
    machine
}

struct Blocking {
    delivered: AtomicUsize,
    block: Duration,
}

impl DecryptionFailureListener for Blocking {
    fn on_decryption_failure(&self, _: PosthogErrorEvent) {
        std::thread::sleep(self.block);
        self.delivered.fetch_add(1, Ordering::SeqCst);
    }
}

struct Panicking;

impl DecryptionFailureListener for Panicking {
    fn on_decryption_failure(&self, _: PosthogErrorEvent) {
        panic!("a buggy listener");
    }
}

#[derive(Default)]
struct Collecting(Mutex<Vec<PosthogErrorEvent>>);

impl DecryptionFailureListener for Collecting {
    fn on_decryption_failure(&self, event: PosthogErrorEvent) {
        self.0.lock().unwrap().push(event);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_and_panicking_listeners_disturb_neither_decryption_nor_each_other() {
    let machine = ffi_bob_reporting_every_failure().await;
    let blocking = Arc::new(Blocking {
        delivered: AtomicUsize::new(0),
        block: Duration::from_secs(2),
    });
    let collecting = Arc::new(Collecting::default());
    let _blocked = machine.add_decryption_failure_listener(blocking.clone());
    let _panicking = machine.add_decryption_failure_listener(Arc::new(Panicking));
    let _collecting = machine.add_decryption_failure_listener(collecting.clone());

    // 3,000 distinct failures while one listener sleeps for 2 s per payload.
    let total = 3000;
    for chunk in 0..30 {
        let batch: Vec<String> = (0..100)
            .map(|i| json!({"type": "m.room.encrypted", "sender": format!("@s{}:x", chunk * 100 + i), "content": {"algorithm": "m.megolm.v1.aes-sha2"}}).to_string())
            .collect();
        let results = machine
            .receive_to_device_events(
                serde_json::to_string(
                    &batch
                        .iter()
                        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(results.len(), 100, "decryption results are unaffected");
        // Paced like /sync batches: a healthy listener keeps up (its queue holds 256), whatever
        // the blocked one does.
        let expected = (chunk + 1) * 100;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while collecting.0.lock().unwrap().len() < expected && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The healthy listener got every payload, in order; the blocked one got almost none, and its
    // bounded queue dropped the oldest at once (counted), so memory stayed bounded.
    let collected: Vec<String> = collecting
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.json.clone())
        .collect();
    assert_eq!(collected.len(), total);
    let stats: serde_json::Value =
        serde_json::from_str(&machine.reporting_stats_json().await).unwrap();
    let drops = stats["listener_drops"].as_u64().unwrap();
    assert!(blocking.delivered.load(Ordering::SeqCst) < 5);
    let bound = (total - ffi::LISTENER_QUEUE_CAPACITY - 1) as u64;
    assert!(
        drops >= bound,
        "drops counted: {drops}, expected at least {bound}"
    );
    assert_eq!(
        stats["total"]["failures"]["UnsupportedAlgorithm"]["reported"],
        total
    );
}

/// Claims racing with deliveries: a claim that read the outbox just before a delivery's removal
/// committed must not queue the payload again once the delivery is recorded (each payload is
/// delivered once, however often the app flushes while listeners run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_with_deliveries_never_deliver_a_payload_twice() {
    let machine = ffi_bob_reporting_every_failure().await;
    let collecting = Arc::new(Collecting::default());
    let handle = machine.add_decryption_failure_listener(collecting.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flushers: Vec<_> = (0..2)
        .map(|_| {
            let machine = machine.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    machine.flush_pending_analytics().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let total = 2000;
    for chunk in 0..(total / 50) {
        let batch: Vec<serde_json::Value> = (0..50)
            .map(|i| json!({"type": "m.room.encrypted", "sender": format!("@s{}:x", chunk * 50 + i), "content": {"algorithm": "m.megolm.v1.aes-sha2"}}))
            .collect();
        machine
            .receive_to_device_events(serde_json::to_string(&batch).unwrap())
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for flusher in flushers {
        flusher.await.unwrap();
    }
    assert!(
        handle.flush(20_000).await,
        "every payload delivered in time"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&machine.reporting_stats_json().await).unwrap();
    assert_eq!(
        stats["total"]["failures"]["UnsupportedAlgorithm"]["reported"],
        total
    );
    assert_eq!(
        collecting.0.lock().unwrap().len(),
        total,
        "each payload delivered exactly once"
    );
}
