//! The UniFFI adapter that exports the core to Swift, Kotlin and Python.
//!
//! This module is deliberately thin: it converts between the core types and FFI-friendly records,
//! and owns the one thing the core does not have — a runtime on which failure listeners are called.
//! Nothing in the core knows it is exported.
//!
//! - [`OlmMachine`] wraps [`crate::OlmMachine`] with JSON-string arguments and results.
//! - Failures reach the app either push-style ([`DecryptionFailureListener`] plus a
//!   [`ListenerHandle`]) or pull-style ([`FailureSubscription::next`], which the hand-written Swift
//!   `AsyncStream` and Kotlin `Flow` helpers wrap).

mod callbacks;
mod listener;
mod logging;
mod requests;
mod taxonomy;
mod types;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::runtime::Runtime;

use crate::machine::{OlmMachine as CoreMachine, ToDeviceOutcome};
use crate::olm::device_keys::parse_keys_upload_body;
use crate::reporting::FailureStream;
use crate::store::StoreKey;

pub use callbacks::prepare_for_exit;
use listener::AnalyticsDelivery;
pub use listener::{DecryptionFailureListener, ListenerHandle, LISTENER_QUEUE_CAPACITY};
pub use logging::{redact, set_log_sink, LogLevel, LogSink, QUEUE_CAPACITY, REDACTED_KEY};
pub use requests::OutgoingRequestFfi;
pub use taxonomy::{all_failure_reasons, failure_reason_from_name, FailureReasonInfo};
pub use types::{
    CryptoError, CryptoSdkFfi, DecryptedEvent, DecryptionFailure, ErrorDomainFfi, FailureReasonFfi,
    IdentityKeysFfi, KeysQueryOutcomeFfi, PendingEvent, PosthogErrorEvent, RefusedKeyChangeFfi,
    ReportingPolicyFfi, ToDeviceResult,
};

/// The runtime on which listener tasks run. Foreign callers are usually not inside a tokio
/// runtime, so the adapter owns one; it is created on first use and lives for the process.
fn listener_runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("tdc-failure-listeners")
            .build()
            .expect("cannot start the failure listener runtime")
    })
}

/// One Matrix device's Olm machine, for Swift, Kotlin and Python.
#[derive(uniffi::Object)]
pub struct OlmMachine {
    inner: Arc<CoreMachine>,
    /// The listeners and the analytics outbox payloads handed to them.
    delivery: Arc<AnalyticsDelivery>,
}

