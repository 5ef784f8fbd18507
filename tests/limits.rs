//! Size and nesting limits on hostile to-device input, proven with a counting allocator: a 50 MB
//! event and a 10-million-deep nesting are rejected with `MalformedEvent`, through
//! `decrypt_to_device_event` and through `split_events` + `receive_to_device_events`, without the
//! machine allocating more than a small constant beyond the input. Behaviour and memory only,
//! never wall time.
//!
//! Also the regression tests of the fuzzing findings (see docs/FUZZING.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::{
    parse_keys_query_response, parse_keys_upload_body, DeviceKeys,
};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, SimulatedDevice};
use to_device_crypto::sync_input::split_events;
use to_device_crypto::{FailureReason, OlmMachine, ToDeviceOutcome};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MB: usize = 1024 * 1024;
/// What the machine may allocate on top of the input while rejecting it.
const SMALL: usize = MB;

/// Serializes the tests of this binary, so that the counters see one test at a time.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` and returns its result and the peak of heap bytes it added over what was live before.
fn peak_extra<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let result = f();
    let peak = PEAK.load(Ordering::SeqCst);
    (result, peak.saturating_sub(base))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Bob, and a real Olm event from Alice to Bob.
fn bob_and_event(runtime: &tokio::runtime::Runtime) -> (OlmMachine, Value) {
    runtime.block_on(async {
        let bob = OlmMachine::in_memory("@bob:example.org", "BOBPHONE")
            .await
            .unwrap();
        let keys = publish_machine_keys(&bob, 2).await.unwrap();
        let mut alice = SimulatedDevice::new("@alice:example.org", "ALICEPHONE");
        let to_bob = alice.create_session(&keys, None);
        let event = alice.encrypt(&to_bob, "m.room_key", json!({"session_id": "s"}));
        (bob, event)
    })
}

/// A real event padded to `size` bytes with a field inside `content`.
fn padded_event(event: &Value, size: usize) -> String {
    let text = event.to_string();
    let prefix = r#"{"padding":""#;
    let body = text.strip_prefix('{').expect("an object");
    let fill = size.saturating_sub(text.len() + prefix.len() + 2);
    let mut out = String::with_capacity(size);
    out.push_str(prefix);
    out.push_str(&"A".repeat(fill));
    out.push_str("\",");
    out.push_str(body);
    out
}

