//! Delivery of the analytics outbox to foreign listeners: one bounded queue and one thread per
//! listener, fed from the store by one delivery task per machine.
//!
//! The task claims pending payloads from the analytics outbox (see `src/machine/analytics_outbox.rs`)
//! once after every batch (the adapter wakes it after each receive call), when a listener is
//! added, and on `flush_pending_analytics()`; it pushes each claimed
//! payload, with a shared ticket, into every listener's queue. A listener's thread pops payloads
//! and calls the listener, in order, without holding the queue's lock, inside `catch_unwind` (a
//! foreign exception comes back from UniFFI as a panic).
//!
//! A payload is **delivered** once one listener's callback returned without throwing: that thread
//! commits its removal before it calls its listener again (the double-report window is that one
//! small transaction). If every listener that got it threw, the claim is released and the payload
//! goes out again with the next delivery, up to `MAX_ANALYTICS_DELIVERY_ATTEMPTS` times. A listener
//! whose queue is full loses its oldest payload (counted in `listener_drops`); the payload itself
//! stays in the store unless another listener delivered it. At most [`LISTENER_QUEUE_CAPACITY`]
//! payloads are undecided at once, so memory stays bounded whatever the listeners do, and a
//! listener that blocks or throws never slows decryption or another listener.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use futures::StreamExt;
use tokio::sync::Notify;

use super::types::PosthogErrorEvent;
use super::{listener_runtime, DecryptionFailureListener};
use crate::error::StoreError;
use crate::machine::OlmMachine as CoreMachine;
use crate::reporting::AnalyticsPayloadId;

/// How many payloads wait for a slow listener before its oldest are dropped; also how many
/// claimed payloads may be undecided (neither delivered nor released) at once.
pub const LISTENER_QUEUE_CAPACITY: usize = 256;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only plain collection updates happen under these locks, never a listener call.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What became of one payload at one listener.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The callback returned without throwing.
    Delivered,
    /// The callback threw (or panicked).
    Failed,
    /// Never called: the queue was full or the listener was cancelled.
    Discarded,
}

/// One claimed payload, shared by the listeners it was queued for.
struct Ticket {
    id: AnalyticsPayloadId,
    /// Listeners that have not finished with it yet.
    remaining: AtomicUsize,
    /// Acknowledged, released or given back: nothing more to do.
    decided: AtomicBool,
    failed: AtomicBool,
}

struct Item {
    event: PosthogErrorEvent,
    /// `None` for a payload that exists only in memory (a `Store` failure's).
    ticket: Option<Arc<Ticket>>,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Item>,
    closed: bool,
}

/// The bounded queue in front of one listener's thread.
#[derive(Default)]
pub(crate) struct DeliveryQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl DeliveryQueue {
    /// Queues `item`; returns the item that did not fit (the oldest, or `item` once closed).
    fn push(&self, item: Item) -> Option<Item> {
        let mut state = lock(&self.state);
        if state.closed {
            return Some(item);
        }
        let dropped = if state.items.len() >= LISTENER_QUEUE_CAPACITY {
            state.items.pop_front()
        } else {
            None
        };
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        dropped
    }

    /// Waits for the next payload; `None` once the queue is closed.
    fn pop(&self) -> Option<Item> {
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return None;
            }
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops delivery: returns the queued payloads, and the delivery thread exits.
    fn close(&self) -> Vec<Item> {
        let mut state = lock(&self.state);
        state.closed = true;
        let items = state.items.drain(..).collect();
        drop(state);
        self.ready.notify_all();
        items
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }
}

/// The listeners of one machine and the payloads handed to them.
pub(crate) struct AnalyticsDelivery {
    /// Weak: a forgotten listener must not keep the machine alive.
    machine: Weak<CoreMachine>,
    listeners: Mutex<Vec<Arc<DeliveryQueue>>>,
    /// Payloads claimed and queued, not yet decided.
    undecided: Mutex<HashSet<AnalyticsPayloadId>>,
    /// Serializes claims, so that one payload is never queued twice at once.
    pump_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    /// The last claim was cut short by the bound: claim again as soon as a payload is decided.
    saturated: AtomicBool,
    task_started: AtomicBool,
    task_finished: AtomicBool,
}

impl AnalyticsDelivery {
    pub(crate) fn new(machine: &Arc<CoreMachine>) -> Arc<Self> {
        Arc::new(Self {
            machine: Arc::downgrade(machine),
            listeners: Mutex::new(Vec::new()),
            undecided: Mutex::new(HashSet::new()),
            pump_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            saturated: AtomicBool::new(false),
            task_started: AtomicBool::new(false),
            task_finished: AtomicBool::new(false),
        })
    }

