//! Failure reporting: the stream of [`ToDeviceDecryptionFailure`] items.
//!
//! The machine publishes exactly one item per failed event, in order, after the batch has been
//! committed. Publishing never waits for subscribers: each subscriber reads from a bounded ring
//! buffer, and one that falls behind by more than [`FAILURE_BUFFER_CAPACITY`] items loses the oldest
//! ones and is told how many it missed. This module does not depend on the Olm machine.
//!
//! The stream is for observing failures; it is not what makes analytics durable. A caller that
//! persists the payloads the policy lets through (an *analytics outbox*, as the `to-device-crypto`
//! store does) gives each one an [`AnalyticsPayloadId`], puts it on the item
//! ([`ToDeviceDecryptionFailure::analytics_id`]) and removes the payload once the app
//! acknowledges it; payloads the app never acknowledged come back as [`PendingAnalyticsEvent`]s.
//! Both types are plain data: where they are kept is the caller's business.

use futures::stream::{self, BoxStream, StreamExt};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::policy::AnalyticsDecision;
use crate::{AnalyticsEvent, FailureReason};

/// How many failures a subscriber may fall behind before it starts missing items.
pub const FAILURE_BUFFER_CAPACITY: usize = 1024;

/// Local diagnostics of a failure, for logs and bug reports on the device.
///
/// These fields may hold identifiers and error texts, so they are never part of the analytics
/// payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FailureDiagnostics {
    /// The envelope `sender`, when the envelope had one.
    pub sender: Option<String>,
    /// The envelope `content.sender_key`, when present.
    pub sender_key: Option<String>,
    /// The Olm message type (0 pre-key, 1 normal), when our ciphertext entry had one.
    pub message_type: Option<u8>,
    /// Position of the event in its batch.
    pub index: usize,
    /// The error message, for engineers reading a log.
    pub error: String,
}

/// Identifies one payload in an analytics outbox: acknowledge it by this id once it was sent.
///
/// Ids grow with the order in which payloads were decided (the `to-device-crypto` machine uses
/// the batch number in the high 32 bits and the event's index in its batch in the low 32), so
/// sorting by id gives the oldest payload first.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub struct AnalyticsPayloadId(pub u64);

impl AnalyticsPayloadId {
    /// The id of the payload decided for event `index` of batch `batch` (an index beyond
    /// `u32::MAX` saturates; no batch is that large).
    pub fn from_batch_and_index(batch: u64, index: u64) -> Self {
        let index = index.min(u64::from(u32::MAX));
        Self((batch << 32) | index)
    }
}

impl std::fmt::Display for AnalyticsPayloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0 >> 32, self.0 & u64::from(u32::MAX))
    }
}

/// A payload still waiting in an analytics outbox for its acknowledgement: one that was never
/// delivered (the process was killed, a listener threw, a subscriber never acknowledged it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PendingAnalyticsEvent {
    /// The id to acknowledge once the payload was sent.
    pub id: AnalyticsPayloadId,
    /// The PostHog payload.
    pub event: AnalyticsEvent,
}

/// One to-device event that failed to decrypt, as published on the failure stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToDeviceDecryptionFailure {
    /// The one reason this event failed.
    pub reason: FailureReason,
    /// Details for local logs (identifiers allowed, never sent to analytics).
    pub diagnostics: FailureDiagnostics,
    /// The PostHog payload for this failure, or the policy rule that suppressed it.
    pub analytics: AnalyticsDecision,
    /// Where the payload is kept until acknowledged, when the publisher keeps it (an analytics
    /// outbox); `None` for a suppressed failure or a payload that exists only in memory.
    pub analytics_id: Option<AnalyticsPayloadId>,
}

impl ToDeviceDecryptionFailure {
    /// A failure item with the reporting policy's decision.
    pub fn new(
        reason: FailureReason,
        diagnostics: FailureDiagnostics,
        analytics: AnalyticsDecision,
    ) -> Self {
        Self {
            reason,
            diagnostics,
            analytics,
            analytics_id: None,
        }
    }

