//! Delivery to foreign listeners: one bounded queue and one thread per listener.
//!
//! A forwarding task reads the failure stream promptly and pushes each payload into the listener's
//! [`CallbackQueue`]; when the queue is full the oldest payload is dropped and counted at once. A
//! dedicated thread makes the calls, in order, without holding the queue's lock, through the
//! process-wide gate of [`super::callbacks`] (which also catches a foreign exception, returned by
//! UniFFI as a panic). So a listener that blocks or throws never slows decryption, never grows
//! memory, never affects other listeners, and is never called while the process exits.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::callbacks::{
    call_foreign, register_flushable, release, CallbackQueue, Flush, FlushMarker, Flushable,
    Overflow, Push,
};
use super::listener_runtime;
use super::types::PosthogErrorEvent;
use crate::machine::OlmMachine as CoreMachine;
use crate::reporting::{FailureStream, MissedFailures, ToDeviceDecryptionFailure};

/// How many payloads wait for a slow listener before the oldest are dropped.
pub const LISTENER_QUEUE_CAPACITY: usize = 256;

/// Receives the PostHog event of every to-device decryption failure.
#[uniffi::export(foreign)]
pub trait DecryptionFailureListener: Send + Sync {
    /// Called once per failure, in order, on a background thread.
    fn on_decryption_failure(&self, event: PosthogErrorEvent);
}

/// Keeps a listener registered; `cancel()` or dropping it stops delivery.
#[derive(uniffi::Object)]
pub struct ListenerHandle {
    task: AbortHandle,
    queue: Arc<CallbackQueue<PosthogErrorEvent>>,
    /// Asks the forwarding task for a flush; registered (weakly) for `prepare_for_exit`.
    flusher: Arc<ForwardingTask>,
}

#[uniffi::export(async_runtime = "tokio")]
impl ListenerHandle {
    /// Stops delivery. A call already in progress finishes.
    pub fn cancel(&self) {
        self.task.abort();
        self.queue.close();
    }

