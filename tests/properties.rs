//! Property tests for hostile to-device input ("Hostile input" issue): whatever arrives, the
//! machine returns a decrypted event, a plaintext pass-through or exactly one named failure; it
//! keeps decrypting valid traffic afterwards; and a failure changes stored state only as
//! documented (a failure after Olm decryption commits the message hash, and the session when a
//! pre-key message created one; a failure before it commits nothing).
//!
//! Each test shares one machine across its cases on purpose: the cases form one long hostile
//! sequence, which is what (b) is about. Case counts are chosen to keep the file under ~20 s in a
//! debug build.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::{parse_keys_upload_body, PublishedKeys};
use to_device_crypto::simulator::{recipient_of, Recipient, SimulatedDevice};
use to_device_crypto::{FailureReason, FailureStream, MemoryStore, OlmMachine, ToDeviceOutcome};
use vodozemac::Curve25519PublicKey;

const BOB: &str = "@bob:example.org";
const ALICE: &str = "@alice:example.org";

/// Failures reported after Olm decryption succeeded (the plaintext checks).
const AFTER_DECRYPTION: [FailureReason; 6] = [
    FailureReason::JsonError,
    FailureReason::MismatchedSender,
    FailureReason::MismatchedRecipient,
    FailureReason::MismatchedKeys,
    FailureReason::MissingSigningKey,
    FailureReason::InvalidSenderDeviceKeys,
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Bob with published one-time keys and a fallback key, Alice with an established session (her
/// messages are normal, type 1) and known from `/keys/query`.
struct World {
    bob: OlmMachine,
    store: Arc<MemoryStore>,
    keys: PublishedKeys,
    fallback: Curve25519PublicKey,
    next_one_time_key: usize,
    alice: SimulatedDevice,
    to_bob: Recipient,
    other_sender_key: String,
    failures: FailureStream,
    peers: usize,
    /// How often each outcome occurred (shown with `--nocapture`).
    seen: std::collections::BTreeMap<String, usize>,
}

impl World {
    async fn new() -> Self {
        let store = Arc::new(MemoryStore::new());
        let bob = OlmMachine::open(BOB, "BOBPHONE", store.clone())
            .await
            .unwrap();
        bob.generate_one_time_keys(10).await.unwrap();
        let upload = bob.keys_for_upload().await.unwrap();
        bob.mark_keys_as_published().await.unwrap();
        let mut keys = parse_keys_upload_body(&upload).unwrap();
        let fallback = keys
            .one_time_keys
            .iter()
            .find(|k| k.fallback)
            .expect("a fallback key")
            .key;
        keys.one_time_keys.retain(|k| !k.fallback);
        let to_bob = recipient_of(&bob);

        let mut alice = SimulatedDevice::new(ALICE, "ALICEPHONE");
        bob.receive_keys_query_response(&alice.keys_query_response())
            .await
            .unwrap();
        alice.create_session(&keys, Some(keys.one_time_keys[0].key));
        let first = alice.encrypt(&to_bob, "m.dummy", json!({}));
        bob.decrypt_to_device_event(&first.to_string())
            .await
            .unwrap();
        let reply = bob
            .encrypt(&alice.published_keys(), "m.dummy", &[json!({})])
            .await
            .unwrap();
        alice.decrypt(&reply[0]).expect("the reply decrypts");
        let failures = bob.to_device_decryption_failure_stream();
        Self {
            bob,
            store,
            keys,
            fallback,
            next_one_time_key: 1,
            alice,
            to_bob,
            other_sender_key: SimulatedDevice::new("@carol:example.org", "CAROL")
                .curve25519_key()
                .to_base64(),
            failures,
            peers: 0,
            seen: Default::default(),
        }
    }

    /// A new peer whose session with Bob uses Bob's fallback key (never consumed).
    fn new_peer(&mut self) -> SimulatedDevice {
        self.peers += 1;
        let mut peer = SimulatedDevice::new(
            &format!("@peer{}:example.org", self.peers),
            &format!("PEER{}", self.peers),
        );
        peer.create_session(&self.keys, Some(self.fallback));
        peer
    }

    /// A fresh, real event of the given kind, and the failure it must produce unmutated.
    fn fresh_event(&mut self, source: &Source) -> (Value, Option<FailureReason>) {
        match source {
            Source::Normal(room_key) => {
                let event_type = if *room_key { "m.room_key" } else { "m.dummy" };
                let event = self
                    .alice
                    .encrypt(&self.to_bob, event_type, json!({"n": 1}));
                (event, None)
            }
            Source::PreKey => {
                let mut peer = self.new_peer();
                (peer.encrypt(&self.to_bob, "m.dummy", json!({})), None)
            }
            Source::Crafted(which) => {
                let mut peer = self.new_peer();
                let mut plaintext = peer.plaintext(&self.to_bob, "m.dummy", json!({}), true);
                let expected = match which % 7 {
                    0 => {
                        return (
                            peer.encrypt_raw(&self.to_bob, b"\xff not json"),
                            Some(FailureReason::JsonError),
                        )
                    }
                    1 => {
                        plaintext["sender"] = json!("@mallory:example.org");
                        Some(FailureReason::MismatchedSender)
                    }
                    2 => {
                        plaintext["recipient"] = json!("@someone:example.org");
                        Some(FailureReason::MismatchedRecipient)
                    }
                    3 => {
                        plaintext["recipient_keys"]["ed25519"] =
                            json!(self.alice.ed25519_key().to_base64());
                        Some(FailureReason::MismatchedKeys)
                    }
                    4 => {
                        plaintext
                            .as_object_mut()
                            .unwrap()
                            .remove("sender_device_keys");
                        Some(FailureReason::MissingSigningKey)
                    }
                    5 => {
                        plaintext["sender_device_keys"]["algorithms"] = json!([]);
                        Some(FailureReason::InvalidSenderDeviceKeys)
                    }
                    _ => None,
                };
                let event = peer.encrypt_raw(&self.to_bob, plaintext.to_string().as_bytes());
                (event, expected)
            }
        }
    }

    /// Items published on the failure stream since the last call.
    fn drain_failures(&mut self) -> Vec<FailureReason> {
        let mut reasons = Vec::new();
        while let Some(Some(item)) = self.failures.next().now_or_never() {
            reasons.push(item.expect("the test never lags").reason);
        }
        reasons
    }

    fn counts(&self) -> (usize, usize) {
        (self.store.session_count(), self.store.message_hash_count())
    }

    /// (b): fresh valid traffic still decrypts, from the established peer (normal message) and
    /// from a new peer (pre-key message on an unused one-time key).
    async fn assert_still_decrypts(&mut self) {
        let normal = self
            .alice
            .encrypt(&self.to_bob, "m.room_key", json!({"k": 1}));
        assert_eq!(message_type(&normal), Some(1));
        let decrypted = self
            .bob
            .decrypt_to_device_event(&normal.to_string())
            .await
            .expect("a fresh normal message from the established peer decrypts");
        assert_eq!(decrypted.content, json!({"k": 1}));

        let key = self.keys.one_time_keys[self.next_one_time_key].key;
        self.next_one_time_key += 1;
        self.peers += 1;
        let mut newcomer =
            SimulatedDevice::new("@newcomer:example.org", &format!("NEW{}", self.peers));
        newcomer.create_session(&self.keys, Some(key));
        let pre_key = newcomer.encrypt(&self.to_bob, "m.room_key", json!({"k": 2}));
        assert_eq!(message_type(&pre_key), Some(0));
        let (sessions, hashes) = self.counts();
        let decrypted = self
            .bob
            .decrypt_to_device_event(&pre_key.to_string())
            .await
            .expect("a fresh pre-key message from a new peer decrypts");
        assert_eq!(decrypted.content, json!({"k": 2}));
        assert_eq!(self.counts(), (sessions + 1, hashes + 1));
        assert!(self.drain_failures().is_empty());
        eprintln!("outcomes: {:?}", self.seen);
    }
}

fn message_type(event: &Value) -> Option<u8> {
    let entry = event
        .pointer("/content/ciphertext")?
        .as_object()?
        .values()
        .next()?;
    u8::try_from(entry.get("type")?.as_u64()?).ok()
}

/// What a real event is made from.
#[derive(Clone, Debug)]
enum Source {
    /// A normal message from the established peer (`true`: `m.room_key`).
    Normal(bool),
    /// The first (pre-key) message of a new peer.
    PreKey,
    /// A crafted plaintext under real Olm from a new peer (which check it breaks).
    Crafted(u8),
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        3 => any::<bool>().prop_map(Source::Normal),
        1 => Just(Source::PreKey),
        2 => any::<u8>().prop_map(Source::Crafted),
    ]
}

/// Fields a mutation deletes or retypes (`#x`: in our ciphertext entry).
const FIELDS: [&str; 8] = [
    "/type",
    "/sender",
    "/content",
    "/content/algorithm",
    "/content/sender_key",
    "/content/ciphertext",
    "#type",
    "#body",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR one byte of the decoded body.
    FlipBody {
        at: usize,
        mask: u8,
    },
    /// Cut the decoded body.
    TruncateBody(usize),
    DeleteField(usize),
    RetypeField {
        field: usize,
        value: Value,
    },
    /// Another device's Curve25519 key as `sender_key`.
    SwapSenderKey,
    /// Another user as envelope `sender`.
    SwapSender,
    /// A message type the sender did not use.
    MessageType(u8),
    /// Arbitrary bytes as the (base64) body.
    RawBody(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::FlipBody { at, mask }),
        1 => any::<usize>().prop_map(Mutation::TruncateBody),
        2 => (0..FIELDS.len()).prop_map(Mutation::DeleteField),
        2 => ((0..FIELDS.len()), json_value()).prop_map(|(field, value)| Mutation::RetypeField { field, value }),
        1 => Just(Mutation::SwapSenderKey),
        1 => Just(Mutation::SwapSender),
        1 => (0u8..4).prop_map(Mutation::MessageType),
        1 => vec(any::<u8>(), 0..200).prop_map(Mutation::RawBody),
    ]
}

