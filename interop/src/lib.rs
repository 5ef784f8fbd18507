//! Helpers for the interop tests and benchmark: a thin driver around matrix-sdk-crypto's
//! `OlmMachine` (the reference implementation, in-memory store, public API only) that speaks the
//! same JSON as our crate, so that both sides exchange exactly what a homeserver would relay.
//!
//! - Keys: [`Reference::keys_upload_body`] is the reference's `/keys/upload` body (as our
//!   `parse_keys_upload_body` reads it); [`Reference::receive_device_keys`] feeds a device's
//!   signed keys as a `/keys/query` response; [`Reference::claim_and_create_session`] answers
//!   its `/keys/claim` with one of our one-time keys.
//! - Traffic: [`Reference::encrypt`] uses `encrypt_content_for_devices` and returns
//!   `/sync`-shaped `m.room.encrypted` events; [`Reference::receive`] feeds events to
//!   `receive_sync_changes` and summarises each result as a [`RefOutcome`].
//! - [`Reference::receive_logged`] also captures the reference's WARN/ERROR log lines, the only
//!   place where it names the precise failure (its public result says only `DecryptionFailure`).
//! - [`Reference::snapshot`] / [`Reference::restore`]: an old copy of its store (account, Olm
//!   sessions, devices, rebuilt from pickles: the in-memory store itself cannot be cloned).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use matrix_sdk_common::deserialized_responses::{AlgorithmInfo, ProcessedToDeviceEvent};
use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, ToDeviceRequest};
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSyncChanges, OlmMachine as RefMachine,
    TrustRequirement,
};
use ruma::api::client::keys::{claim_keys, get_keys, upload_keys};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::events::AnyToDeviceEvent;
use ruma::serde::Raw;
use ruma::{DeviceId, OneTimeKeyAlgorithm, UInt, UserId};
use serde_json::{json, Value};
use tracing::instrument::WithSubscriber;

pub use matrix_sdk_crypto;

/// What the reference implementation made of one to-device event.
#[derive(Clone, Debug, PartialEq)]
pub enum RefOutcome {
    /// Decrypted: the decrypted event JSON (type, content, sender, keys, …) and what the
    /// reference knows of the sender.
    Decrypted {
        /// The decrypted plaintext event as the reference returns it.
        event: Value,
        /// `EncryptionInfo::sender`.
        sender: String,
        /// `EncryptionInfo::sender_device`: set when the reference identified the sending device
        /// (from `/keys/query` or from validated `sender_device_keys`).
        sender_device: Option<String>,
        /// The Curve25519 key in `AlgorithmInfo::OlmV1Curve25519AesSha2`.
        sender_curve25519: String,
    },
    /// `ProcessedToDeviceEvent::UnableToDecrypt`, with the public reason (`{:?}`).
    UnableToDecrypt(String),
    /// `ProcessedToDeviceEvent::PlainText`.
    PlainText,
    /// `ProcessedToDeviceEvent::Invalid` (the event did not even deserialize).
    Invalid,
}

impl RefOutcome {
    /// A short label for tables.
    pub fn label(&self) -> String {
        match self {
            RefOutcome::Decrypted { .. } => "Decrypted".to_owned(),
            RefOutcome::UnableToDecrypt(reason) => format!("UnableToDecrypt({reason})"),
            RefOutcome::PlainText => "PlainText".to_owned(),
            RefOutcome::Invalid => "Invalid".to_owned(),
        }
    }
}

/// A matrix-sdk-crypto `OlmMachine` on its in-memory store.
pub struct Reference {
    /// The wrapped machine (public API only).
    pub machine: RefMachine,
    user_id: String,
    device_id: String,
}

fn settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