    /// Whether delivery has stopped (cancelled, or the machine is gone). Just after `cancel()`
    /// this may still be `false` for a moment.
    pub fn is_cancelled(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until every failure published before this call has been handed to the listener
    /// (its call returned), for at most `timeout_ms`. Returns whether that happened in time;
    /// `false` as well when the handle was cancelled. Use it before exiting, or in tests.
    pub async fn flush(&self, timeout_ms: u32) -> bool {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
        let flush = Flush::default();
        self.flusher.flush(flush.marker());
        // The wait blocks a thread: not one of the runtime's workers.
        let flushed = listener_runtime()
            .spawn_blocking(move || flush.wait(deadline))
            .await
            .unwrap_or(false);
        flushed && !self.queue.is_closed()
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The sending side of a forwarding task's flush requests.
struct ForwardingTask {
    flushes: mpsc::UnboundedSender<FlushMarker>,
    queue: Arc<CallbackQueue<PosthogErrorEvent>>,
}

impl Flushable for ForwardingTask {
    fn flush(&self, marker: FlushMarker) {
        // The task drains the stream into the queue, then queues the marker. Once the task has
        // ended (the machine is gone, everything it forwarded is queued), the queue alone decides.
        if let Err(mpsc::error::SendError(marker)) = self.flushes.send(marker) {
            self.queue.push_flush(marker);
        }
    }
}

/// Registers `listener` on `machine`'s failure stream.
pub(crate) fn add_listener(
    machine: &Arc<CoreMachine>,
    listener: Arc<dyn DecryptionFailureListener>,
) -> ListenerHandle {
    let stream = machine.to_device_decryption_failure_stream();
    let queue = Arc::new(CallbackQueue::new(
        LISTENER_QUEUE_CAPACITY,
        Overflow::DropOldest,
    ));
    let delivery_queue = Arc::clone(&queue);
    let spawned = std::thread::Builder::new()
        .name("tdc-failure-listener".to_owned())
        .spawn(move || {
            delivery_queue.run(|event| {
                call_foreign(|| listener.on_decryption_failure(event));
            });
            release(listener);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a failure listener thread");
        queue.close();
    }
    let (flushes, requests) = mpsc::unbounded_channel();
    let flusher = Arc::new(ForwardingTask {
        flushes,
        queue: Arc::clone(&queue),
    });
    register_flushable(Arc::downgrade(&flusher) as Weak<dyn Flushable>);
    // Weak: a forgotten handle must not keep the machine alive.
    let task = listener_runtime().spawn(forward(
        stream,
        requests,
        Arc::clone(&queue),
        Arc::downgrade(machine),
    ));
    ListenerHandle {
        task: task.abort_handle(),
        queue,
        flusher,
    }
}

enum Next {
    Item(Option<Result<ToDeviceDecryptionFailure, MissedFailures>>),
    Flush(FlushMarker),
}

/// Moves payloads that pass the reporting policy from the stream into the listener's queue.
async fn forward(
    stream: FailureStream,
    mut flushes: mpsc::UnboundedReceiver<FlushMarker>,
    queue: Arc<CallbackQueue<PosthogErrorEvent>>,
    machine: Weak<CoreMachine>,
) {
    let push = |item: Result<ToDeviceDecryptionFailure, MissedFailures>| {
        let dropped = match item {
            Ok(failure) => match failure.payload() {
                Some(payload) => match queue.push(PosthogErrorEvent::from(*payload)) {
                    Push::Dropped(_) => 1,
                    Push::Queued | Push::Closed(_) => 0,
                },
                None => 0,
            },
            Err(lag) => lag.missed,
        };
        if dropped > 0 {
            if let Some(machine) = machine.upgrade() {
                machine.record_listener_drops(dropped);
            }
        }
    };
    // Fused: the flush below may see the end of the stream, and the loop then polls it again.
    let mut stream = stream.fuse();
    loop {
        let next = tokio::select! {
            item = stream.next() => Next::Item(item),
            Some(marker) = flushes.recv() => Next::Flush(marker),
        };
        match next {
            Next::Item(Some(item)) => push(item),
            Next::Item(None) => {
                // The machine is gone and everything it published is queued. Flush requests that
                // arrived meanwhile wait for the queue; closing first makes later ones fail over
                // to the queue too (ForwardingTask::flush).
                flushes.close();
                while let Ok(marker) = flushes.try_recv() {
                    queue.push_flush(marker);
                }
                return;
            }
            Next::Flush(marker) => {
                // Everything published before the flush request is already in the stream.
                while let Some(Some(item)) = stream.next().now_or_never() {
                    push(item);
                }
                queue.push_flush(marker);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::ffi::OlmMachine;

    /// Slow on purpose: a flush must wait for calls, not only for the queue to be taken.
    #[derive(Default)]
    struct SlowCollecting(Mutex<Vec<String>>);

    impl DecryptionFailureListener for SlowCollecting {
        fn on_decryption_failure(&self, event: PosthogErrorEvent) {
            std::thread::sleep(Duration::from_millis(50));
            self.0.lock().unwrap().push(event.analytics_name);
        }
    }

    fn bad_event(n: usize) -> String {
        format!(
            r#"{{"type":"m.room.encrypted","sender":"@a{n}:b","content":{{"algorithm":"m.megolm.v1.aes-sha2"}}}}"#
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn flush_returns_once_every_earlier_failure_was_delivered() {
        let machine = OlmMachine::open_in_memory("@bob:example.org".into(), "BOBDEVICE".into())
            .await
            .unwrap();
        let listener = Arc::new(SlowCollecting::default());
        let handle = machine.add_decryption_failure_listener(listener.clone());
        for n in 0..3 {
            machine
                .decrypt_to_device_event(bad_event(n))
                .await
                .unwrap_err();
        }
        assert!(handle.flush(5_000).await);
        assert_eq!(listener.0.lock().unwrap().len(), 3, "flush returned early");

        // A flush that cannot finish in time says so; one on a cancelled handle is false.
        machine
            .decrypt_to_device_event(bad_event(3))
            .await
            .unwrap_err();
        assert!(!handle.flush(0).await);
        handle.cancel();
        assert!(!handle.flush(1_000).await);
    }
}
