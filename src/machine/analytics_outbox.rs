//! The analytics outbox: PostHog payloads kept in the store from the batch that decided them until
//! they are delivered, so that analytics survive a kill (the iOS notification extension is killed
//! routinely) and are reported once across processes.
//!
//! # Design
//!
//! - **Committed with their marks.** The payloads a batch reports are rows of the store's
//!   `analytics_outbox` table, written in the batch's one transaction together with the
//!   once-per-message failure marks and the policy state that decided them. So a committed mark
//!   always has its payload beside it; before the commit neither exists (the retried batch
//!   decides again).
//! - **Ids.** Each payload has an [`AnalyticsPayloadId`]: the batch number in the high 32 bits,
//!   the event's index in the batch in the low 32. Ids order payloads oldest first.
//! - **Claims.** Every machine instance has a random owner token. A batch commits its payloads
//!   claimed by the instance that committed them, under a lease ([`DEFAULT_ANALYTICS_LEASE`],
//!   [`OlmMachine::set_analytics_lease`]). A payload claimed by another owner whose lease still
//!   holds is being delivered elsewhere (the app, the extension) and is left alone; once the
//!   lease ends it is treated as abandoned — its owner was killed — and whoever runs next claims
//!   it. A claim is one SQLite statement, so two processes never both hold a live claim on one
//!   payload. The price: a payload abandoned by a killed process waits until its lease ends.
//! - **Delivered**, per channel, removes the payload (its own small transaction):
//!   - the Rust failure stream: the app calls [`OlmMachine::acknowledge_analytics`] with the
//!     item's [`analytics_id`](crate::ToDeviceDecryptionFailure::analytics_id) once it handed the
//!     payload to PostHog;
//!   - the FFI listener: its callback returned without throwing (`src/ffi/listener.rs` then
//!     acknowledges at once; a throw releases the claim, see below);
//!   - the CLI: `decrypt --analytics-out` wrote and flushed the payload's line.
//! - **Undelivered** payloads — a kill between commit and delivery, a subscriber that lagged and
//!   saw `MissedFailures`, a throwing listener — stay in the store.
//!   [`OlmMachine::flush_pending_analytics`] claims and returns them (after a restart, or in the
//!   other process, once their lease ended); the FFI adapter also does so after every batch, when a
//!   listener is added, and on its own `flush_pending_analytics()`.
//! - **Bounds.** A failed delivery ([`OlmMachine::release_analytics`], what the FFI adapter calls
//!   when a listener throws) counts one attempt and frees the payload for the next delivery; at
//!   [`MAX_ANALYTICS_DELIVERY_ATTEMPTS`] attempts it is dropped. The outbox never holds more than
//!   [`MAX_PENDING_ANALYTICS`] payloads: beyond that the oldest are dropped. Both drops are
//!   counted ([`ReportingStats::outbox`](crate::analytics::ReportingStats::outbox)). With the
//!   default policy (at most 30 payloads a minute) a listener that always throws keeps at most the
//!   payloads of its last five deliveries.
//! - **The one double-report window** is after delivery and before its removal commits: a kill
//!   there leaves a delivered payload in the store, and it is delivered again once its lease ends.
//!   Removal follows delivery at once (the FFI delivery thread acknowledges before it calls the
//!   listener again; the CLI acknowledges right after flushing the file), so the window is one
//!   small SQLite transaction. A delivery that takes longer than the lease (a listener blocking
//!   for over a minute) can also be repeated by another process that claims the payload meanwhile.
//!
//! A `Store` failure's payload (the store just failed to commit the batch) cannot be kept: it is
//! published on the stream without an id and delivered at most once, from memory. Observers — the
//! FFI pull subscription, a Rust subscriber that never acknowledges — remove nothing: their
//! payloads stay (within the bound) for a channel that delivers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{now_millis, OlmMachine};
use crate::analytics::{AnalyticsEvent, FailureReason};
use crate::error::StoreError;
use crate::reporting::{AnalyticsPayloadId, PendingAnalyticsEvent};
use crate::store::{
    AnalyticsClaim, CryptoStore, StoredAnalytics, MAX_ANALYTICS_DELIVERY_ATTEMPTS,
    MAX_PENDING_ANALYTICS,
};

/// How long a machine's claim on the payloads it is delivering holds by default: long enough for
/// any listener to return, short enough that a payload abandoned by a killed extension goes out
/// with the app's next batch a minute later.
pub const DEFAULT_ANALYTICS_LEASE: Duration = Duration::from_secs(60);

/// Acknowledges or releases one machine instance's analytics payloads (see
/// [`OlmMachine::analytics_acknowledger`]). It keeps the store open while it lives.
#[derive(Clone)]
pub struct AnalyticsAcknowledger {
    store: Arc<dyn CryptoStore>,
    owner: [u8; 16],
}

impl std::fmt::Debug for AnalyticsAcknowledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsAcknowledger")
            .finish_non_exhaustive()
    }
}

impl AnalyticsAcknowledger {
    /// Like [`OlmMachine::acknowledge_analytics`].
    pub async fn acknowledge(&self, ids: &[AnalyticsPayloadId]) -> Result<(), StoreError> {
        let ids: Vec<u64> = ids.iter().map(|id| id.0).collect();
        self.store.remove_analytics(&ids).await
    }

