//! Delivery of the analytics outbox to foreign listeners: one bounded queue and one thread per
//! listener, fed from the store by one delivery task per machine.
//!
//! Pending payloads are claimed from the analytics outbox (see `src/machine/analytics_outbox.rs`)
//! once after every batch (by the adapter's receive call itself, before it returns, so a batch's
//! payloads are queued by then), when a listener is added, on `flush_pending_analytics()` and on a
//! handle's `flush`; it pushes each claimed payload,
//! with a shared ticket, into every listener's [`CallbackQueue`]. A listener's thread makes the
//! calls, in order, without holding the queue's lock, through the process-wide gate of
//! [`super::callbacks`] (which also catches a foreign exception, returned by UniFFI as a panic, and
//! keeps our threads out of foreign code while the process exits).
//!
//! A payload is **delivered** once one listener's call returned without throwing: that thread
//! commits its removal before it calls its listener again (the double-report window is that one
//! small transaction). If every listener that got it threw, the claim is released and the payload
//! goes out again with the next delivery, up to `MAX_ANALYTICS_DELIVERY_ATTEMPTS` times. A listener
//! whose queue is full loses its oldest payload (counted in `listener_drops`); the payload itself
//! stays in the store unless another listener delivered it. At most [`LISTENER_QUEUE_CAPACITY`]
//! payloads are undecided at once, so memory stays bounded whatever the listeners do, and a
//! listener that blocks or throws never slows decryption or another listener.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Notify};

use super::callbacks::{
    call_foreign_returned, register_flushable, release, CallbackQueue, Flush, FlushMarker,
    Flushable, Overflow, Push,
};
use super::listener_runtime;
use super::types::PosthogErrorEvent;
use crate::error::StoreError;
use crate::machine::{AnalyticsAcknowledger, OlmMachine as CoreMachine};
use crate::reporting::{AnalyticsPayloadId, MissedFailures, ToDeviceDecryptionFailure};

/// How many payloads wait for a slow listener before its oldest are dropped; also how many
/// claimed payloads may be undecided (neither delivered nor released) at once.
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
    registration: Registration,
    /// Asks the delivery task for a flush; registered (weakly) for `prepare_for_exit`.
    flusher: Arc<ListenerFlusher>,
}

#[uniffi::export(async_runtime = "tokio")]
impl ListenerHandle {
    /// Stops delivery. A call already in progress finishes; payloads this listener had not
    /// received stay in the store unless another listener delivered them.
    pub fn cancel(&self) {
        self.registration.cancel();
    }

    /// Whether delivery has stopped (cancelled, or the machine is gone).
    pub fn is_cancelled(&self) -> bool {
        self.registration.is_cancelled()
    }