/// `(label, input, whether the input is valid JSON)`.
fn hostile_inputs(event: &Value) -> Vec<(&'static str, String, bool)> {
    let mut nested = json!(1);
    for _ in 0..65 {
        nested = json!([nested]);
    }
    let mut too_deep = event.clone();
    too_deep["content"]["nested"] = nested;
    vec![
        ("50 MB event", padded_event(event, 50 * MB), true),
        ("10 million [", "[".repeat(10_000_000), false),
        ("1 million {\"a\":", r#"{"a":"#.repeat(1_000_000), false),
        // Under the size limit, over the depth limit.
        ("200 000 [ (under 256 KiB)", "[".repeat(200_000), false),
        ("depth 65 inside a real event", too_deep.to_string(), true),
    ]
}

fn assert_malformed(outcome: &ToDeviceOutcome, label: &str) {
    match outcome {
        ToDeviceOutcome::Failed(failed) => assert_eq!(
            failed.error.reason(),
            FailureReason::MalformedEvent,
            "{label}: {}",
            failed.error
        ),
        other => panic!("{label}: expected MalformedEvent, got {other:?}"),
    }
}

#[test]
fn huge_and_deep_events_are_rejected_by_decrypt_to_device_event_in_constant_memory() {
    let _guard = exclusive();
    let runtime = runtime();
    let (bob, event) = bob_and_event(&runtime);
    let mut failures = bob.to_device_decryption_failure_stream();
    for (label, input, _) in hostile_inputs(&event) {
        let (result, extra) = peak_extra(|| runtime.block_on(bob.decrypt_to_device_event(&input)));
        let error = result.expect_err(label);
        assert_eq!(
            error.reason(),
            FailureReason::MalformedEvent,
            "{label}: {error}"
        );
        assert!(
            extra < SMALL,
            "{label}: rejecting a {} byte input allocated {extra} bytes",
            input.len()
        );
        let item = failures.next().now_or_never().flatten().expect("one item");
        assert_eq!(item.unwrap().reason, FailureReason::MalformedEvent);
    }
    // The machine still decrypts the real event afterwards.
    runtime
        .block_on(bob.decrypt_to_device_event(&event.to_string()))
        .expect("the real event decrypts");
}

#[test]
fn huge_and_deep_events_are_rejected_through_split_events_and_receive_to_device_events() {
    let _guard = exclusive();
    let runtime = runtime();
    let (bob, event) = bob_and_event(&runtime);
    for (label, hostile, hostile_is_json) in hostile_inputs(&event) {
        // The shapes the CLI accepts: a bare event (or line), an array, a /sync response.
        let mut wrapped = vec![("bare", hostile.clone())];
        if hostile_is_json {
            wrapped.push(("array", format!("[{}]", hostile)));
            wrapped.push((
                "/sync",
                format!(r#"{{"next_batch":"s1","to_device":{{"events":[{hostile}]}}}}"#),
            ));
        }
        drop(hostile);
        for (shape, input) in wrapped {
            let label = format!("{label} ({shape})");
            let (split, extra) = peak_extra(|| split_events(&input));
            let split = split.unwrap_or_else(|e| panic!("{label}: {e}"));
            let copied: usize = split.events.iter().map(String::len).sum();
            // split_events returns owned copies of the events, so one input-sized allocation is
            // inherent. Today it also pre-parses (finding F3, see `f3_*`): an object input into a
            // `Value`, a deep array through serde_json's RawValue skipping, which keeps one byte
            // per nesting level. Bounded and linear, but up to twice the input.
            let allowed = 2 * copied + SMALL;
            assert!(
                extra < allowed,
                "{label}: split_events allocated {extra} bytes to return {copied} bytes of a {} byte input",
                input.len()
            );
            drop(input);
            let (outcomes, extra) =
                peak_extra(|| runtime.block_on(bob.receive_to_device_events(&split.events)));
            let outcomes = outcomes.unwrap();
            assert!(!outcomes.is_empty(), "{label}");
            for outcome in &outcomes {
                assert_malformed(outcome, &label);
            }
            assert!(
                extra < SMALL,
                "{label}: rejecting {copied} bytes of events allocated {extra} bytes"
            );
        }
    }
    runtime
        .block_on(bob.decrypt_to_device_event(&event.to_string()))
        .expect("the real event decrypts");
}

#[test]
fn huge_keys_bodies_parse_in_memory_proportional_to_the_input() {
    let _guard = exclusive();
    // 200 devices in one /keys/query response: each is verified, none is accepted twice.
    let device = SimulatedDevice::new("@carol:example.org", "CAROL");
    let mut users = serde_json::Map::new();
    for i in 0..200 {
        users.insert(
            format!("@u{i}:example.org"),
            json!({"CAROL": device.device_keys()}),
        );
    }
    let body = json!({"device_keys": users});
    let devices = parse_keys_query_response(&body).unwrap();
    assert_eq!(devices.valid.len(), 0);
    assert_eq!(devices.rejected.len(), 200, "listed under the wrong user");
    // A deep `unsigned` inside a device-keys object is within serde_json's recursion limit.
    let mut keys = device.device_keys();
    let mut nested = json!(1);
    for _ in 0..100 {
        nested = json!({"a": nested});
    }
    keys["unsigned"] = nested;
    assert!(
        DeviceKeys::from_signed_json(&keys).is_ok(),
        "unsigned is not signed"
    );
}

/// The 44-character form of an Ed25519 key that decodes to 33 bytes (vodozemac 0.11.1 only
/// checks the length of the text, then `copy_from_slice`s the decoded bytes into 32).
fn ed25519_of_33_bytes() -> String {
    let key = vodozemac::base64_encode([7u8; 33]);
    assert_eq!(key.len(), 44);
    key
}

/// F1 (found by the `keys_query` and `keys_upload` fuzz targets): a device-keys object whose
/// `ed25519:<device>` key is 44 characters of unpadded base64 panics instead of being rejected.
#[test]

fn f1_a_33_byte_ed25519_key_in_keys_query_and_upload_is_rejected_not_a_panic() {
    let _guard = exclusive();
    let device = SimulatedDevice::new("@alice:example.org", "ALICEPHONE");
    let mut keys = device.device_keys();
    keys["keys"]["ed25519:ALICEPHONE"] = json!(ed25519_of_33_bytes());
    assert!(DeviceKeys::from_signed_json(&keys).is_err());
    let query = json!({"device_keys": {"@alice:example.org": {"ALICEPHONE": keys.clone()}}});
    let parsed = parse_keys_query_response(&query).unwrap();
    assert_eq!((parsed.valid.len(), parsed.rejected.len()), (0, 1));
    assert!(parse_keys_upload_body(&json!({"device_keys": keys})).is_err());
}

/// F1 through to-device traffic: any user with an Olm session (anyone can make one with our
/// published one-time or fallback key) sends `sender_device_keys` with such a key.
#[test]

fn f1_a_33_byte_ed25519_key_in_sender_device_keys_fails_with_invalid_sender_device_keys() {
    let _guard = exclusive();
    let runtime = runtime();
    runtime.block_on(async {
        let bob = OlmMachine::in_memory("@bob:example.org", "BOBPHONE")
            .await
            .unwrap();
        let keys = publish_machine_keys(&bob, 2).await.unwrap();
        let to_bob = recipient_of(&bob);
        let mut mallory = SimulatedDevice::new("@mallory:example.org", "MALLORY");
        mallory.create_session(&keys, None);
        let key = ed25519_of_33_bytes();
        let mut plaintext = mallory.plaintext(&to_bob, "m.room_key", json!({}), true);
        plaintext["keys"]["ed25519"] = json!(key);
        plaintext["sender_device_keys"]["keys"]["ed25519:MALLORY"] = json!(key);
        let event = mallory.encrypt_raw(&to_bob, plaintext.to_string().as_bytes());
        let error = bob
            .decrypt_to_device_event(&event.to_string())
            .await
            .expect_err("invalid sender_device_keys");
        assert_eq!(error.reason(), FailureReason::InvalidSenderDeviceKeys);
        // And the machine is intact: Mallory's next valid message decrypts.
        let next = mallory.encrypt(&to_bob, "m.room_key", json!({}));
        bob.decrypt_to_device_event(&next.to_string())
            .await
            .unwrap();
    });
}

/// F3 (found while writing the memory bounds): `split_events` pre-parses its input before copying
/// the events out: any object input (a bare event or a `/sync` response) into a
/// `serde_json::Map<String, Value>` just to look at its top-level keys, so a 50 MB event costs
/// 100 MB; a deeply nested array through `Vec<&RawValue>`, whose skipping keeps a byte per level
/// (10 million `[` cost 16 MB before the 10 MB copy).
#[test]

fn f3_split_events_does_not_materialize_a_bare_event() {
    let _guard = exclusive();
    let runtime = runtime();
    let (_bob, event) = bob_and_event(&runtime);
    let event = padded_event(&event, 50 * MB);
    let sync = format!(r#"{{"next_batch":"s1","to_device":{{"events":[{event}]}}}}"#);
    for input in [event, sync, "[".repeat(10_000_000)] {
        let (split, extra) = peak_extra(|| split_events(&input));
        assert_eq!(split.unwrap().events.len(), 1);
        assert!(
            extra < input.len() + SMALL,
            "split_events allocated {extra} bytes"
        );
    }
}

/// F2 (found while writing the state properties): one sender can make the machine keep any number
/// of sessions with it, because pre-key messages on our fallback key (published, never consumed)
/// each create a new inbound session. Every later undecryptable normal message from that sender
/// is then tried against all of them (`sessions_tried` below): memory and CPU grow with whatever
/// the sender chose. The spec requires keeping at least 4 sessions per device and allows LRU
/// expiry beyond that.
#[test]

fn f2_one_sender_cannot_grow_its_sessions_without_bound() {
    const SESSIONS: usize = 60;
    const CAP: usize = 50;
    let _guard = exclusive();
    let runtime = runtime();
    runtime.block_on(async {
        let store = std::sync::Arc::new(to_device_crypto::MemoryStore::new());
        let bob = OlmMachine::open("@bob:example.org", "BOBPHONE", store.clone())
            .await
            .unwrap();
        bob.generate_one_time_keys(1).await.unwrap();
        let upload = bob.keys_for_upload().await.unwrap();
        bob.mark_keys_as_published().await.unwrap();
        let keys = parse_keys_upload_body(&upload).unwrap();
        let fallback = keys.one_time_keys.iter().find(|k| k.fallback).unwrap().key;
        let to_bob = recipient_of(&bob);
        let mut mallory = SimulatedDevice::new("@mallory:example.org", "MALLORY");
        for _ in 0..SESSIONS {
            mallory.create_session(&keys, Some(fallback));
            let event = mallory.encrypt(&to_bob, "m.room_key", json!({}));
            bob.decrypt_to_device_event(&event.to_string())
                .await
                .expect("each pre-key message on the fallback key decrypts");
        }
        // A real normal message of another peer, presented under Mallory's sender key: every
        // one of her sessions is tried before it fails.
        bob.generate_one_time_keys(1).await.unwrap();
        let more = to_device_crypto::simulator::publish_machine_keys(&bob, 1)
            .await
            .unwrap();
        let mut alice = SimulatedDevice::new("@alice:example.org", "ALICEPHONE");
        alice.create_session(&more, None);
        let first = alice.encrypt(&to_bob, "m.dummy", json!({}));
        bob.decrypt_to_device_event(&first.to_string())
            .await
            .unwrap();
        let reply = bob
            .encrypt(&alice.published_keys(), "m.dummy", &[json!({})])
            .await
            .unwrap();
        alice.decrypt(&reply[0]).unwrap();
        let mut normal = alice.encrypt(&to_bob, "m.dummy", json!({}));
        normal["content"]["sender_key"] = json!(mallory.curve25519_key().to_base64());
        match bob.decrypt_to_device_event(&normal.to_string()).await {
            Err(to_device_crypto::DecryptionError::SessionWedged { sessions_tried, .. }) => {
                assert!(
                    sessions_tried <= CAP,
                    "one message was tried against {sessions_tried} sessions"
                )
            }
            other => panic!("expected SessionWedged, got {other:?}"),
        }
        // Mallory's sessions are capped; Alice's one session comes on top.
        assert!(
            store.session_count() <= CAP + 1,
            "{} sessions stored, {SESSIONS} of them with one sender key (cap {CAP})",
            store.session_count()
        );
    });
}