/// A `tracing` writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Reference {
    /// A new device with a fresh account (in-memory store).
    pub async fn new(user_id: &str, device_id: &str) -> Self {
        let user = UserId::parse(user_id).expect("valid user id");
        let device: &DeviceId = device_id.into();
        Self {
            machine: RefMachine::new(&user, device).await,
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        }
    }

    /// The user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The Curve25519 identity key (unpadded base64).
    pub fn curve25519(&self) -> String {
        self.machine.identity_keys().curve25519.to_base64()
    }

    /// The Ed25519 identity key (unpadded base64).
    pub fn ed25519(&self) -> String {
        self.machine.identity_keys().ed25519.to_base64()
    }

    /// Takes the reference's pending `/keys/upload` request, returns its body as JSON and marks it
    /// as sent (the server accepted it). `None` when it has nothing to upload.
    pub async fn keys_upload_body(&self) -> Option<Value> {
        for request in self.machine.outgoing_requests().await.unwrap() {
            if let AnyOutgoingRequest::KeysUpload(upload) = request.request() {
                let mut body = json!({});
                if let Some(device_keys) = &upload.device_keys {
                    body["device_keys"] = serde_json::to_value(device_keys).unwrap();
                }
                body["one_time_keys"] = serde_json::to_value(&upload.one_time_keys).unwrap();
                body["fallback_keys"] = serde_json::to_value(&upload.fallback_keys).unwrap();
                let count = upload.one_time_keys.len() as u64;
                let response = upload_keys::v3::Response::new(BTreeMap::from([(
                    OneTimeKeyAlgorithm::SignedCurve25519,
                    UInt::new(count).unwrap(),
                )]));
                self.machine
                    .mark_request_as_sent(request.request_id(), &response)
                    .await
                    .unwrap();
                return Some(body);
            }
        }
        None
    }

    /// Feeds `device_keys` (a signed device-keys object, e.g. the `device_keys` of a
    /// `/keys/upload` body) to the reference as the `/keys/query` response for that device.
    pub async fn receive_device_keys(&self, device_keys: &Value) {
        let user_id = device_keys["user_id"].as_str().expect("user_id").to_owned();
        let device_id = device_keys["device_id"]
            .as_str()
            .expect("device_id")
            .to_owned();
        let user = UserId::parse(&user_id).unwrap();
        self.machine.update_tracked_users([&*user]).await.unwrap();
        let mut response = get_keys::v3::Response::new();
        response.device_keys =
            serde_json::from_value(json!({ user_id: { device_id: device_keys } })).unwrap();
        let requests = self.machine.outgoing_requests().await.unwrap();
        let query = requests
            .iter()
            .find(|r| matches!(r.request(), AnyOutgoingRequest::KeysQuery(_)))
            .expect("a /keys/query request for the tracked user");
        self.machine
            .mark_request_as_sent(query.request_id(), &response)
            .await
            .unwrap();
    }

    /// Whether the reference stored the device (its keys passed the reference's checks).
    pub async fn knows_device(&self, user_id: &str, device_id: &str) -> bool {
        let user = UserId::parse(user_id).unwrap();
        self.machine
            .get_device(&user, device_id.into(), None)
            .await
            .unwrap()
            .is_some()
    }

    /// Lets the reference claim a one-time key of `user_id`'s devices (`get_missing_sessions`),
    /// answers the `/keys/claim` with `(key_id, signed key)` for `device_id`, and returns whether
    /// the reference asked for that device.
    pub async fn claim_and_create_session(
        &self,
        user_id: &str,
        device_id: &str,
        key_id: &str,
        signed_key: &Value,
    ) -> bool {
        let user = UserId::parse(user_id).unwrap();
        let Some((txn_id, request)) = self
            .machine
            .get_missing_sessions([&*user].into_iter())
            .await
            .unwrap()
        else {
            return false;
        };
        let asked = serde_json::to_value(&request.one_time_keys).unwrap();
        let asked_for_device = asked[user_id][device_id] == json!("signed_curve25519");
        let one_time_keys =
            serde_json::from_value(json!({ user_id: { device_id: { key_id: signed_key } } }))
                .unwrap();
        let response = claim_keys::v3::Response::new(one_time_keys);
        self.machine
            .mark_request_as_sent(&txn_id, &response)
            .await
            .unwrap();
        asked_for_device
    }

    /// Encrypts one event per content for the device `user_id`/`device_id` with
    /// `encrypt_content_for_devices` and returns them as `/sync` `to_device.events` entries.
    pub async fn encrypt(
        &self,
        user_id: &str,
        device_id: &str,
        event_type: &str,
        contents: &[Value],
    ) -> Vec<Value> {
        let user = UserId::parse(user_id).unwrap();
        let device = self
            .machine
            .get_device(&user, device_id.into(), None)
            .await
            .unwrap()
            .expect("the recipient device is known (receive_device_keys first)");
        let mut events = Vec::with_capacity(contents.len());
        for content in contents {
            let (requests, withheld) = self
                .machine
                .encrypt_content_for_devices(
                    vec![(*device).clone()],
                    event_type,
                    content,
                    CollectStrategy::AllDevices,
                )
                .await
                .unwrap();
            assert!(
                withheld.is_empty(),
                "the reference withheld the event: {:?}",
                withheld.iter().map(|(_, code)| code).collect::<Vec<_>>()
            );
            for request in requests {
                events.extend(self.to_device_events(&request));
            }
        }
        events
    }

    /// The `/sync`-shaped events a `/sendToDevice` request of this device delivers.
    pub fn to_device_events(&self, request: &ToDeviceRequest) -> Vec<Value> {
        let messages = serde_json::to_value(&request.messages).unwrap();
        let mut events = Vec::new();
        for devices in messages.as_object().unwrap().values() {
            for content in devices.as_object().unwrap().values() {
                events.push(json!({
                    "type": request.event_type.to_string(),
                    "sender": self.user_id,
                    "content": content,
                }));
            }
        }
        events
    }

    /// The reference's pending `/sendToDevice` requests (e.g. an `m.dummy` after it unwedged a
    /// session), as `/sync` events, each marked as sent.
    pub async fn take_to_device_events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        for request in self.machine.outgoing_requests().await.unwrap() {
            if let AnyOutgoingRequest::ToDeviceRequest(to_device) = request.request() {
                events.extend(self.to_device_events(to_device));
                let response =
                    ruma::api::client::to_device::send_event_to_device::v3::Response::new();
                self.machine
                    .mark_request_as_sent(request.request_id(), &response)
                    .await
                    .unwrap();
            }
        }
        events
    }

    /// Feeds `events` (one `/sync` batch) to `receive_sync_changes`.
    pub async fn receive(&self, events: &[Value]) -> Vec<RefOutcome> {
        let raw: Vec<Raw<AnyToDeviceEvent>> = events
            .iter()
            .map(|e| serde_json::from_value(e.clone()).unwrap())
            .collect();
        self.receive_raw(raw).await
    }

    /// Feeds raw events (as `Raw`, so nothing is re-serialised) to `receive_sync_changes`.
    pub async fn receive_raw(&self, raw: Vec<Raw<AnyToDeviceEvent>>) -> Vec<RefOutcome> {
        let device_lists = DeviceLists::new();
        let counts = BTreeMap::new();
        let (processed, _room_keys) = self
            .machine
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: raw,
                    changed_devices: &device_lists,
                    one_time_keys_counts: &counts,
                    unused_fallback_keys: None,
                    next_batch_token: None,
                },
                &settings(),
            )
            .await
            .expect("receive_sync_changes");
        processed.into_iter().map(summarise).collect()
    }

    /// Like [`receive`](Self::receive), also returning the reference's WARN and ERROR log lines
    /// emitted while it processed the batch.
    pub async fn receive_logged(&self, events: &[Value]) -> (Vec<RefOutcome>, Vec<String>) {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .without_time()
            .with_target(false)
            .finish();
        let outcomes = self.receive(events).with_subscriber(subscriber).await;
        let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
        let lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        (outcomes, lines)
    }
}

