//! Calls from our own threads into foreign code (listeners, the log sink), and how they end
//! before the process exits.
//!
//! Listeners and the log sink are called on threads we start (`tdc-failure-listener`,
//! `tdc-log-sink`), through a bounded [`CallbackQueue`] each. That is fine while the foreign
//! runtime is alive, but not once CPython has begun finalizing. From then on (CPython 3.13 and
//! older; 3.14 parks such a thread forever instead, gh-87135) every thread other than the
//! finalizing one that asks for the GIL is ended with `pthread_exit`, which glibc implements as a
//! *forced unwind* of the thread's stack. That unwind
//! runs from the ctypes callback up into our Rust frames, where a `catch_unwind` (ours around each
//! call, or the one std puts at the base of every thread) catches it as a foreign exception and
//! deletes it — and glibc answers by aborting the whole process: `FATAL: exception not rethrown`,
//! exit code 134. Rust cannot let such an unwind pass safely, so the only fix is to never be inside
//! a call into Python when finalization starts.
//!
//! A call is not only a listener method: releasing a foreign object is one too. Dropping the last
//! `Arc` of a foreign listener or sink runs UniFFI's `free` callback, which takes the GIL. That is
//! why cancelling a listener's handle before exiting did not help: the delivery thread then drops
//! the listener, racing the interpreter's shutdown.
//!
//! So every call from our threads into foreign code, including the final release of a foreign
//! object, goes through one process-wide gate ([`call_foreign`], [`release`]).
//! [`prepare_for_exit`] first lets every queue deliver what it holds (bounded by a timeout), then
//! closes the gate and waits for the calls in progress. The Python package calls it from `atexit`,
//! which runs before finalization begins; from then on our threads never enter foreign code again,
//! and an object they would release is leaked instead (the process is exiting).

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

// ----- the gate -----------------------------------------------------------------------------------

struct GateState {
    in_flight: usize,
    closed: bool,
}

static GATE: Mutex<GateState> = Mutex::new(GateState {
    in_flight: 0,
    closed: false,
});
static GATE_IDLE: Condvar = Condvar::new();

thread_local! {
    /// How many gated calls this thread is inside, so that `prepare_for_exit` called from a
    /// listener does not wait for its own call.
    static IN_CALL: Cell<usize> = const { Cell::new(0) };
}

fn gate() -> MutexGuard<'static, GateState> {
    GATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A call in progress; ending it lets [`close_gate`] proceed.
struct InFlight;

impl InFlight {
    fn enter() -> Option<Self> {
        let mut state = gate();
        if state.closed {
            return None;
        }
        state.in_flight += 1;
        IN_CALL.with(|c| c.set(c.get() + 1));
        Some(Self)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_CALL.with(|c| c.set(c.get() - 1));
        gate().in_flight -= 1;
        GATE_IDLE.notify_all();
    }
}

/// Runs `call` (a call into foreign code) unless the process is exiting, catching a panic (a
/// foreign exception comes back from UniFFI as one). Returns whether it ran.
pub(crate) fn call_foreign(call: impl FnOnce()) -> bool {
    call_foreign_returned(call).is_some()
}

/// Like [`call_foreign`], telling how the call ended: `Some(true)` when it returned, `Some(false)`
/// when it threw (or panicked), `None` when it did not run (the process is exiting). The analytics
/// outbox counts a payload as delivered only when its listener returned.
pub(crate) fn call_foreign_returned(call: impl FnOnce()) -> Option<bool> {
    let _in_flight = InFlight::enter()?;
    Some(catch_unwind(AssertUnwindSafe(call)).is_ok())
}

/// Drops `value` (which may hold the last reference to a foreign object) as a gated call; once
/// the process is exiting it is leaked instead, since releasing it would call into the foreign
/// runtime.
pub(crate) fn release<T>(value: T) {
    match InFlight::enter() {
        Some(_in_flight) => {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(value)));
        }
        None => std::mem::forget(value),
    }
}