impl OlmMachine {
    fn wrap(inner: CoreMachine) -> Arc<Self> {
        let inner = Arc::new(inner);
        Arc::new(Self {
            delivery: AnalyticsDelivery::new(&inner),
            inner,
        })
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl OlmMachine {
    /// Opens (or creates) the machine in the encrypted SQLite store at `path`. `store_key` must
    /// be exactly 32 bytes; keep it in the Keychain / Keystore.
    #[uniffi::constructor]
    pub async fn open_sqlite(
        user_id: String,
        device_id: String,
        path: String,
        store_key: Vec<u8>,
    ) -> Result<Arc<Self>, CryptoError> {
        let inner =
            CoreMachine::with_sqlite(&user_id, &device_id, path, store_key_from(&store_key)?)
                .await?;
        Ok(Self::wrap(inner))
    }

    /// Opens (or creates) the machine in the SQLite store at `path`, encrypted with a key derived
    /// from `passphrase` (PBKDF2-HMAC-SHA256, 600,000 iterations, random salt kept in the store).
    #[uniffi::constructor]
    pub async fn open_sqlite_with_passphrase(
        user_id: String,
        device_id: String,
        path: String,
        passphrase: String,
    ) -> Result<Arc<Self>, CryptoError> {
        let store = crate::store::SqliteStore::open_with_passphrase(
            path,
            &passphrase,
            crate::store::Synchronous::Normal,
        )?;
        let inner = CoreMachine::open(&user_id, &device_id, Arc::new(store)).await?;
        Ok(Self::wrap(inner))
    }

    /// Opens a machine on a new in-memory store (tests, or apps that keep no state).
    #[uniffi::constructor]
    pub async fn open_in_memory(
        user_id: String,
        device_id: String,
    ) -> Result<Arc<Self>, CryptoError> {
        let inner = CoreMachine::in_memory(&user_id, &device_id).await?;
        Ok(Self::wrap(inner))
    }

    /// Replaces the reporting policy (which failures become PostHog events).
    pub async fn set_reporting_policy(&self, policy: ReportingPolicyFfi) {
        self.inner.set_reporting_policy(policy.into()).await;
    }

    /// The analytics consent switch: off produces no payloads at all; on does not replay.
    pub async fn set_analytics_enabled(&self, enabled: bool) {
        self.inner.set_analytics_enabled(enabled).await;
    }

    /// Failure counts per name (seen, reported, suppressed per rule), decrypted counts, since
    /// start and per hour, and listener drops, as JSON.
    pub async fn reporting_stats_json(&self) -> String {
        serde_json::to_string(&self.inner.reporting_stats().await)
            .expect("stats hold only numbers and names")
    }

    /// Our user id.
    pub fn user_id(&self) -> String {
        self.inner.user_id().to_owned()
    }

    /// Our device id.
    pub fn device_id(&self) -> String {
        self.inner.device_id().to_owned()
    }

    /// Our identity keys, base64.
    pub fn identity_keys(&self) -> IdentityKeysFfi {
        let keys = self.inner.identity_keys();
        IdentityKeysFfi {
            curve25519: keys.curve25519.to_base64(),
            ed25519: keys.ed25519.to_base64(),
        }
    }

    /// The `/keys/upload` body (JSON) with every unpublished key, or `None` if there is none.
    pub async fn keys_for_upload(&self) -> Option<String> {
        self.inner.keys_for_upload().await.map(|v| v.to_string())
    }

    /// Marks the keys of the last `keys_for_upload` as published.
    pub async fn mark_keys_as_published(&self) -> Result<(), CryptoError> {
        Ok(self.inner.mark_keys_as_published().await?)
    }

    /// Generates up to `count` one-time keys; returns how many were made.
    pub async fn generate_one_time_keys(&self, count: u32) -> Result<u32, CryptoError> {
        let made = self.inner.generate_one_time_keys(count as usize).await?;
        Ok(saturating_u32(made))
    }

    /// Tops one-time keys up from the server's `signed_curve25519` count; returns how many were
    /// generated.
    pub async fn receive_one_time_key_count(
        &self,
        server_count: u64,
        fallback_key_unused: bool,
    ) -> Result<u32, CryptoError> {
        let made = self
            .inner
            .receive_one_time_key_count(server_count, fallback_key_unused)
            .await?;
        Ok(saturating_u32(made))
    }

    /// Learns device keys from a `/keys/query` response (JSON); returns how many were stored.
    /// [`Self::receive_keys_query`] also says what was rejected and which key changes were
    /// refused.
    pub async fn receive_keys_query_response(&self, json: String) -> Result<u32, CryptoError> {
        Ok(self.receive_keys_query(json).await?.stored)
    }

    /// Learns device keys from a `/keys/query` response (JSON): how many were stored, which
    /// entries were rejected, and which tried to change a known device's Ed25519 key (refused —
    /// surface those: the server, or a device re-created under its old id, claims another
    /// identity for a device the user knows).
    pub async fn receive_keys_query(
        &self,
        json: String,
    ) -> Result<KeysQueryOutcomeFfi, CryptoError> {
        let body = parse_json(&json)?;
        let outcome = self.inner.receive_keys_query_response(&body).await?;
        Ok(outcome.into())
    }

    /// Decrypts one `m.room.encrypted` to-device event (JSON). On failure the error names the
    /// reason, and listeners/subscriptions receive the PostHog event.
    pub async fn decrypt_to_device_event(
        &self,
        json: String,
    ) -> Result<DecryptedEvent, DecryptionFailure> {
        let result = self.inner.decrypt_to_device_event(&json).await;
        self.delivery.claim_after_batch().await;
        result
            .map(DecryptedEvent::from)
            .map_err(DecryptionFailure::from)
    }

    /// Decrypts the `to_device.events` array (JSON) of one `/sync` response, in order.
    pub async fn receive_to_device_events(
        &self,
        json_array: String,
    ) -> Result<Vec<ToDeviceResult>, CryptoError> {
        let events: Vec<Box<RawValue>> =
            serde_json::from_str(&json_array).map_err(|e| CryptoError::InvalidJson {
                detail: e.to_string(),
            })?;
        let raw: Vec<&str> = events.iter().map(|e| e.get()).collect();
        let outcomes = self.inner.receive_to_device_events(&raw).await;
        // Payloads left undelivered go out with the next batch, whatever it produced.
        self.delivery.claim_after_batch().await;
        Ok(outcomes?.into_iter().map(ToDeviceResult::from).collect())
    }

    /// Like `receive_to_device_events`, committing the `/sync` `next_batch` token with the batch.
    pub async fn receive_sync(
        &self,
        json_array: String,
        next_batch: Option<String>,
    ) -> Result<Vec<ToDeviceResult>, CryptoError> {
        let events: Vec<Box<RawValue>> =
            serde_json::from_str(&json_array).map_err(|e| CryptoError::InvalidJson {
                detail: e.to_string(),
            })?;
        let raw: Vec<&str> = events.iter().map(|e| e.get()).collect();
        let outcomes = self.inner.receive_sync(&raw, next_batch.as_deref()).await;
        self.delivery.claim_after_batch().await;
        Ok(outcomes?.into_iter().map(ToDeviceResult::from).collect())
    }

    /// The `next_batch` token committed with the last `receive_sync`: resume `/sync` from it.
    pub async fn sync_token(&self) -> Result<Option<String>, CryptoError> {
        Ok(self.inner.sync_token().await?)
    }

    /// Decrypted results not yet acknowledged (after a crash, hand them to the app again).
    pub async fn pending_decrypted_events(&self) -> Result<Vec<PendingEvent>, CryptoError> {
        Ok(self
            .inner
            .pending_decrypted_events()
            .await?
            .into_iter()
            .map(PendingEvent::from)
            .collect())
    }

    /// Removes handled results from the outbox; a later re-delivery is then a replay.
    pub async fn acknowledge(&self, ids: Vec<String>) -> Result<(), CryptoError> {
        Ok(self.inner.acknowledge(&ids).await?)
    }

    /// Re-encrypts the store with a new 32-byte key (key rotation).
    pub async fn rekey(&self, new_store_key: Vec<u8>) -> Result<(), CryptoError> {
        Ok(self
            .inner
            .rekey_store(store_key_from(&new_store_key)?)
            .await?)
    }

    /// Deletes everything in the store (logout); the machine refuses every later write.
    pub async fn wipe(&self) -> Result<(), CryptoError> {
        Ok(self.inner.wipe().await?)
    }

    /// Encrypts one `event_type` event with `content_json` for the device whose `/keys/upload`
    /// body (JSON, with at least one one-time key) is given. Returns a JSON array of
    /// `m.room.encrypted` to-device events.
    pub async fn encrypt_for(
        &self,
        recipient_keys_upload_json: String,
        event_type: String,
        content_json: String,
    ) -> Result<String, CryptoError> {
        let recipient =
            parse_keys_upload_body(&parse_json(&recipient_keys_upload_json)?).map_err(|e| {
                CryptoError::InvalidJson {
                    detail: e.to_string(),
                }
            })?;
        let content = parse_json(&content_json)?;
        let events = self
            .inner
            .encrypt(&recipient, &event_type, &[content])
            .await?;
        Ok(Value::Array(events).to_string())
    }

    /// Calls `listener` with each PostHog payload the reporting policy let through, in order, on
    /// a background thread (never on the decrypting thread, never under a lock). Payloads come
    /// from the analytics outbox: a payload counts as delivered, and is removed from the store,
    /// once a listener returned without throwing; one that threw goes out again with the next
    /// batch or `flush_pending_analytics()` (at most 5 attempts). Payloads left by an earlier run
    /// or another process go out as soon as a listener is added. A listener that panics or throws
    /// is isolated. Delivery stops when the handle is cancelled or dropped, or when the machine is
    /// dropped.
    pub fn add_decryption_failure_listener(
        &self,
        listener: Arc<dyn DecryptionFailureListener>,
    ) -> Arc<ListenerHandle> {
        Arc::new(self.delivery.add_listener(listener))
    }

    /// Hands every undelivered analytics payload to the listeners now: those of this process
    /// that a listener threw on, and those another process or an earlier run left behind once
    /// their claim ran out (60 s after it was made). Returns how many were queued; 0 without a
    /// listener (the payloads then wait for a process that has one).
    pub async fn flush_pending_analytics(&self) -> Result<u32, CryptoError> {
        Ok(self.delivery.claim_and_queue().await?)
    }

    /// A pull-style subscription to every failure from now on.
    pub fn failure_subscription(&self) -> Arc<FailureSubscription> {
        Arc::new(FailureSubscription {
            stream: tokio::sync::Mutex::new(self.inner.to_device_decryption_failure_stream()),
            missed: AtomicU64::new(0),
        })
    }
}

/// A store key from the app's bytes, which must be exactly 32.
fn store_key_from(bytes: &[u8]) -> Result<StoreKey, CryptoError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::InvalidStoreKey {
        length: bytes.len() as u64,
    })?;
    Ok(StoreKey::from_bytes(bytes))
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn parse_json(json: &str) -> Result<Value, CryptoError> {
    serde_json::from_str(json).map_err(|e| CryptoError::InvalidJson {
        detail: e.to_string(),
    })
}

/// A pull-style subscription to the failure stream.
#[derive(uniffi::Object)]
pub struct FailureSubscription {
    stream: tokio::sync::Mutex<FailureStream>,
    missed: AtomicU64,
}

#[uniffi::export(async_runtime = "tokio")]
impl FailureSubscription {
    /// The next failure, waiting for one; `None` once the machine is gone. Items missed because
    /// this subscriber fell behind are skipped and counted in [`Self::missed`].
    pub async fn next(&self) -> Option<PosthogErrorEvent> {
        let mut stream = self.stream.lock().await;
        loop {
            match stream.next().await? {
                Ok(failure) => {
                    if let Some(payload) = failure.payload() {
                        return Some(PosthogErrorEvent::from(*payload));
                    }
                }
                Err(lag) => {
                    self.missed.fetch_add(lag.missed, Ordering::Relaxed);
                }
            }
        }
    }