/// A copy of a reference machine's store as a backup would hold it: the account, the Olm
/// sessions with the given peers and the devices it knows (built from pickles with the public
/// `CryptoStore` API, since the in-memory store itself cannot be cloned).
pub struct RefSnapshot {
    user_id: String,
    device_id: String,
    account: matrix_sdk_crypto::olm::PickledAccount,
    sessions: Vec<matrix_sdk_crypto::olm::PickledSession>,
    devices: Vec<matrix_sdk_crypto::DeviceData>,
}

impl Reference {
    /// Snapshots the account, the sessions with `peer_curve25519_keys` and every device of
    /// `peer_users` and of our own user (the parts of the store an Olm conversation depends on).
    pub async fn snapshot(
        &self,
        peer_curve25519_keys: &[&str],
        peer_users: &[&str],
    ) -> RefSnapshot {
        let store = self.machine.store();
        let account = store
            .load_account()
            .await
            .unwrap()
            .expect("an account")
            .pickle();
        let mut sessions = Vec::new();
        for key in peer_curve25519_keys {
            for session in store.get_sessions(key).await.unwrap().unwrap_or_default() {
                sessions.push(session.pickle().await);
            }
        }
        // Our own device too: the machine expects it in the store.
        let mut devices = Vec::new();
        for user in peer_users.iter().copied().chain([self.user_id.as_str()]) {
            let user = UserId::parse(user).unwrap();
            devices.extend(store.get_user_devices(&user).await.unwrap().into_values());
        }
        RefSnapshot {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            account,
            sessions,
            devices,
        }
    }