    /// Asks the delivery task to claim what is pending (after a batch).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Registers `listener`: starts its thread (and, for the first listener, the delivery task),
    /// then claims what is pending, so payloads left by an earlier run go out at once.
    pub(crate) fn add_listener(
        self: &Arc<Self>,
        listener: Arc<dyn DecryptionFailureListener>,
    ) -> Registration {
        let queue = Arc::new(DeliveryQueue::default());
        let thread_delivery = Arc::clone(self);
        let thread_queue = Arc::clone(&queue);
        let spawned = std::thread::Builder::new()
            .name("tdc-failure-listener".to_owned())
            .spawn(move || {
                while let Some(item) = thread_queue.pop() {
                    let returned = catch_unwind(AssertUnwindSafe(|| {
                        listener.on_decryption_failure(item.event)
                    }))
                    .is_ok();
                    if let Some(ticket) = item.ticket {
                        let outcome = if returned {
                            Outcome::Delivered
                        } else {
                            Outcome::Failed
                        };
                        thread_delivery.finish(&ticket, outcome);
                    }
                }
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
        Registration {
            delivery: Arc::downgrade(self),
            queue,
        }
    }

    fn start_task(self: &Arc<Self>) {
        let Some(machine) = self.machine.upgrade() else {
            self.task_finished.store(true, Ordering::SeqCst);
            return;
        };
        let mut stream = machine.to_device_decryption_failure_stream();
        drop(machine);
        let delivery = Arc::clone(self);
        listener_runtime().spawn(async move {
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(item) => delivery.forward(item),
                        None => break,
                    },
                    () = delivery.wake.notified() => delivery.claim_and_queue_logged().await,
                }
            }
            // The machine is gone: stop every listener thread.
            delivery.task_finished.store(true, Ordering::SeqCst);
            let queues = std::mem::take(&mut *lock(&delivery.listeners));
            for queue in queues {
                for item in queue.close() {
                    if let Some(ticket) = item.ticket {
                        delivery.finish(&ticket, Outcome::Discarded);
                    }
                }
            }
        });
    }

    /// Handles one stream item. Payloads with an id are in the outbox: the claim after the batch
    /// (one per batch, so that a payload released by a throwing listener is retried once per
    /// batch) hands them out, also when this subscription lagged and missed their items. A payload
    /// the store could not keep (a `Store` failure's) is queued here, at most once, from memory.
    fn forward(
        self: &Arc<Self>,
        item: Result<crate::ToDeviceDecryptionFailure, crate::MissedFailures>,
    ) {
        let Ok(failure) = item else { return };
        if failure.analytics_id.is_some() {
            return;
        }
        if let Some(payload) = failure.payload() {
            let queues = lock(&self.listeners).clone();
            for queue in queues {
                let item = Item {
                    event: PosthogErrorEvent::from(*payload),
                    ticket: None,
                };
                if let Some(dropped) = queue.push(item) {
                    self.dropped_from_queue(dropped);
                }
            }
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
                remaining: AtomicUsize::new(listeners.len()),
                decided: AtomicBool::new(false),
                failed: AtomicBool::new(false),
            });
            for queue in &listeners {
                let item = Item {
                    event: PosthogErrorEvent::from(payload.event),
                    ticket: Some(Arc::clone(&ticket)),
                };
                if let Some(dropped) = queue.push(item) {
                    self.dropped_from_queue(dropped);
                }
            }
            queued += 1;
        }
        Ok(queued)
    }

    fn dropped_from_queue(self: &Arc<Self>, item: Item) {
        if let Some(machine) = self.machine.upgrade() {
            machine.record_listener_drops(1);
        }
        if let Some(ticket) = item.ticket {
            self.finish(&ticket, Outcome::Discarded);
        }
    }

    /// Records one listener's outcome for a payload and decides it: the first delivery removes
    /// it; once every listener is done without one, a failure releases it (one attempt) and
    /// discards alone leave it claimed (it is queued again with the next claim).
    fn finish(self: &Arc<Self>, ticket: &Ticket, outcome: Outcome) {
        if outcome == Outcome::Failed {
            ticket.failed.store(true, Ordering::SeqCst);
        }
        let last = ticket.remaining.fetch_sub(1, Ordering::SeqCst) == 1;
        let decision = if outcome == Outcome::Delivered {
            Some(true)
        } else if last {
            Some(false)
        } else {
            None
        };
        let Some(delivered) = decision else { return };
        if ticket.decided.swap(true, Ordering::SeqCst) {
            return;
        }
        let release = !delivered && ticket.failed.load(Ordering::SeqCst);
        let id = ticket.id;
        let delivery = Arc::clone(self);
        let decide = async move {
            if let Some(machine) = delivery.machine.upgrade() {
                let result = if delivered {
                    machine.acknowledge_analytics(&[id]).await
                } else if release {
                    machine.release_analytics(&[id]).await.map(drop)
                } else {
                    Ok(())
                };
                if let Err(error) = result {
                    // The payload stays claimed: it goes out again once the lease ends.
                    tracing::warn!(%error, "cannot record the delivery of an analytics payload");
                }
            }
            // Only now may a claim queue it again (a discarded payload, still ours).
            lock(&delivery.undecided).remove(&id);
            if delivered && delivery.saturated.swap(false, Ordering::SeqCst) {
                delivery.wake();
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside a runtime (a claim, or a cancel from async code): cannot block here.
            listener_runtime().spawn(decide);
        } else {
            // The listener's own thread: the removal commits before its next call.
            listener_runtime().block_on(decide);
        }
    }
}

/// One listener's registration, held by its `ListenerHandle`.
pub(crate) struct Registration {
    delivery: Weak<AnalyticsDelivery>,
    queue: Arc<DeliveryQueue>,
}

impl Registration {
    /// Stops delivery to this listener; payloads it had not received stay pending (unless another
    /// listener delivers them).
    pub(crate) fn cancel(&self) {
        let items = self.queue.close();
        if let Some(delivery) = self.delivery.upgrade() {
            lock(&delivery.listeners).retain(|queue| !Arc::ptr_eq(queue, &self.queue));
            for item in items {
                if let Some(ticket) = item.ticket {
                    delivery.finish(&ticket, Outcome::Discarded);
                }
            }
        }
    }

    /// Whether delivery to this listener has stopped (cancelled, or the machine is gone).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.queue.is_closed()
            || self
                .delivery
                .upgrade()
                .is_none_or(|delivery| delivery.task_finished.load(Ordering::SeqCst))
    }
}