    /// Like [`OlmMachine::release_analytics`].
    pub async fn release(&self, ids: &[AnalyticsPayloadId]) -> Result<u64, StoreError> {
        let ids: Vec<u64> = ids.iter().map(|id| id.0).collect();
        let dropped = self.store.release_analytics(self.owner, &ids).await?;
        if dropped > 0 {
            tracing::warn!(target: super::LOG_TARGET, dropped, attempts = MAX_ANALYTICS_DELIVERY_ATTEMPTS, "dropping analytics payloads that failed every delivery attempt");
        }
        Ok(dropped)
    }
}

pub(super) fn new_owner_token() -> Result<[u8; 16], StoreError> {
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| {
        StoreError::Io(std::io::Error::other(format!(
            "cannot draw a random analytics owner token: {e}"
        )))
    })?;
    Ok(token)
}

pub(super) fn lease_millis(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)
}

impl OlmMachine {
    /// How long this machine's claims on the payloads it delivers hold (see
    /// [`DEFAULT_ANALYTICS_LEASE`]); applies to claims made from now on.
    pub fn set_analytics_lease(&self, lease: Duration) {
        self.analytics_lease_ms
            .store(lease_millis(lease), Ordering::Relaxed);
    }

    /// The lease of this machine's claims.
    pub fn analytics_lease(&self) -> Duration {
        Duration::from_millis(self.analytics_lease_ms.load(Ordering::Relaxed))
    }

    pub(super) fn analytics_claim(&self, now: u64) -> AnalyticsClaim {
        AnalyticsClaim {
            owner: self.analytics_owner,
            lease_until: now.saturating_add(self.analytics_lease_ms.load(Ordering::Relaxed)),
        }
    }

    /// Claims and returns, oldest first, every payload of the analytics outbox that nobody else is
    /// delivering: those this machine committed and nobody acknowledged yet (including ones still
    /// on the failure stream), and those another machine instance left behind once its lease ended
    /// (it was killed, or it was this app before a restart). Send each to PostHog, then
    /// [`acknowledge_analytics`](Self::acknowledge_analytics) it.
    ///
    /// Call it at start, and after a failure stream reported `MissedFailures`; an app that prefers
    /// not to deliver from the stream at all can instead call it after every batch.
    pub async fn flush_pending_analytics(&self) -> Result<Vec<PendingAnalyticsEvent>, StoreError> {
        self.claim_pending_analytics(MAX_PENDING_ANALYTICS as usize)
            .await
    }

    /// Like [`flush_pending_analytics`](Self::flush_pending_analytics), at most `limit` payloads.
    pub async fn claim_pending_analytics(
        &self,
        limit: usize,
    ) -> Result<Vec<PendingAnalyticsEvent>, StoreError> {
        self.refuse_if_wiped().await?;
        let now = now_millis();
        let claimed = self
            .store
            .claim_analytics(self.analytics_claim(now), now, limit)
            .await?;
        let mut pending = Vec::with_capacity(claimed.len());
        let mut unreadable = Vec::new();
        for StoredAnalytics { id, name, .. } in claimed {
            match FailureReason::from_analytics_name(&name) {
                Some(reason) => pending.push(PendingAnalyticsEvent {
                    id: AnalyticsPayloadId(id),
                    event: AnalyticsEvent::for_failure(reason),
                }),
                None => unreadable.push(id),
            }
        }
        if !unreadable.is_empty() {
            // Only a damaged row can hold a name outside the taxonomy: it can never be sent.
            tracing::warn!(target: super::LOG_TARGET, count = unreadable.len(), "removing analytics payloads with an unknown failure name");
            self.store.remove_analytics(&unreadable).await?;
        }
        Ok(pending)
    }

    /// Removes delivered payloads from the analytics outbox. Unknown ids (already removed) are
    /// ignored, so acknowledging twice is harmless.
    pub async fn acknowledge_analytics(
        &self,
        ids: &[AnalyticsPayloadId],
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.refuse_if_wiped().await?;
        let ids: Vec<u64> = ids.iter().map(|id| id.0).collect();
        self.store.remove_analytics(&ids).await
    }

    /// Reports that delivering these payloads failed (the app could not hand them to PostHog):
    /// each counts one attempt and can be claimed again at once, by the next delivery; at
    /// [`MAX_ANALYTICS_DELIVERY_ATTEMPTS`] attempts a payload is dropped and counted. Returns how
    /// many were dropped. Only this machine's own claims are released.
    pub async fn release_analytics(&self, ids: &[AnalyticsPayloadId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.refuse_if_wiped().await?;
        let ids: Vec<u64> = ids.iter().map(|id| id.0).collect();
        let dropped = self
            .store
            .release_analytics(self.analytics_owner, &ids)
            .await?;
        if dropped > 0 {
            tracing::warn!(target: super::LOG_TARGET, dropped, attempts = MAX_ANALYTICS_DELIVERY_ATTEMPTS, "dropping analytics payloads that failed every delivery attempt");
        }
        Ok(dropped)
    }

    /// A handle that acknowledges and releases this machine's claims without the machine: what
    /// a delivery that may outlive the machine (a listener thread at app teardown) keeps, so that
    /// a payload delivered after the machine was dropped is still removed.
    pub fn analytics_acknowledger(&self) -> AnalyticsAcknowledger {
        AnalyticsAcknowledger {
            store: Arc::clone(&self.store),
            owner: self.analytics_owner,
        }
    }

    async fn refuse_if_wiped(&self) -> Result<(), StoreError> {
        if self.state.lock().await.wiped {
            return Err(StoreError::Wiped);
        }
        Ok(())
    }
}