    /// A machine opened on a new in-memory store filled from `snapshot` (a restored backup).
    pub async fn restore(snapshot: RefSnapshot) -> Self {
        use matrix_sdk_crypto::olm::{Account, Session};
        use matrix_sdk_crypto::store::types::{Changes, DeviceChanges, PendingChanges};
        use matrix_sdk_crypto::store::{CryptoStore, MemoryStore};
        let store = MemoryStore::new();
        let account = Account::from_pickle(snapshot.account).unwrap();
        let our_device_keys = account.device_keys();
        store
            .save_pending_changes(PendingChanges {
                account: Some(account),
            })
            .await
            .unwrap();
        let sessions = snapshot
            .sessions
            .into_iter()
            .map(|p| Session::from_pickle(our_device_keys.clone(), p).unwrap())
            .collect();
        let changes = Changes {
            sessions,
            devices: DeviceChanges {
                new: snapshot.devices,
                ..Default::default()
            },
            ..Default::default()
        };
        store.save_changes(changes).await.unwrap();
        let user = UserId::parse(&snapshot.user_id).unwrap();
        let machine =
            RefMachine::with_store(&user, snapshot.device_id.as_str().into(), store, None)
                .await
                .unwrap();
        Self {
            machine,
            user_id: snapshot.user_id,
            device_id: snapshot.device_id,
        }
    }

    /// Like [`encrypt`](Self::encrypt) for one content, returning the events and how many
    /// devices the reference withheld it from (e.g. `m.no_olm` when it has no session).
    pub async fn try_encrypt(
        &self,
        user_id: &str,
        device_id: &str,
        event_type: &str,
        content: &Value,
    ) -> (Vec<Value>, Vec<String>) {
        let user = UserId::parse(user_id).unwrap();
        let device = self
            .machine
            .get_device(&user, device_id.into(), None)
            .await
            .unwrap()
            .expect("the recipient device is known");
        let (requests, withheld) = self
            .machine
            .encrypt_content_for_devices(
                vec![(*device).clone()],
                event_type,
                content,
                CollectStrategy::AllDevices,
            )
            .await
            .unwrap();
        let events = requests
            .iter()
            .flat_map(|r| self.to_device_events(r))
            .collect();
        (
            events,
            withheld
                .into_iter()
                .map(|(_, code)| code.as_ref().to_owned())
                .collect(),
        )
    }
}

fn summarise(event: ProcessedToDeviceEvent) -> RefOutcome {
    match event {
        ProcessedToDeviceEvent::Decrypted {
            raw,
            encryption_info,
        } => {
            let sender_curve25519 = match &encryption_info.algorithm_info {
                AlgorithmInfo::OlmV1Curve25519AesSha2 {
                    curve25519_public_key_base64,
                } => curve25519_public_key_base64.clone(),
                other => format!("{other:?}"),
            };
            RefOutcome::Decrypted {
                event: serde_json::from_str(raw.json().get()).unwrap(),
                sender: encryption_info.sender.to_string(),
                sender_device: encryption_info.sender_device.map(|d| d.to_string()),
                sender_curve25519,
            }
        }
        ProcessedToDeviceEvent::UnableToDecrypt { utd_info, .. } => {
            RefOutcome::UnableToDecrypt(format!("{:?}", utd_info.reason))
        }
        ProcessedToDeviceEvent::PlainText(_) => RefOutcome::PlainText,
        ProcessedToDeviceEvent::Invalid(_) => RefOutcome::Invalid,
    }
}

/// A `/keys/claim` answer source: the first one-time key of a `/keys/upload` body, as
/// `(key_id, signed key)`.
pub fn first_one_time_key(upload_body: &Value) -> (String, Value) {
    let (id, key) = upload_body["one_time_keys"]
        .as_object()
        .expect("one_time_keys")
        .iter()
        .next()
        .expect("at least one one-time key");
    (id.clone(), key.clone())
}