/// Refuses every later call and waits for the calls in progress. Unbounded on purpose: a call
/// cannot be interrupted, and one still running when Python finalizes would abort the process.
fn close_gate() {
    let own = IN_CALL.with(Cell::get);
    let mut state = gate();
    state.closed = true;
    while state.in_flight > own {
        state = GATE_IDLE
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

// ----- flushing -------------------------------------------------------------------------------------

/// Counts the [`FlushMarker`]s of one flush that are still waiting in queues.
#[derive(Clone, Default)]
pub(crate) struct Flush(Arc<(Mutex<usize>, Condvar)>);

/// Resolved (dropped) once everything queued before it was handled, or when its queue closes.
pub(crate) struct FlushMarker(Flush);

impl Flush {
    pub(crate) fn marker(&self) -> FlushMarker {
        *self.count() += 1;
        FlushMarker(self.clone())
    }

    fn count(&self) -> MutexGuard<'_, usize> {
        self.0 .0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every marker is resolved or `deadline` passes; returns whether all were.
    pub(crate) fn wait(&self, deadline: Instant) -> bool {
        let mut count = self.count();
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = self
                .0
                 .1
                .wait_timeout(count, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

impl Drop for FlushMarker {
    fn drop(&mut self) {
        *self.0.count() -= 1;
        self.0 .0 .1.notify_all();
    }
}

/// Something that queues calls and can be asked to resolve a marker once it has made them.
pub(crate) trait Flushable: Send + Sync {
    fn flush(&self, marker: FlushMarker);
}

static FLUSHABLES: Mutex<Vec<Weak<dyn Flushable>>> = Mutex::new(Vec::new());

/// Makes `flushable` part of [`prepare_for_exit`]'s flush for as long as it is alive.
pub(crate) fn register_flushable(flushable: Weak<dyn Flushable>) {
    let mut all = FLUSHABLES.lock().unwrap_or_else(PoisonError::into_inner);
    all.retain(|f| f.strong_count() > 0);
    all.push(flushable);
}

// ----- the queue ------------------------------------------------------------------------------------

/// What to give up when a [`CallbackQueue`] is full.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Overflow {
    /// Drop the oldest item (failure payloads: the newest are the most useful).
    DropOldest,
    /// Refuse the new item (log lines: keep the start of a burst, which explains it).
    DropNewest,
}

/// What became of a pushed item. An item given back may hold a foreign object: the caller
/// [`release`]s it (and counts a `Dropped` one).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push<T> {
    Queued,
    /// The queue was full: this item (the oldest, or the new one) was given up.
    Dropped(T),
    /// The queue is closed: the new item was not queued.
    Closed(T),
}

struct QueueState<T> {
    items: VecDeque<T>,
    busy: bool,
    closed: bool,
    flushes: Vec<FlushMarker>,
}

/// A bounded queue between the threads that produce calls and the one thread that makes them.
pub(crate) struct CallbackQueue<T> {
    state: Mutex<QueueState<T>>,
    ready: Condvar,
    capacity: usize,
    overflow: Overflow,
}

impl<T> CallbackQueue<T> {
    pub(crate) fn new(capacity: usize, overflow: Overflow) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                busy: false,
                closed: false,
                flushes: Vec::new(),
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            overflow,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        // Only pushes and pops happen under this lock, never a foreign call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`, giving up an item when full (see [`Push`]).
    pub(crate) fn push(&self, item: T) -> Push<T> {
        let mut state = self.lock();
        if state.closed {
            return Push::Closed(item);
        }
        let dropped = if state.items.len() < self.capacity {
            None
        } else {
            match self.overflow {
                Overflow::DropNewest => return Push::Dropped(item),
                Overflow::DropOldest => state.items.pop_front(),
            }
        };
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        dropped.map_or(Push::Queued, Push::Dropped)
    }

    /// Resolves `marker` once everything queued now has been handled (at once when idle).
    pub(crate) fn push_flush(&self, marker: FlushMarker) {
        let mut state = self.lock();
        if !state.closed && (state.busy || !state.items.is_empty()) {
            state.flushes.push(marker);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Stops the queue: what it holds is discarded, [`run`](Self::run) returns.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let items = std::mem::take(&mut state.items);
        let flushes = std::mem::take(&mut state.flushes);
        drop(state);
        self.ready.notify_all();
        release(items);
        drop(flushes);
    }

    /// Hands the items to `handle`, in order, on the calling thread, until the queue is closed.
    pub(crate) fn run(&self, mut handle: impl FnMut(T)) {
        let mut state = self.lock();
        loop {
            if state.closed {
                return;
            }
            if let Some(item) = state.items.pop_front() {
                state.busy = true;
                drop(state);
                handle(item);
                state = self.lock();
                state.busy = false;
                continue;
            }
            // Idle: everything queued before each marker has been handled.
            let flushed = std::mem::take(&mut state.flushes);
            drop(state);
            drop(flushed);
            state = self.lock();
            if state.items.is_empty() && state.flushes.is_empty() && !state.closed {
                state = self
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

impl<T: Send> Flushable for CallbackQueue<T> {
    fn flush(&self, marker: FlushMarker) {
        self.push_flush(marker);
    }
}

// ----- exit -------------------------------------------------------------------------------------------

/// Prepares for the process to exit: delivers what listeners and the log sink have queued (for at
/// most `timeout_ms`), then stops every call from this library into foreign code for the rest of
/// the process, waiting for the calls in progress. Returns whether everything queued was
/// delivered.
///
/// The Python package calls this from `atexit`: CPython aborts the process when one of our threads
/// calls into Python while the interpreter finalizes. Swift and Kotlin apps do not need it; a
/// command-line JVM program may call it from a shutdown hook. Irreversible: listeners and the log
/// sink receive nothing afterwards. Do not call it from a listener or log sink (its own queue
/// cannot drain while it waits).
#[uniffi::export]
pub fn prepare_for_exit(timeout_ms: u32) -> bool {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    let flush = Flush::default();
    let flushables: Vec<_> = FLUSHABLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for flushable in &flushables {
        flushable.flush(flush.marker());
    }
    drop(flushables);
    let delivered = flush.wait(deadline);
    close_gate();
    delivered
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn drop_oldest_and_drop_newest_give_back_what_they_drop() {
        let oldest = CallbackQueue::new(2, Overflow::DropOldest);
        assert_eq!(oldest.push(1), Push::Queued);
        assert_eq!(oldest.push(2), Push::Queued);
        assert_eq!(oldest.push(3), Push::Dropped(1));
        let newest = CallbackQueue::new(2, Overflow::DropNewest);
        assert_eq!(newest.push(1), Push::Queued);
        assert_eq!(newest.push(2), Push::Queued);
        assert_eq!(newest.push(3), Push::Dropped(3));
        newest.close();
        assert_eq!(
            newest.push(4),
            Push::Closed(4),
            "a closed queue takes nothing"
        );
    }

    #[test]
    fn a_flush_resolves_after_what_was_queued_before_it() {
        let queue = Arc::new(CallbackQueue::new(16, Overflow::DropOldest));
        let handled = Arc::new(AtomicUsize::new(0));
        let (release_first, first_released) = std::sync::mpsc::channel::<()>();
        let worker = {
            let (queue, handled) = (Arc::clone(&queue), Arc::clone(&handled));
            std::thread::spawn(move || {
                queue.run(|n: usize| {
                    if n == 0 {
                        first_released.recv().unwrap();
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        for n in 0..3 {
            assert_eq!(queue.push(n), Push::Queued);
        }
        let flush = Flush::default();
        queue.push_flush(flush.marker());
        // The first call is blocked, so the flush cannot have resolved.
        assert!(!flush.wait(Instant::now() + Duration::from_millis(50)));
        release_first.send(()).unwrap();
        assert!(flush.wait(Instant::now() + Duration::from_secs(5)));
        assert_eq!(handled.load(Ordering::SeqCst), 3);
        // Idle: a new flush resolves at once. Closing resolves pending ones and stops the worker.
        let idle = Flush::default();
        queue.push_flush(idle.marker());
        assert!(idle.wait(Instant::now()));
        queue.close();
        worker.join().unwrap();
    }
}
