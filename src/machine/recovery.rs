//! Recovering from undecryptable messages (spec: "Recovering from undecryptable messages").
//!
//! When a message fails with `SessionWedged`, `MissingSession` or `UnknownOneTimeKey` and the
//! sending device is known — from `/keys/query`, or from a verified `sender_device_keys` in an
//! earlier message (remembered for this purpose only, persisted apart from `/keys/query` devices)
//! — the machine queues a `/keys/claim` for one of that device's one-time keys — at most once per
//! device per hour, persisted. When the app feeds the
//! claim response back, the machine creates a new Olm session and queues a `/sendToDevice` with an
//! Olm-encrypted `m.dummy`; the other device then has a fresh session with us, and its next
//! messages decrypt. Everything is committed atomically and survives restarts.

use serde_json::{json, Value};

use serde_json::value::RawValue;

use super::{now_millis, BatchChanges, MachineState, OlmMachine, ToDeviceOutcome};
use crate::error::StoreError;
use crate::olm::device_keys::{verify_signed_one_time_key, DeviceKeys, KnownDevices};
use crate::olm::envelope::ENCRYPTED_EVENT_TYPE;
use crate::olm::sessions::SessionEntry;
use crate::requests::{new_id, OutgoingRequest, OutgoingRequestKind, RequestError};
use crate::store::{StoredDevice, StoredRequest};
use vodozemac::olm::SessionConfig;
use vodozemac::Curve25519PublicKey;

/// The spec's limit: no new session with the same device more than once per hour.
pub const RECOVERY_INTERVAL_MS: u64 = 3_600_000;

/// The one-time key algorithm claimed for new sessions.
const SIGNED_CURVE25519: &str = "signed_curve25519";

/// Remembers the device that verified `sender_device_keys` identified (the message passed every
/// check), so that a later wedged session with it can be recovered — also after a restart. Only
/// a device that is new, or whose keys changed, is stored; `parsed` is the object as the
/// plaintext check parsed it, if it did (else it is parsed here).
pub(super) fn remember_recovery_device(
    known: &mut KnownDevices,
    batch: &mut BatchChanges,
    sender_device_keys: &RawValue,
    parsed: Option<DeviceKeys>,
    sender: &SenderIdentity<'_>,
) {
    let unchanged = known
        .by_curve25519(sender.user_id, sender.curve25519)
        .is_some_and(|old| {
            old.device_id == sender.device_id && old.ed25519.to_base64() == sender.ed25519
        });
    if unchanged {
        return;
    }
    // Verified by the plaintext checks (now, or this exact text earlier).
    let device = match parsed {
        Some(device) => device,
        None => {
            let Ok(value) = serde_json::from_str(sender_device_keys.get()) else {
                return;
            };
            let Ok(device) = DeviceKeys::from_json_unverified(&value) else {
                return;
            };
            device
        }
    };
    batch.recovery_devices.push(StoredDevice {
        user_id: device.user_id.clone(),
        device_id: device.device_id.clone(),
        json: sender_device_keys.get().to_owned(),
    });
    known.insert(device);
}

/// Who sent a message that passed the plaintext checks, as they identified it.
pub(super) struct SenderIdentity<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub curve25519: &'a Curve25519PublicKey,
    /// Unpadded base64, as the plaintext carried it.
    pub ed25519: &'a str,
}

fn stored_request(request: &OutgoingRequest, now: u64) -> Result<StoredRequest, StoreError> {
    Ok(StoredRequest {
        request_id: request.request_id.clone(),
        json: serde_json::to_string(request).map_err(|e| StoreError::Corrupted {
            what: "outgoing request",
            detail: e.to_string(),
        })?,
        created_at: now,
    })
}

impl OlmMachine {
    /// Queues a `/keys/claim` for each known device whose message needs a new session.
    pub(super) async fn schedule_recovery(
        &self,
        state: &MachineState,
        batch: &mut BatchChanges,
        outcomes: &[ToDeviceOutcome],
        now: u64,
    ) -> Result<(), StoreError> {
        for outcome in outcomes {
            let ToDeviceOutcome::Failed(failed) = outcome else {
                continue;
            };
            if !failed.error.reason().needs_new_session() {
                continue;
            }
            let (Some(sender), Some(sender_key)) = (&failed.facts.sender, &failed.facts.sender_key)
            else {
                continue;
            };
            let Ok(curve25519) = Curve25519PublicKey::from_base64(sender_key) else {
                continue;
            };
            let known = state
                .devices
                .by_curve25519(sender, &curve25519)
                .or_else(|| state.recovery_devices.by_curve25519(sender, &curve25519));
            let Some(device) = known else {
                tracing::debug!("cannot recover a session with an unknown device");
                continue;
            };
            if batch
                .recovery_attempts
                .iter()
                .any(|(key, _)| key == sender_key)
            {
                continue;
            }
            if let Some(last) = self.store.last_recovery_attempt(sender_key).await? {
                if now.saturating_sub(last) < RECOVERY_INTERVAL_MS {
                    continue;
                }
            }
            let request = OutgoingRequest {
                request_id: new_id(),
                request: OutgoingRequestKind::KeysClaim {
                    body: json!({
                        "one_time_keys": {
                            device.user_id.clone(): {device.device_id.clone(): SIGNED_CURVE25519}
                        }
                    }),
                },
            };
            batch.outgoing_requests.push(stored_request(&request, now)?);
            batch.recovery_attempts.push((sender_key.clone(), now));
        }
        Ok(())
    }

