//! Delivery to foreign listeners: one bounded queue and one thread per listener.
//!
//! A forwarding task reads the failure stream promptly and pushes each payload into the listener's
//! queue; when the queue is full the oldest payload is dropped and counted at once. A dedicated
//! thread pops payloads and calls the listener, in order, without holding the queue's lock, inside
//! `catch_unwind` (a foreign exception comes back from UniFFI as a panic). So a listener that
//! blocks or throws never slows decryption, never grows memory, and never affects other listeners.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::types::PosthogErrorEvent;
use super::DecryptionFailureListener;

/// How many payloads wait for a slow listener before the oldest are dropped.
pub const LISTENER_QUEUE_CAPACITY: usize = 256;

#[derive(Default)]
struct QueueState {
    items: VecDeque<PosthogErrorEvent>,
    closed: bool,
}

/// The bounded queue between the forwarding task and a listener's delivery thread.
#[derive(Default)]
pub(crate) struct DeliveryQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl DeliveryQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Only plain pushes and pops happen under this lock, never a listener call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event`; returns how many old payloads were dropped to make room (0 or 1).
    pub(crate) fn push(&self, event: PosthogErrorEvent) -> u64 {
        let mut state = self.lock();
        if state.closed {
            return 0;
        }
        let dropped = if state.items.len() >= LISTENER_QUEUE_CAPACITY {
            state.items.pop_front();
            1
        } else {
            0
        };
        state.items.push_back(event);
        drop(state);
        self.ready.notify_one();
        dropped
    }

    /// Waits for the next payload; `None` once the queue is closed.
    fn pop(&self) -> Option<PosthogErrorEvent> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(event) = state.items.pop_front() {
                return Some(event);
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops delivery: queued payloads are discarded and the delivery thread exits.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.items.clear();
        drop(state);
        self.ready.notify_all();
    }
}

/// Starts the thread that delivers `queue` to `listener`.
pub(crate) fn spawn_delivery_thread(
    listener: Arc<dyn DecryptionFailureListener>,
    queue: Arc<DeliveryQueue>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tdc-failure-listener".to_owned())
        .spawn(move || {
            while let Some(event) = queue.pop() {
                let _ = catch_unwind(AssertUnwindSafe(|| listener.on_decryption_failure(event)));
            }
        })
        .map(drop)
}
