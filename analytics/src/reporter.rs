//! Failure reporting: the stream of [`ToDeviceDecryptionFailure`] items.
//!
//! The machine publishes exactly one item per failed event, in order, after the batch has been
//! committed. Publishing never waits for subscribers: each subscriber reads from a bounded ring
//! buffer, and one that falls behind by more than [`FAILURE_BUFFER_CAPACITY`] items loses the oldest
//! ones and is told how many it missed. This module does not depend on the Olm machine.

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

/// One to-device event that failed to decrypt, as published on the failure stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToDeviceDecryptionFailure {
    /// The one reason this event failed.
    pub reason: FailureReason,
    /// Details for local logs (identifiers allowed, never sent to analytics).
    pub diagnostics: FailureDiagnostics,
    /// The PostHog payload for this failure, or the policy rule that suppressed it.
    pub analytics: AnalyticsDecision,
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
        }
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