    /// How many failures this subscription skipped because it fell behind.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }
}

impl From<ToDeviceOutcome> for ToDeviceResult {
    fn from(outcome: ToDeviceOutcome) -> Self {
        match outcome {
            ToDeviceOutcome::Decrypted(event) => Self::Decrypted {
                event: event.into(),
            },
            ToDeviceOutcome::Plaintext(value) => Self::Plaintext {
                json: value.to_string(),
            },
            ToDeviceOutcome::Failed(failed) => Self::Failed {
                reason: failed.error.reason().into(),
                message: failed.error.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::analytics::FailureReason;

    /// A distinct Megolm-in-to-device event per `n`, so the once-per-message rule reports each.
    fn bad_event(n: usize) -> String {
        format!(
            r#"{{"type":"m.room.encrypted","sender":"@a{n}:b","content":{{"algorithm":"m.megolm.v1.aes-sha2"}}}}"#
        )
    }

    #[derive(Default)]
    struct Collecting(Mutex<Vec<PosthogErrorEvent>>);

    impl DecryptionFailureListener for Collecting {
        fn on_decryption_failure(&self, event: PosthogErrorEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    struct Panicking;

    impl DecryptionFailureListener for Panicking {
        fn on_decryption_failure(&self, _: PosthogErrorEvent) {
            panic!("listener bug");
        }
    }

    fn wait_for(condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn every_core_reason_maps_to_the_same_named_ffi_reason() {
        for reason in FailureReason::ALL {
            let ffi = FailureReasonFfi::from(reason);
            assert_eq!(format!("{ffi:?}"), format!("{reason:?}"));
            assert_eq!(FailureReason::from(ffi), reason);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_panicking_listener_disturbs_neither_decryption_nor_other_listeners() {
        let machine = OlmMachine::open_in_memory("@bob:example.org".into(), "BOBDEVICE".into())
            .await
            .unwrap();
        let good = Arc::new(Collecting::default());
        let _bad = machine.add_decryption_failure_listener(Arc::new(Panicking));
        let handle = machine.add_decryption_failure_listener(good.clone());
        let subscription = machine.failure_subscription();
        for n in 0..2 {
            let error = machine
                .decrypt_to_device_event(bad_event(n))
                .await
                .unwrap_err();
            let DecryptionFailure::Failed { reason, .. } = error;
            assert_eq!(reason, FailureReasonFfi::UnsupportedAlgorithm);
        }
        wait_for(|| good.0.lock().unwrap().len() == 2);
        let event = subscription.next().await.unwrap();
        assert_eq!(
            event.json,
            r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_UnsupportedAlgorithm","cryptoSDK":"Rust"}}"#
        );
        assert_eq!(event, good.0.lock().unwrap()[0]);

        drop(handle);
        machine
            .decrypt_to_device_event(bad_event(2))
            .await
            .unwrap_err();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            good.0.lock().unwrap().len(),
            2,
            "delivered after the handle was dropped"
        );
    }
}
