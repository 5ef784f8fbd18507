//! Optional forwarding of the crate's `tracing` events to a logger of the app (Swift, Kotlin,
//! Python), so that decryption problems show up in the app's own logs and bug reports.
//!
//! [`set_log_sink`] installs, once per process, a small hand-written [`tracing::Subscriber`] as the
//! global default. Every event of this crate at or above the chosen [`LogLevel`] is formatted as
//! `message key=value …`, **redacted** ([`redact`]) and handed to the [`LogSink`].
//!
//! Why not a `tracing_subscriber::Layer` over its `Registry` (evaluated for issue 18.3, with a
//! working prototype): the layer replaces only the `Subscriber` impl below — the span no-ops and
//! the span id counter. The level filter, the line format, the redaction and the queue and sink
//! thread (shared with the listeners in `callbacks.rs`) stay as they are, so the file went from
//! 580 to 566 lines (−2.4%). In exchange it adds three crates (tracing-subscriber, sharded-slab,
//! thread_local) and a span registry we never use: the stripped release cdylib grew from 2.63 to
//! 2.65 MiB and the staticlib from 8.48 to 8.56 MiB (`scripts/report-size.sh`; budgets 3 and
//! 9.5 MiB). Not clearly smaller, so not adopted; worth revisiting if we ever forward spans or need
//! a second layer.
//!
//! - Only events whose target is this crate (`to_device_crypto::…`) are forwarded: we vouch for what
//!   our own events contain (never keys, plaintexts or full identifiers), not for our dependencies'.
//! - As a second line of defence, [`redact`] removes anything shaped like an unpadded-base64 key
//!   (runs of 43 or more `[A-Za-z0-9+/]`) and the localpart of Matrix user ids (`@alice:example.org`
//!   → `@…:example.org`) before the line leaves Rust.
//! - The sink is called on a dedicated thread (`tdc-log-sink`), never on the thread that logged and
//!   never while holding a lock, through the gate of `callbacks.rs`: a panic, or an exception
//!   thrown by the foreign logger, is caught, and nothing is called once the process prepares to
//!   exit. A slow sink cannot stall decryption: at most [`QUEUE_CAPACITY`] lines wait, further ones
//!   are dropped and counted in a WARN line once the sink catches up.
//! - Lines go to the sink that was installed when they were logged, in order.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, Weak};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use super::callbacks::{
    call_foreign, register_flushable, release, CallbackQueue, Flushable, Overflow, Push,
};

/// The severity of a log line, most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// 1 (ERROR) to 5 (TRACE); 0 means "off" in [`MAX_LEVEL`].
    const fn verbosity(self) -> u8 {
        match self {
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
            Self::Trace => 5,
        }
    }

    fn from_tracing(level: &Level) -> Self {
        match *level {
            Level::ERROR => Self::Error,
            Level::WARN => Self::Warn,
            Level::INFO => Self::Info,
            Level::DEBUG => Self::Debug,
            _ => Self::Trace,
        }
    }
}

/// Receives the SDK's log lines, already filtered by level and redacted. Implement it with the
/// app's logger (os_log / `Logger`, Timber / `android.util.Log`, `logging`).
#[uniffi::export(foreign)]
pub trait LogSink: Send + Sync {
    /// One log line. `target` is the Rust module that logged (e.g. `to_device_crypto::machine`),
    /// `message` the formatted, redacted line. Called on a background thread, in order.
    fn log(&self, level: LogLevel, target: String, message: String);
}

/// Forwards this crate's log lines at `max_level` and above (`Debug` includes `Info`, `Warn` and
/// `Error`) to `sink`. A second call replaces the sink and the level; `None` stops forwarding.
///
/// Lines never contain keys or plaintexts, and user ids only as `@…:server`.
#[uniffi::export]
pub fn set_log_sink(sink: Option<Arc<dyn LogSink>>, max_level: LogLevel) {
    let verbosity = if sink.is_some() {
        max_level.verbosity()
    } else {
        0
    };
    {
        let mut current = SINK.write().unwrap_or_else(PoisonError::into_inner);
        *current = sink.clone();
        MAX_LEVEL.store(verbosity, Ordering::Release);
    } // the lock is released before anything else happens
    let installed = *INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(ForwardingSubscriber {
            next_span: 1.into(),
        })
        .is_ok()
    });
    // Our callsites may have been cached as "never" while forwarding was off.
    tracing::callsite::rebuild_interest_cache();
    if let (false, Some(sink)) = (installed, sink) {
        send(Line {
            sink,
            level: LogLevel::Warn,
            target: module_path!().to_owned(),
            message: "another tracing subscriber is installed in this process; \
                      SDK logs cannot be forwarded"
                .to_owned(),
        });
    }
}

