//! Reporting-policy plumbing: the failure stream, the policy and its consent switch, the counts,
//! and the per-batch decision (once-per-message marks, window, cap) for every failure.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};

use super::{BatchChanges, FailedToDeviceEvent, MachineState, OlmMachine, ToDeviceOutcome};
use crate::analytics::policy::{
    AnalyticsDecision, FailureKey, ReportingPolicy, ReportingStats, SuppressionRule,
};
use crate::analytics::FailureReason;
use crate::error::StoreError;
use crate::olm::envelope::{EnvelopeFacts, MessageHash};
use crate::reporting::{
    AnalyticsPayloadId, FailureDiagnostics, FailureStream, ToDeviceDecryptionFailure,
};
use crate::store::StoredAnalytics;

impl OlmMachine {
    /// A new subscription to the failure stream: one item per failed event, in order, from now
    /// on. A subscriber that stops polling never blocks decryption; it misses the oldest items
    /// once it lags by more than [`FAILURE_BUFFER_CAPACITY`](crate::reporting::FAILURE_BUFFER_CAPACITY)
    /// and is told how many.
    pub fn to_device_decryption_failure_stream(&self) -> FailureStream {
        self.reporter.subscribe()
    }

    /// The reporting policy in force.
    pub async fn reporting_policy(&self) -> ReportingPolicy {
        self.state.lock().await.policy
    }

    /// Replaces the reporting policy; takes effect from the next failure.
    pub async fn set_reporting_policy(&self, policy: ReportingPolicy) {
        self.state.lock().await.policy = policy;
    }

    /// The analytics consent switch: when off, failures produce no payload at all (nothing is kept
    /// for later); turning it back on does not replay earlier failures.
    pub async fn set_analytics_enabled(&self, enabled: bool) {
        self.state.lock().await.policy.analytics_enabled = enabled;
    }

    /// Failure counts per name (seen, reported, suppressed per rule) and decrypted counts, since
    /// the store was created and per hour; persisted with each batch. `outbox` reads the analytics
    /// outbox (left at zero, with a warning logged, if the store cannot be read).
    pub async fn reporting_stats(&self) -> ReportingStats {
        let mut stats = self.state.lock().await.policy_state.stats().clone();
        stats.listener_drops = self.listener_drops.load(Ordering::Relaxed);
        match self.store.analytics_outbox_stats().await {
            Ok(outbox) => stats.outbox = outbox,
            Err(error) => {
                tracing::warn!(target: super::LOG_TARGET, %error, "cannot read the analytics outbox's counts")
            }
        }
        stats
    }

    /// Counts payloads a listener lost because its bounded queue was full (called by the
    /// listener adapters; shown in [`reporting_stats`](Self::reporting_stats)).
    pub fn record_listener_drops(&self, dropped: u64) {
        self.listener_drops.fetch_add(dropped, Ordering::Relaxed);
    }

    pub(super) fn publish_failure(&self, index: usize, failed: &FailedToDeviceEvent) {
        let reason = failed.error.reason();
        tracing::debug!(target: super::LOG_TARGET, index, %reason, "to-device event failed to decrypt");
        self.reporter.publish(
            ToDeviceDecryptionFailure::new(
                reason,
                FailureDiagnostics {
                    sender: failed.facts.sender.clone(),
                    sender_key: failed.facts.sender_key.clone(),
                    message_type: failed.facts.message_type,
                    index,
                    error: failed.error.to_string(),
                },
                failed.analytics,
            )
            .with_analytics_id(failed.analytics_id),
        );
    }

    /// Decides, for every failure of the batch, whether it produces a payload, and records the
    /// once-per-message marks, the policy state and the reported payloads (the analytics outbox's
    /// new rows) in the batch, so that they all commit in its one transaction.
    pub(super) async fn apply_reporting_policy<S: AsRef<str>>(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        outcomes: &mut [ToDeviceOutcome],
        raw_events: &[S],
        now: u64,
    ) -> Result<(), StoreError> {
        let mut decrypted = 0;
        let mut marked_in_batch = HashSet::new();
        let batch_number = batch.batch_number.unwrap_or_default();
        for (index, (outcome, raw)) in outcomes.iter_mut().zip(raw_events).enumerate() {
            let failed = match outcome {
                ToDeviceOutcome::Failed(failed) => failed,
                ToDeviceOutcome::Decrypted(event) => {
                    decrypted += u64::from(!event.re_emitted);
                    continue;
                }
                ToDeviceOutcome::Plaintext(_) => continue,
            };
            // A message is identified by its Olm message hash when it got that far, else by its
            // raw text; hashed with the reason so that a replay of a once-decrypted message is
            // still reported once.
            let mark = failure_mark(&failed.facts, failed.error.reason(), raw.as_ref());
            let already_seen =
                !marked_in_batch.insert(mark) || self.store.contains_failure_mark(&mark).await?;
            if !already_seen {
                batch.failure_marks.push(mark);
            }
            let key = FailureKey {
                reason: failed.error.reason(),
                sender: failed.facts.sender.as_deref(),
                sender_key: failed.facts.sender_key.as_deref(),
                already_seen,
            };
            let policy = state.policy;
            failed.analytics = state.policy_state.decide(&policy, &key, now);
            batch.policy_changed = true;
            if let AnalyticsDecision::Reported(payload) = &failed.analytics {
                let id = AnalyticsPayloadId::from_batch_and_index(batch_number, index as u64);
                failed.analytics_id = Some(id);
                batch.analytics.push(StoredAnalytics {
                    id: id.0,
                    name: payload.reason().analytics_name().to_owned(),
                    created_at: now,
                });
            }
        }
        state.policy_state.record_decrypted(decrypted, now);
        batch.policy_changed |= decrypted > 0;
        Ok(())
    }
}

/// Placeholder until [`OlmMachine::apply_reporting_policy`] decides; never published.
pub(super) const UNDECIDED: AnalyticsDecision =
    AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen);

fn failure_mark(facts: &EnvelopeFacts, reason: FailureReason, raw: &str) -> MessageHash {
    let mut hasher = Sha256::new();
    hasher.update(reason.as_str().as_bytes());
    match &facts.message_hash {
        Some(hash) => hasher.update(hash.0),
        None => hasher.update(raw.as_bytes()),
    }
    MessageHash(hasher.finalize().into())
}