    /// The same item, its payload kept under `id` until acknowledged.
    pub fn with_analytics_id(mut self, id: Option<AnalyticsPayloadId>) -> Self {
        self.analytics_id = id;
        self
    }

    /// The payload to send, when the policy let this failure through.
    pub fn payload(&self) -> Option<&AnalyticsEvent> {
        self.analytics.payload()
    }
}

/// A subscriber fell behind and these many items were dropped from its view of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the failure stream subscriber fell behind and missed {missed} items")]
pub struct MissedFailures {
    /// How many items this subscriber will never see.
    pub missed: u64,
}

/// A stream of failures: `Ok(item)` in order, or `Err(MissedFailures)` where items were dropped
/// because this subscriber was too slow. It ends when the machine is dropped.
pub type FailureStream = BoxStream<'static, Result<ToDeviceDecryptionFailure, MissedFailures>>;

/// Fans failure items out to any number of subscribers without ever blocking the publisher.
#[derive(Debug)]
pub struct FailureReporter {
    sender: broadcast::Sender<ToDeviceDecryptionFailure>,
}

impl Default for FailureReporter {
    fn default() -> Self {
        Self::with_capacity(FAILURE_BUFFER_CAPACITY)
    }
}

impl FailureReporter {
    /// A reporter whose subscribers may lag by `capacity` items.
    pub fn with_capacity(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Publishes one failure to every current subscriber. Never blocks.
    pub fn publish(&self, failure: ToDeviceDecryptionFailure) {
        // An error only means that nobody is subscribed, which is fine.
        let _ = self.sender.send(failure);
    }

    /// A new subscription that sees every failure published from now on.
    pub fn subscribe(&self) -> FailureStream {
        let receiver = self.sender.subscribe();
        stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(item) => Some((Ok(item), receiver)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some((Err(MissedFailures { missed }), receiver))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(index: usize) -> ToDeviceDecryptionFailure {
        ToDeviceDecryptionFailure::new(
            FailureReason::SessionWedged,
            FailureDiagnostics {
                index,
                ..Default::default()
            },
            AnalyticsDecision::Reported(AnalyticsEvent::for_failure(FailureReason::SessionWedged)),
        )
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_item_in_order() {
        let reporter = FailureReporter::default();
        let mut first = reporter.subscribe();
        let mut second = reporter.subscribe();
        for i in 0..3 {
            reporter.publish(failure(i));
        }
        for stream in [&mut first, &mut second] {
            for i in 0..3 {
                let item = stream.next().await.unwrap().unwrap();
                assert_eq!(item.diagnostics.index, i);
            }
        }
    }

    #[tokio::test]
    async fn a_lagging_subscriber_learns_how_many_items_it_missed() {
        let reporter = FailureReporter::with_capacity(4);
        let mut slow = reporter.subscribe();
        for i in 0..10 {
            reporter.publish(failure(i));
        }
        assert_eq!(
            slow.next().await.unwrap(),
            Err(MissedFailures { missed: 6 })
        );
        let next = slow.next().await.unwrap().unwrap();
        assert_eq!(next.diagnostics.index, 6);
    }

    #[test]
    fn payload_ids_sort_by_batch_then_index() {
        let first = AnalyticsPayloadId::from_batch_and_index(7, 4_000_000);
        let second = AnalyticsPayloadId::from_batch_and_index(8, 0);
        assert!(first < second);
        assert_eq!(first.to_string(), "7.4000000");
        assert_eq!(
            AnalyticsPayloadId::from_batch_and_index(1, u64::MAX),
            AnalyticsPayloadId::from_batch_and_index(1, u64::from(u32::MAX))
        );
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_reporter_is_dropped() {
        let reporter = FailureReporter::default();
        let mut stream = reporter.subscribe();
        reporter.publish(failure(0));
        drop(reporter);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
    }
}