/// How many lines may wait for a slow sink before further lines are dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// The longest message forwarded, in bytes; longer ones are cut (after redaction).
const MAX_MESSAGE_LEN: usize = 4096;

/// Events of targets starting with this are forwarded (this crate and its modules).
const OUR_TARGET: &str = "to_device_crypto";

static SINK: RwLock<Option<Arc<dyn LogSink>>> = RwLock::new(None);
/// [`LogLevel::verbosity`] of the most verbose level forwarded; 0 when no sink is installed.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(0);
/// Whether our subscriber became the global default (decided on the first [`set_log_sink`]).
static INSTALLED: OnceLock<bool> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the sink thread: whatever the foreign logger makes Rust log is not fed back to it.
    static ON_SINK_THREAD: Cell<bool> = const { Cell::new(false) };
}

struct Line {
    sink: Arc<dyn LogSink>,
    level: LogLevel,
    target: String,
    message: String,
}

/// Queues `line` for the sink thread (started on first use); never blocks.
fn send(line: Line) {
    static QUEUE: OnceLock<Option<Arc<CallbackQueue<Line>>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let queue = Arc::new(CallbackQueue::new(QUEUE_CAPACITY, Overflow::DropNewest));
        let sink_queue = Arc::clone(&queue);
        let spawned = std::thread::Builder::new()
            .name("tdc-log-sink".into())
            .spawn(move || {
                ON_SINK_THREAD.with(|flag| flag.set(true));
                sink_queue.run(deliver);
            });
        spawned.ok()?;
        register_flushable(Arc::downgrade(&queue) as Weak<dyn Flushable>);
        Some(queue)
    });
    let Some(queue) = queue else { return };
    match queue.push(line) {
        Push::Queued => {}
        Push::Dropped(line) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            release(line);
        }
        Push::Closed(line) => release(line),
    }
}

/// Calls the sink (on the sink thread, no lock held) through the gate of [`super::callbacks`],
/// which isolates its panics and exceptions and stops calls while the process exits.
fn deliver(line: Line) {
    let Line {
        sink,
        level,
        target,
        message,
    } = line;
    call_foreign(|| sink.log(level, target, message));
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        call_foreign(|| {
            sink.log(
                LogLevel::Warn,
                module_path!().to_owned(),
                format!("{dropped} log lines were dropped because the log sink was too slow"),
            )
        });
    }
    // Replacing the sink may have left this line with the last reference to the old one.
    release(sink);
}