    /// Waits until every payload committed before this call that this process can deliver has
    /// been handed to the listener (its call returned), for at most `timeout_ms`. Returns whether
    /// that happened in time; `false` as well when the handle was cancelled. Use it before
    /// exiting, or in tests.
    pub async fn flush(&self, timeout_ms: u32) -> bool {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
        let flush = Flush::default();
        self.flusher.flush(flush.marker());
        // The wait blocks a thread: not one of the runtime's workers.
        let flushed = listener_runtime()
            .spawn_blocking(move || flush.wait(deadline))
            .await
            .unwrap_or(false);
        flushed && !self.registration.queue.is_closed()
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only plain collection updates happen under these locks, never a listener call.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What became of one payload at one listener.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The call returned without throwing.
    Delivered,
    /// The call threw (or panicked).
    Failed,
    /// Never called: the queue was full or closed, or the process is exiting.
    Discarded,
}

/// One claimed payload, shared by the listeners it was queued for.
struct Ticket {
    id: AnalyticsPayloadId,
    delivery: Weak<AnalyticsDelivery>,
    /// Listeners that have not finished with it yet.
    remaining: AtomicUsize,
    /// Acknowledged, released or given back: nothing more to do.
    decided: AtomicBool,
    failed: AtomicBool,
}

/// A payload in one listener's queue.
struct Item {
    event: PosthogErrorEvent,
    /// `None` for a payload that exists only in memory (a `Store` failure's); taken once the
    /// listener was called.
    ticket: Option<Arc<Ticket>>,
}

impl Drop for Item {
    fn drop(&mut self) {
        // Dropped without a call (queue full or closed): this listener is done with it.
        if let Some(ticket) = self.ticket.take() {
            if let Some(delivery) = ticket.delivery.upgrade() {
                delivery.finish(&ticket, Outcome::Discarded, false);
            }
        }
    }
}

type Queue = CallbackQueue<Item>;

/// A flush request for one listener's queue.
type FlushRequest = (Arc<Queue>, FlushMarker);

/// The listeners of one machine and the payloads handed to them.
pub(crate) struct AnalyticsDelivery {
    /// Weak: a forgotten listener must not keep the machine alive.
    machine: Weak<CoreMachine>,
    /// Removes and releases payloads, also once the machine is gone (its queued payloads are
    /// still delivered then, and must still be removed).
    acknowledger: AnalyticsAcknowledger,
    listeners: Mutex<Vec<Arc<Queue>>>,
    /// Payloads claimed and queued, not yet decided.
    undecided: Mutex<HashSet<AnalyticsPayloadId>>,
    /// Serializes claims with each other and with the recording of a decision (removal or
    /// release, then leaving `undecided`), so that one payload is never queued twice.
    pump_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    flushes: mpsc::UnboundedSender<FlushRequest>,
    /// Taken by the delivery task when it starts.
    flush_requests: Mutex<Option<mpsc::UnboundedReceiver<FlushRequest>>>,
    /// The last claim was cut short by the bound: claim again as soon as a payload is decided.
    saturated: AtomicBool,
    task_started: AtomicBool,
    task_finished: AtomicBool,
}

impl AnalyticsDelivery {
    pub(crate) fn new(machine: &Arc<CoreMachine>) -> Arc<Self> {
        let (flushes, flush_requests) = mpsc::unbounded_channel();
        Arc::new(Self {
            machine: Arc::downgrade(machine),
            acknowledger: machine.analytics_acknowledger(),
            listeners: Mutex::new(Vec::new()),
            undecided: Mutex::new(HashSet::new()),
            pump_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            flushes,
            flush_requests: Mutex::new(Some(flush_requests)),
            saturated: AtomicBool::new(false),
            task_started: AtomicBool::new(false),
            task_finished: AtomicBool::new(false),
        })
    }

    /// Asks the delivery task to claim what is pending.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Claims and queues what is pending, after a batch: the batch's own payloads (and any left
    /// undelivered) are in the listeners' queues when the receive call returns, so they are
    /// delivered even if the app drops the machine right away. Nothing to do without a listener.
    pub(crate) async fn claim_after_batch(self: &Arc<Self>) {
        if lock(&self.listeners).is_empty() {
            return;
        }
        self.claim_and_queue_logged().await;
    }

    /// Registers `listener`: starts its thread (and, for the first listener, the delivery task),
    /// then claims what is pending, so payloads left by an earlier run go out at once.
    pub(crate) fn add_listener(
        self: &Arc<Self>,
        listener: Arc<dyn DecryptionFailureListener>,
    ) -> ListenerHandle {
        let queue = Arc::new(Queue::new(LISTENER_QUEUE_CAPACITY, Overflow::DropOldest));
        let delivery = Arc::clone(self);
        let thread_queue = Arc::clone(&queue);
        let spawned = std::thread::Builder::new()
            .name("tdc-failure-listener".to_owned())
            .spawn(move || {
                thread_queue.run(|mut item| {
                    let ticket = item.ticket.take();
                    let event = item.event.clone();
                    drop(item);
                    let returned = call_foreign_returned(|| listener.on_decryption_failure(event));
                    if let Some(ticket) = ticket {
                        let outcome = match returned {
                            Some(true) => Outcome::Delivered,
                            Some(false) => Outcome::Failed,
                            None => Outcome::Discarded,
                        };
                        delivery.finish(&ticket, outcome, true);
                    }
                });
                release(listener);
            });
        match spawned {
            Ok(_) => lock(&self.listeners).push(Arc::clone(&queue)),
            Err(error) => {
                tracing::warn!(%error, "cannot start a failure listener thread");
                queue.close();
            }
        }
        if !self.task_started.swap(true, Ordering::SeqCst) {
            self.start_task();
        }
        self.wake();
        let flusher = Arc::new(ListenerFlusher {
            delivery: Arc::downgrade(self),
            queue: Arc::clone(&queue),
        });
        register_flushable(Arc::downgrade(&flusher) as Weak<dyn Flushable>);
        ListenerHandle {
            registration: Registration {
                delivery: Arc::downgrade(self),
                queue,
            },
            flusher,
        }
    }