fn entry_mut(event: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    event
        .pointer_mut("/content/ciphertext")?
        .as_object_mut()?
        .values_mut()
        .next()?
        .as_object_mut()
}

fn with_body(event: &mut Value, change: impl FnOnce(&mut Vec<u8>)) {
    if let Some(entry) = entry_mut(event) {
        if let Some(mut body) = entry
            .get("body")
            .and_then(Value::as_str)
            .and_then(|b| vodozemac::base64_decode(b).ok())
        {
            change(&mut body);
            entry.insert("body".into(), json!(vodozemac::base64_encode(body)));
        }
    }
}

fn slot<'a>(
    event: &'a mut Value,
    field: &str,
) -> Option<(&'a mut serde_json::Map<String, Value>, String)> {
    if let Some(name) = field.strip_prefix('#') {
        return Some((entry_mut(event)?, name.to_owned()));
    }
    let (parent, name) = field.rsplit_once('/')?;
    Some((event.pointer_mut(parent)?.as_object_mut()?, name.to_owned()))
}

fn apply(event: &mut Value, mutation: &Mutation, other_sender_key: &str) {
    match mutation {
        Mutation::FlipBody { at, mask } => with_body(event, |body| {
            if !body.is_empty() {
                let i = at % body.len();
                body[i] ^= mask;
            }
        }),
        Mutation::TruncateBody(keep) => {
            with_body(event, |body| body.truncate(keep % (body.len() + 1)))
        }
        Mutation::DeleteField(field) => {
            if let Some((map, name)) = slot(event, FIELDS[*field]) {
                map.remove(&name);
            }
        }
        Mutation::RetypeField { field, value } => {
            if let Some((map, name)) = slot(event, FIELDS[*field]) {
                map.insert(name, value.clone());
            }
        }
        Mutation::SwapSenderKey => {
            if let Some(key) = event.pointer_mut("/content/sender_key") {
                *key = json!(other_sender_key);
            }
        }
        Mutation::SwapSender => {
            if let Some(sender) = event.get_mut("sender") {
                *sender = json!("@mallory:example.org");
            }
        }
        Mutation::MessageType(message_type) => {
            if let Some(entry) = entry_mut(event) {
                entry.insert("type".into(), json!(message_type));
            }
        }
        Mutation::RawBody(bytes) => {
            if let Some(entry) = entry_mut(event) {
                entry.insert("body".into(), json!(vodozemac::base64_encode(bytes)));
            }
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(json!("m.olm.v1.curve25519-aes-sha2")),
        Just(json!("m.room.encrypted")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(json_key(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("type".to_owned()),
        Just("sender".to_owned()),
        Just("content".to_owned()),
        Just("algorithm".to_owned()),
        Just("sender_key".to_owned()),
        Just("ciphertext".to_owned()),
        Just("body".to_owned()),
        any::<String>(),
    ]
}

/// Arbitrary input of the shapes an attacker controls.
#[derive(Clone, Debug)]
enum Hostile {
    Text(String),
    Json(Value),
    /// An event-shaped object addressed to Bob with arbitrary field values.
    EventShaped {
        event_type: Value,
        sender: Value,
        algorithm: Value,
        sender_key: Option<Value>,
        message_type: Value,
        body: Value,
    },
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let body = prop_oneof![
        json_value(),
        vec(any::<u8>(), 0..300).prop_map(|b| json!(vodozemac::base64_encode(b))),
    ];
    let event_type = prop_oneof![3 => Just(json!("m.room.encrypted")), 1 => json_value()];
    let algorithm =
        prop_oneof![3 => Just(json!("m.olm.v1.curve25519-aes-sha2")), 1 => json_value()];
    let message_type = prop_oneof![Just(json!(0)), Just(json!(1)), json_value()];
    prop_oneof![
        1 => any::<String>().prop_map(Hostile::Text),
        1 => vec(any::<u8>(), 0..64).prop_map(|b| Hostile::Text(String::from_utf8_lossy(&b).into_owned())),
        1 => json_value().prop_map(Hostile::Json),
        3 => (
            event_type,
            prop_oneof![Just(json!(ALICE)), json_value()],
            algorithm,
            proptest::option::of(json_value()),
            message_type,
            body,
        )
            .prop_map(|(event_type, sender, algorithm, sender_key, message_type, body)| {
                Hostile::EventShaped {
                    event_type,
                    sender,
                    algorithm,
                    sender_key,
                    message_type,
                    body,
                }
            }),
    ]
}

impl Hostile {
    fn render(&self, world: &World) -> String {
        match self {
            Hostile::Text(text) => text.clone(),
            Hostile::Json(value) => value.to_string(),
            Hostile::EventShaped {
                event_type,
                sender,
                algorithm,
                sender_key,
                message_type,
                body,
            } => json!({
                "type": event_type,
                "sender": sender,
                "content": {
                    "algorithm": algorithm,
                    // `None`: the established peer's real key, so that bodies reach Olm.
                    "sender_key": sender_key.clone().unwrap_or_else(|| json!(world.alice.curve25519_key().to_base64())),
                    "ciphertext": {
                        world.to_bob.curve25519.to_base64(): {"type": message_type, "body": body}
                    }
                }
            })
            .to_string(),
        }
    }
}

/// What one event came to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Observed {
    /// `re_emitted`: a re-delivery of a result that is still pending (not acknowledged).
    Decrypted {
        re_emitted: bool,
    },
    Plaintext,
    Failed(FailureReason),
}

impl Observed {
    fn reason(self) -> Option<FailureReason> {
        match self {
            Observed::Failed(reason) => Some(reason),
            _ => None,
        }
    }
}

impl From<&ToDeviceOutcome> for Observed {
    fn from(outcome: &ToDeviceOutcome) -> Self {
        match outcome {
            ToDeviceOutcome::Decrypted(event) => Observed::Decrypted {
                re_emitted: event.re_emitted,
            },
            ToDeviceOutcome::Plaintext(_) => Observed::Plaintext,
            ToDeviceOutcome::Failed(failed) => Observed::Failed(failed.error.reason()),
        }
    }
}

/// The outcome of one event, checked against the state rules; returns its failure reason.
fn check_outcome(
    outcome: &Observed,
    before: (usize, usize),
    after: (usize, usize),
    message_type: Option<u8>,
) -> Result<Option<FailureReason>, TestCaseError> {
    let sessions_added = after.0.checked_sub(before.0);
    let hashes_added = after.1.checked_sub(before.1);
    let reason = match outcome {
        Observed::Plaintext | Observed::Decrypted { re_emitted: true } => {
            prop_assert_eq!((sessions_added, hashes_added), (Some(0), Some(0)));
            return Ok(None);
        }
        Observed::Decrypted { re_emitted: false } => None,
        Observed::Failed(reason) => {
            prop_assert!(FailureReason::ALL.contains(reason));
            prop_assert_ne!(*reason, FailureReason::Store);
            Some(*reason)
        }
    };
    if reason.is_none_or(|r| AFTER_DECRYPTION.contains(&r)) {
        // Olm decryption succeeded: the hash is committed, and the session if one was created.
        prop_assert_eq!(hashes_added, Some(1), "decrypted message: one hash");
        prop_assert!(matches!(sessions_added, Some(0 | 1)));
        if sessions_added == Some(1) {
            prop_assert_eq!(
                message_type,
                Some(0),
                "only a pre-key message creates a session"
            );
        }
    } else {
        prop_assert_eq!(
            (sessions_added, hashes_added),
            (Some(0), Some(0)),
            "{:?} before Olm decryption succeeded must change nothing",
            reason
        );
    }
    Ok(reason)
}

/// Feeds one raw event through either API; checks the outcome, state and failure stream.
fn feed(
    runtime: &tokio::runtime::Runtime,
    world: &mut World,
    raw: &str,
    single: bool,
) -> Result<Observed, TestCaseError> {
    let message_type = serde_json::from_str::<Value>(raw)
        .ok()
        .and_then(|v| message_type(&v));
    let before = world.counts();
    let outcome = if single {
        match runtime.block_on(world.bob.decrypt_to_device_event(raw)) {
            Ok(event) => Observed::Decrypted {
                re_emitted: event.re_emitted,
            },
            Err(error) => Observed::Failed(error.reason()),
        }
    } else {
        let mut outcomes = runtime
            .block_on(world.bob.receive_to_device_events(&[raw]))
            .expect("the memory store never fails");
        prop_assert_eq!(outcomes.len(), 1);
        Observed::from(&outcomes.pop().unwrap())
    };
    let reason = check_outcome(&outcome, before, world.counts(), message_type)?;
    *world.seen.entry(format!("{outcome:?}")).or_default() += 1;
    if single {
        prop_assert!(!matches!(outcome, Observed::Plaintext));
    }
    prop_assert_eq!(
        world.drain_failures(),
        reason.into_iter().collect::<Vec<_>>()
    );
    Ok(outcome)
}

/// (a) + (c) on arbitrary text, arbitrary JSON and event-shaped JSON, one at a time and in
/// batches; then (b).
#[test]
fn arbitrary_input_yields_one_outcome_and_changes_nothing() {
    let runtime = runtime();
    let world = std::cell::RefCell::new(runtime.block_on(World::new()));
    let mut runner = TestRunner::new(config(1024));
    runner
        .run(
            &(vec(hostile(), 1..4), any::<bool>()),
            |(inputs, single)| {
                let mut world = world.borrow_mut();
                let raws: Vec<String> = inputs.iter().map(|h| h.render(&world)).collect();
                if single || raws.len() == 1 {
                    for raw in &raws {
                        feed(&runtime, &mut world, raw, single)?;
                    }
                    return Ok(());
                }
                // A batch: one outcome per event, one stream item per failure, in order.
                let before = world.counts();
                let outcomes = runtime
                    .block_on(world.bob.receive_to_device_events(&raws))
                    .expect("the memory store never fails");
                prop_assert_eq!(outcomes.len(), raws.len());
                let mut expected = Vec::new();
                for outcome in &outcomes {
                    if let ToDeviceOutcome::Failed(failed) = outcome {
                        expected.push(failed.error.reason());
                    }
                    prop_assert!(
                        !matches!(outcome, ToDeviceOutcome::Decrypted(_)),
                        "nothing forged decrypts"
                    );
                }
                prop_assert_eq!(world.drain_failures(), expected);
                prop_assert_eq!(world.counts(), before);
                Ok(())
            },
        )
        .unwrap();
    runtime.block_on(world.borrow_mut().assert_still_decrypts());
}

/// (a) + (c) on mutations of fresh real events (byte flips, truncation, field deletions, type
/// changes, swapped sender keys and senders, wrong message types, raw bodies) and replays; then (b).
#[test]
fn mutated_real_events_fail_with_one_reason_and_only_documented_state_changes() {
    let runtime = runtime();
    let world = std::cell::RefCell::new(runtime.block_on(World::new()));
    let mut runner = TestRunner::new(config(512));
    runner
        .run(
            &(
                source(),
                vec(mutation(), 0..3),
                any::<bool>(),
                any::<bool>(),
            ),
            |(source, mutations, single, replay)| {
                let mut world = world.borrow_mut();
                let (mut event, expected) = world.fresh_event(&source);
                let other_sender_key = world.other_sender_key.clone();
                for mutation in &mutations {
                    apply(&mut event, mutation, &other_sender_key);
                }
                let raw = event.to_string();
                let first = feed(&runtime, &mut world, &raw, single)?;
                if mutations.is_empty() {
                    prop_assert_eq!(first.reason(), expected, "the unmutated event");
                }
                if replay {
                    // The same bytes again: nothing new is stored. A message that failed a
                    // plaintext check is a replay; an accepted one is re-emitted while its
                    // result is pending (at-least-once delivery), else a replay.
                    let before = world.counts();
                    let again = feed(&runtime, &mut world, &raw, single)?;
                    prop_assert_eq!(world.counts(), before);
                    match first {
                        Observed::Failed(reason) if AFTER_DECRYPTION.contains(&reason) => {
                            prop_assert_eq!(
                                again,
                                Observed::Failed(FailureReason::ReplayedMessage)
                            );
                        }
                        Observed::Decrypted { .. } => {
                            let expected = matches!(
                                again,
                                Observed::Decrypted { re_emitted: true }
                                    | Observed::Failed(FailureReason::ReplayedMessage)
                            );
                            prop_assert!(expected, "re-delivered accepted message: {:?}", again);
                        }
                        _ => {}
                    }
                }
                Ok(())
            },
        )
        .unwrap();
    runtime.block_on(world.borrow_mut().assert_still_decrypts());
}

/// Re-addressed sender keys: a real pre-key or normal message presented as coming from another
/// known sender never decrypts and never creates a session with that sender.
#[test]
fn swapped_sender_keys_never_decrypt() {
    let runtime = runtime();
    let mut world = runtime.block_on(World::new());
    let known = world.alice.curve25519_key().to_base64();
    for source in [Source::PreKey, Source::Normal(true), Source::Crafted(6)] {
        for key in [known.clone(), world.other_sender_key.clone()] {
            let (mut event, _) = world.fresh_event(&source);
            if event["content"]["sender_key"] == json!(key) {
                continue;
            }
            event["content"]["sender_key"] = json!(key);
            let reason = feed(&runtime, &mut world, &event.to_string(), false)
                .unwrap()
                .reason();
            assert!(
                reason.is_some_and(|r| !AFTER_DECRYPTION.contains(&r)),
                "{source:?} under {key}: {reason:?}"
            );
        }
    }
    runtime.block_on(world.assert_still_decrypts());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The analytics crate's envelope classifier decodes `sender_key` without vodozemac; it must
    /// accept exactly the keys vodozemac accepts, or the two would name failures differently.
    #[test]
    fn the_classifier_accepts_exactly_the_sender_keys_vodozemac_accepts(
        key in prop_oneof![
            "[A-Za-z0-9+/]{42,45}={0,2}",
            "[A-Za-z0-9+/=!-]{0,50}",
            vec(any::<u8>(), 30..34)
                .prop_map(vodozemac::base64_encode),
        ]
    ) {
        use to_device_crypto::analytics::envelope::{parse_to_device_event, EnvelopeFacts};
        let our_key = "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI";
        let event = json!({"type": "m.room.encrypted", "sender": "@a:b", "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": key,
            "ciphertext": {our_key: {"type": 0, "body": "AAAA"}}}})
        .to_string();
        let classified = parse_to_device_event(&event, our_key, &mut EnvelopeFacts::default());
        let refused = matches!(&classified, Err(e) if e.reason() == FailureReason::MissingSenderKey);
        prop_assert_eq!(refused, Curve25519PublicKey::from_base64(&key).is_err(), "{}", key);
    }
}