fn is_ours(metadata: &Metadata<'_>) -> bool {
    metadata
        .target()
        .strip_prefix(OUR_TARGET)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// The global subscriber: forwards this crate's events, ignores spans and everything else.
struct ForwardingSubscriber {
    next_span: AtomicU64,
}

impl Subscriber for ForwardingSubscriber {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.is_event() && is_ours(metadata) {
            // Decided per event by `enabled`: the level can change at any time.
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match MAX_LEVEL.load(Ordering::Acquire) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && is_ours(metadata)
            && LogLevel::from_tracing(metadata.level()).verbosity()
                <= MAX_LEVEL.load(Ordering::Acquire)
            && !ON_SINK_THREAD.with(Cell::get)
    }

    fn event(&self, event: &Event<'_>) {
        // Re-checked: `enabled` and the level may have changed in between.
        if !self.enabled(event.metadata()) {
            return;
        }
        let sink = SINK.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(sink) = sink else { return };
        let mut visitor = LineVisitor::default();
        event.record(&mut visitor);
        let mut message = redact(&visitor.finish());
        truncate(&mut message, MAX_MESSAGE_LEN);
        send(Line {
            sink,
            level: LogLevel::from_tracing(event.metadata().level()),
            target: event.metadata().target().to_owned(),
            message,
        });
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Never called for our spans (their interest is `never`), but ids must be non-zero.
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Formats an event as `message key=value key=value`.
#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
}

impl LineVisitor {
    fn finish(self) -> String {
        let mut line = self.message;
        if line.is_empty() {
            line = self.fields.trim_start().to_owned();
        } else {
            line.push_str(&self.fields);
        }
        line
    }
}

impl Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let _ = write!(self.fields, " {}={value}", field.name());
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary, marking the cut with `…`.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// The shortest run of base64 characters taken for a key: an unpadded Curve25519 or Ed25519 key
/// is 43 characters; longer runs (signatures, ciphertexts) are redacted too.
const KEY_RUN: usize = 43;

/// What replaces a key-shaped run.
pub const REDACTED_KEY: &str = "<redacted>";

/// Removes secrets that may have slipped into a log line: runs of at least 43 unpadded-base64
/// characters (`[A-Za-z0-9+/]`) become `<redacted>`, and Matrix user ids `@local:server` become
/// `@…:server`.
pub fn redact(line: &str) -> String {
    // User ids first, so that a key-shaped localpart still leaves `@…:server`.
    redact_keys(&redact_user_ids(line))
}

fn is_base64(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '+' || c == '/'
}

fn redact_keys(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut run_start = None;
    for (i, c) in line.char_indices() {
        match (is_base64(c), run_start) {
            (true, None) => run_start = Some(i),
            (true, Some(_)) => {}
            (false, start) => {
                if let Some(start) = start {
                    push_run(&mut out, &line[start..i]);
                    run_start = None;
                }
                out.push(c);
            }
        }
    }
    if let Some(start) = run_start {
        push_run(&mut out, &line[start..]);
    }
    out
}

fn push_run(out: &mut String, run: &str) {
    // All ASCII, so the byte length is the character count.
    out.push_str(if run.len() >= KEY_RUN {
        REDACTED_KEY
    } else {
        run
    });
}

/// Characters taken as part of a user id localpart: anything visible except the separators that
/// end an id in running text (quotes, brackets, commas, …). Broader than the spec's grammar on
/// purpose, so that historical and invalid ids are covered too.
fn is_localpart(c: char) -> bool {
    let separator = matches!(
        c,
        ':' | '@'
            | '"'
            | '\''
            | '`'
            | ','
            | ';'
            | '<'
            | '>'
            | '('
            | ')'
            | '['
            | ']'
            | '{'
            | '}'
            | '\\'
    );
    !separator && !c.is_whitespace() && !c.is_control()
}

/// A server name starts with a hostname character or `[` (an IPv6 literal).
fn starts_server_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '['
}

fn redact_user_ids(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..=at]);
        let after = &rest[at + 1..];
        let local_len = after
            .find(|c: char| !is_localpart(c))
            .unwrap_or(after.len());
        let is_user_id = local_len > 0
            && after[local_len..].starts_with(':')
            && after[local_len + 1..]
                .chars()
                .next()
                .is_some_and(starts_server_name);
        if is_user_id {
            out.push('…');
            rest = &after[local_len..]; // keeps ":server"
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::ffi::{DecryptionFailure, OlmMachine};

    const KEY: &str = "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI"; // 43 chars

    #[test]
    fn keys_are_redacted() {
        assert_eq!(KEY.len(), 43);
        assert_eq!(
            redact(&format!("sender_key={KEY} index=3")),
            "sender_key=<redacted> index=3"
        );
        assert_eq!(redact(&format!("\"{KEY}\"")), "\"<redacted>\"");
        // Longer runs (signatures, ciphertexts) too; a 42-character run is not a key.
        let long = KEY.repeat(3);
        assert_eq!(redact(&format!("ct {long}.")), "ct <redacted>.");
        assert_eq!(redact(&KEY[..42]), &KEY[..42]);
        // Reason names, module paths and numbers survive.
        let line = "to-device event failed to decrypt index=0 reason=UnsupportedAlgorithm";
        assert_eq!(redact(line), line);
    }

    #[test]
    fn user_id_localparts_are_redacted() {
        assert_eq!(
            redact("from @alice:example.org to @bob.smith=1/x:matrix.org:8448."),
            "from @…:example.org to @…:matrix.org:8448."
        );
        assert_eq!(
            redact(r#"{"sender":"@a:b","x":["@ü:server"]}"#),
            r#"{"sender":"@…:b","x":["@…:server"]}"#
        );
        assert_eq!(redact("@carol:[::1]:8008"), "@…:[::1]:8008");
        // Not user ids: e-mail-like text without a server, a bare `@`, `@:server`.
        assert_eq!(
            redact("mail me @ home, @:x, a@b"),
            "mail me @ home, @:x, a@b"
        );
        // Both at once, and a key in a localpart.
        assert_eq!(
            redact(&format!("@{KEY}:example.org sent {KEY}")),
            "@…:example.org sent <redacted>"
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(10);
        truncate(&mut s, 5);
        assert_eq!(s, "éé…");
    }

    type Logged = (LogLevel, String, String);

    struct Channel(Mutex<Sender<Logged>>);

    impl LogSink for Channel {
        fn log(&self, level: LogLevel, target: String, message: String) {
            let _ = self.0.lock().unwrap().send((level, target, message));
        }
    }

    struct Panicking;

    impl LogSink for Panicking {
        fn log(&self, _: LogLevel, _: String, _: String) {
            panic!("logger bug");
        }
    }

    fn channel_sink() -> (Arc<dyn LogSink>, Receiver<Logged>) {
        let (tx, rx) = mpsc::channel();
        (Arc::new(Channel(Mutex::new(tx))), rx)
    }

    /// The first line mentioning the failure, skipping lines other tests of this process log;
    /// `None` when the marker line (or nothing at all) comes first.
    fn failure_line(rx: &Receiver<Logged>) -> Option<Logged> {
        loop {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(line) if line.2.contains("UnsupportedAlgorithm") => return Some(line),
                Ok(line) if line.2 == MARKER => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    const MARKER: &str = "end of test lines";

    // One test owns the process-global sink, so that tests running in parallel cannot swap it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failure_is_forwarded_at_debug_filtered_and_redacted() {
        let machine = OlmMachine::open_in_memory("@bob:example.org".into(), "BOBDEVICE".into())
            .await
            .unwrap();
        let bad = r#"{"type":"m.room.encrypted","sender":"@mallory:evil.org","content":{"algorithm":"m.megolm.v1.aes-sha2"}}"#;
        let machine: &OlmMachine = &machine;
        let fail = || async move {
            let DecryptionFailure::Failed { .. } = machine
                .decrypt_to_device_event(bad.into())
                .await
                .unwrap_err();
        };

        // A panicking sink is isolated; replacing it takes effect.
        set_log_sink(Some(Arc::new(Panicking)), LogLevel::Trace);
        fail().await;

        let (sink, rx) = channel_sink();
        set_log_sink(Some(sink), LogLevel::Debug);
        fail().await;
        let (level, target, message) = failure_line(&rx).expect("no DEBUG line arrived");
        assert_eq!(level, LogLevel::Debug);
        assert_eq!(target, "to_device_crypto::machine");
        assert_eq!(
            message,
            "to-device event failed to decrypt index=0 reason=UnsupportedAlgorithm"
        );
        for secret in ["mallory", "bob", "BOBDEVICE"] {
            assert!(!message.contains(secret), "{message}");
        }
        let keys = machine.identity_keys();
        assert!(!message.contains(&keys.curve25519) && !message.contains(&keys.ed25519));

        // INFO filters the DEBUG line out.
        let (sink, rx) = channel_sink();
        set_log_sink(Some(sink), LogLevel::Info);
        fail().await;
        tracing::warn!("{MARKER}"); // sent after the DEBUG line would have been
        assert!(
            failure_line(&rx).is_none(),
            "a DEBUG line passed an INFO filter"
        );

        // `None` disables (and releases the sink: the channel disconnects).
        let (sink, rx) = channel_sink();
        set_log_sink(Some(sink), LogLevel::Trace);
        set_log_sink(None, LogLevel::Trace);
        fail().await;
        tracing::warn!("{MARKER}");
        assert!(failure_line(&rx).is_none());
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