    fn start_task(self: &Arc<Self>) {
        let requests = lock(&self.flush_requests).take();
        let (Some(machine), Some(mut requests)) = (self.machine.upgrade(), requests) else {
            self.task_finished.store(true, Ordering::SeqCst);
            return;
        };
        // Fused: a flush below may see the end of the stream, and the loop then polls it again.
        let mut stream = machine.to_device_decryption_failure_stream().fuse();
        drop(machine);
        let delivery = Arc::clone(self);
        listener_runtime().spawn(async move {
            loop {
                tokio::select! {
                    // In this order, so that a flush requested after a wake-up comes after its claim.
                    biased;
                    item = stream.next() => match item {
                        Some(item) => delivery.forward(item),
                        None => break,
                    },
                    () = delivery.wake.notified() => delivery.claim_and_queue_logged().await,
                    Some((queue, marker)) = requests.recv() => {
                        // Everything published and committed before the request is queued first.
                        while let Some(Some(item)) = stream.next().now_or_never() {
                            delivery.forward(item);
                        }
                        delivery.claim_and_queue_logged().await;
                        queue.push_flush(marker);
                    }
                }
            }
            // The machine is gone: nothing more will be queued. Flush requests that arrived
            // meanwhile wait for their queue; closing first makes later ones go to the queue too.
            delivery.task_finished.store(true, Ordering::SeqCst);
            requests.close();
            while let Ok((queue, marker)) = requests.try_recv() {
                queue.push_flush(marker);
            }
        });
    }

    /// Handles one stream item. Payloads with an id are in the outbox: the claim after the batch
    /// (one per batch, so that a payload released by a throwing listener is retried once per
    /// batch) hands them out, also when this subscription lagged and missed their items. A payload
    /// the store could not keep (a `Store` failure's) is queued here, at most once, from memory.
    fn forward(self: &Arc<Self>, item: Result<ToDeviceDecryptionFailure, MissedFailures>) {
        let Ok(failure) = item else { return };
        if failure.analytics_id.is_some() {
            return;
        }
        if let Some(payload) = failure.payload() {
            let queues = lock(&self.listeners).clone();
            for queue in queues {
                self.push(
                    &queue,
                    Item {
                        event: PosthogErrorEvent::from(*payload),
                        ticket: None,
                    },
                );
            }
        }
    }

    /// Queues `item`; an item given up (the oldest, when full) is counted and finished.
    fn push(&self, queue: &Queue, item: Item) {
        match queue.push(item) {
            Push::Queued => {}
            Push::Dropped(dropped) => {
                if let Some(machine) = self.machine.upgrade() {
                    machine.record_listener_drops(1);
                }
                drop(dropped);
            }
            Push::Closed(item) => drop(item),
        }
    }

    async fn claim_and_queue_logged(self: &Arc<Self>) {
        if let Err(error) = self.claim_and_queue().await {
            tracing::warn!(%error, "cannot claim pending analytics payloads for the listeners");
        }
    }

    /// Claims pending payloads (at most the bound of undecided ones) and queues each for every
    /// listener. Returns how many were queued; none without a listener (nothing is claimed then,
    /// so another process with a listener can deliver them).
    pub(crate) async fn claim_and_queue(self: &Arc<Self>) -> Result<u32, StoreError> {
        let _serialized = self.pump_lock.lock().await;
        let Some(machine) = self.machine.upgrade() else {
            return Ok(0);
        };
        let listeners = lock(&self.listeners).clone();
        if listeners.is_empty() {
            return Ok(0);
        }
        let undecided = lock(&self.undecided).len();
        let room = LISTENER_QUEUE_CAPACITY.saturating_sub(undecided);
        if room == 0 {
            self.saturated.store(true, Ordering::SeqCst);
            return Ok(0);
        }
        // Our own undecided claims come back too: ask for enough to see `room` new ones.
        let limit = undecided + room;
        let claimed = machine.claim_pending_analytics(limit).await?;
        drop(machine);
        if claimed.len() >= limit {
            self.saturated.store(true, Ordering::SeqCst);
        }
        let mut queued = 0;
        for payload in claimed {
            if !lock(&self.undecided).insert(payload.id) {
                continue; // already queued, not yet decided
            }
            let ticket = Arc::new(Ticket {
                id: payload.id,
                delivery: Arc::downgrade(self),
                remaining: AtomicUsize::new(listeners.len()),
                decided: AtomicBool::new(false),
                failed: AtomicBool::new(false),
            });
            for queue in &listeners {
                self.push(
                    queue,
                    Item {
                        event: PosthogErrorEvent::from(payload.event),
                        ticket: Some(Arc::clone(&ticket)),
                    },
                );
            }
            queued += 1;
        }
        Ok(queued)
    }