    /// Every request still to be sent, oldest first. An unsent request keeps its id.
    pub async fn outgoing_requests(&self) -> Result<Vec<OutgoingRequest>, StoreError> {
        self.store
            .load_outgoing_requests()
            .await?
            .into_iter()
            .map(|stored| {
                serde_json::from_str(&stored.json).map_err(|e| StoreError::Corrupted {
                    what: "outgoing request",
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Marks a request as sent. For a `/keys/claim`, `response` is the server's response body:
    /// a new Olm session is created with each claimed device and an encrypted `m.dummy` is queued
    /// as a `/sendToDevice` request. Everything is committed in one transaction.
    pub async fn mark_request_as_sent(
        &self,
        request_id: &str,
        response: Option<&Value>,
    ) -> Result<(), RequestError> {
        let request = self
            .outgoing_requests()
            .await?
            .into_iter()
            .find(|r| r.request_id == request_id)
            .ok_or_else(|| RequestError::UnknownRequest(request_id.to_owned()))?;
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let mut batch = BatchChanges::default();
        batch.sent_requests.push(request_id.to_owned());
        if let OutgoingRequestKind::KeysClaim { .. } = request.request {
            let response = response.ok_or_else(|| RequestError::InvalidResponse {
                request_id: request_id.to_owned(),
                detail: "a /keys/claim request needs the server's response".to_owned(),
            })?;
            self.start_recovery_sessions(&mut state, &mut batch, request_id, response)
                .await?;
        }
        let changes = self.collect_changes(&mut state, batch)?;
        self.commit(&mut state, changes).await?;
        Ok(())
    }

    async fn start_recovery_sessions(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        request_id: &str,
        response: &Value,
    ) -> Result<(), RequestError> {
        let invalid = |detail: &str| RequestError::InvalidResponse {
            request_id: request_id.to_owned(),
            detail: detail.to_owned(),
        };
        let users = response
            .get("one_time_keys")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("expected an object with a `one_time_keys` object"))?;
        let now = now_millis();
        let our_device_keys =
            crate::olm::account::signed_device_keys(&state.account, &self.user_id, &self.device_id);
        let mut messages = serde_json::Map::new();
        for (user_id, devices) in users {
            for (device_id, keys) in devices.as_object().into_iter().flatten() {
                let known = state
                    .devices
                    .by_id(user_id, device_id)
                    .or_else(|| state.recovery_devices.by_id(user_id, device_id));
                let Some(device) = known.cloned() else {
                    tracing::warn!("ignoring a claimed key of an unknown device");
                    continue;
                };
                let Some(content) = self
                    .new_session_with_dummy(state, batch, &device, keys, &our_device_keys, now)
                    .await?
                else {
                    continue;
                };
                messages
                    .entry(user_id.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("inserted as an object")
                    .insert(device_id.clone(), content);
            }
        }
        if !messages.is_empty() {
            let request = OutgoingRequest {
                request_id: new_id(),
                request: OutgoingRequestKind::ToDevice {
                    event_type: ENCRYPTED_EVENT_TYPE.to_owned(),
                    txn_id: new_id(),
                    body: json!({ "messages": messages }),
                },
            };
            batch.outgoing_requests.push(stored_request(&request, now)?);
        }
        Ok(())
    }

    /// Creates an outbound session with `device` from the first validly signed claimed key and
    /// returns the encrypted `m.dummy` content, or `None` when no claimed key verifies.
    async fn new_session_with_dummy(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        device: &DeviceKeys,
        claimed: &Value,
        our_device_keys: &Value,
        now: u64,
    ) -> Result<Option<Value>, RequestError> {
        let key = claimed
            .as_object()
            .into_iter()
            .flatten()
            .find_map(|(key_id, value)| verify_signed_one_time_key(key_id, value, device).ok());
        let Some(key) = key else {
            tracing::warn!("no validly signed one-time key was claimed for a device to recover");
            return Ok(None);
        };
        self.ensure_sessions_loaded(state, &device.curve25519)
            .await?;
        let mut session = state
            .account
            .create_outbound_session(SessionConfig::version_1(), device.curve25519, key.key)
            .map_err(|e| RequestError::Olm(e.to_string()))?;
        let content = self
            .encrypted_content(&mut session, device, "m.dummy", &json!({}), our_device_keys)
            .map_err(|e| RequestError::Olm(e.to_string()))?;
        // The newest session is the most recently used, so our next messages use it too.
        state
            .sessions
            .entry(device.curve25519.to_bytes())
            .or_default()
            .push(SessionEntry::new(session, now, true));
        batch.dirty_sender_keys.insert(device.curve25519.to_bytes());
        batch.claimed_one_time_keys.push(key.key.to_base64());
        Ok(Some(content))
    }
}