    /// Records one listener's outcome for a payload and decides it: the first delivery removes
    /// it; once every listener is done without one, a failure releases it (one attempt) and
    /// discards alone leave it claimed (it is queued again with the next claim). `blocking`: the
    /// listener's own thread waits for the removal to commit before its next call.
    fn finish(self: &Arc<Self>, ticket: &Ticket, outcome: Outcome, blocking: bool) {
        if outcome == Outcome::Failed {
            ticket.failed.store(true, Ordering::SeqCst);
        }
        let last = ticket.remaining.fetch_sub(1, Ordering::SeqCst) == 1;
        let delivered = match (outcome, last) {
            (Outcome::Delivered, _) => true,
            (_, true) => false,
            (_, false) => return,
        };
        if ticket.decided.swap(true, Ordering::SeqCst) {
            return;
        }
        let release = !delivered && ticket.failed.load(Ordering::SeqCst);
        let id = ticket.id;
        let delivery = Arc::clone(self);
        let decide = async move {
            // Under the claims' lock: a claim that read the outbox before this removal or release
            // committed would otherwise find the id gone from `undecided` afterwards and queue the
            // payload again (a second delivery). With the lock, a claim sees the payload either
            // still undecided or already gone from the store.
            let _serialized = delivery.pump_lock.lock().await;
            let result = if delivered {
                delivery.acknowledger.acknowledge(&[id]).await
            } else if release {
                delivery.acknowledger.release(&[id]).await.map(drop)
            } else {
                Ok(())
            };
            if let Err(error) = result {
                // The payload stays claimed: it goes out again once the lease ends.
                tracing::warn!(%error, "cannot record the delivery of an analytics payload");
            }
            // Only now may a claim queue it again (a discarded payload, still ours).
            lock(&delivery.undecided).remove(&id);
            if delivered && delivery.saturated.swap(false, Ordering::SeqCst) {
                delivery.wake();
            }
        };
        if blocking && tokio::runtime::Handle::try_current().is_err() {
            // The listener's own thread: the removal commits before its next call.
            listener_runtime().block_on(decide);
        } else {
            listener_runtime().spawn(decide);
        }
    }
}

/// The flush side of one listener: the delivery task queues what is pending, then the marker.
struct ListenerFlusher {
    delivery: Weak<AnalyticsDelivery>,
    queue: Arc<Queue>,
}

impl Flushable for ListenerFlusher {
    fn flush(&self, marker: FlushMarker) {
        // Once the task has ended (the machine is gone, nothing more is queued), the queue alone
        // decides.
        let Some(delivery) = self.delivery.upgrade() else {
            self.queue.push_flush(marker);
            return;
        };
        if delivery.task_finished.load(Ordering::SeqCst) {
            self.queue.push_flush(marker);
            return;
        }
        if let Err(mpsc::error::SendError((queue, marker))) =
            delivery.flushes.send((Arc::clone(&self.queue), marker))
        {
            queue.push_flush(marker);
        }
    }
}

/// One listener's registration, held by its [`ListenerHandle`].
struct Registration {
    delivery: Weak<AnalyticsDelivery>,
    queue: Arc<Queue>,
}

impl Registration {
    fn cancel(&self) {
        if let Some(delivery) = self.delivery.upgrade() {
            lock(&delivery.listeners).retain(|queue| !Arc::ptr_eq(queue, &self.queue));
        }
        // What it holds is dropped: each of its payloads is finished as discarded here.
        self.queue.close();
    }

    fn is_cancelled(&self) -> bool {
        self.queue.is_closed()
            || self
                .delivery
                .upgrade()
                .is_none_or(|delivery| delivery.task_finished.load(Ordering::SeqCst))
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
