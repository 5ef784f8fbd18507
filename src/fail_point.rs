//! Crash-test seams, compiled only with the `testing` feature (never into a shipped library or
//! CLI): phase markers on stderr, fail points that abort, and pause points that wait to be killed.
//!
//! A CLI `decrypt` run goes through these phases, in this order: [`Phase::Opened`] (store and
//! machine open), [`Phase::Decrypted`] (the batch is decrypted and its changes collected; nothing
//! is committed and the store's write lock is held), [`Phase::Committed`],
//! [`Phase::AnalyticsWritten`] (with `--analytics-out`, payloads written and flushed but not yet
//! acknowledged: reached once for an earlier run's leftovers, before the batch, and once for the
//! batch's own, each time only when there is something to write), [`Phase::Printed`] (the output
//! is written; nothing is acknowledged) and [`Phase::Acknowledged`]. The machine reaches
//! `Decrypted` and `Committed` in every batch it receives; the CLI reaches the others.
//!
//! The environment, read once per process, selects what happens at a phase:
//! - `TDC_PHASE_MARKERS=1`: a marker line on stderr at every phase (`tdc-phase: committed
//!   generation=7`, the generation only after a commit), and `tdc-lock: waiting` when the SQLite
//!   store's write lock is held by another process. [`Marker::parse`] reads them back.
//! - `TDC_FAIL_POINT=<phase>`: abort (SIGABRT) right after that phase's marker, as a crash there
//!   would. The names of earlier versions still work: `before_commit` is `decrypted`,
//!   `after_commit` is `committed`, `after_print` is `printed`.
//! - `TDC_PAUSE_AT=<phase>[@n]`: the n-th time (default: the first) the phase is reached, write its
//!   marker and wait until the process is killed, so that a test can SIGKILL it exactly there.
//!
//! An unknown phase name in either variable panics at the first phase, so that a typo cannot turn
//! a crash test into one that never crashes anything.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Selects the fail point: `TDC_FAIL_POINT=<phase>` aborts there.
pub const FAIL_POINT_ENV: &str = "TDC_FAIL_POINT";
/// `TDC_PHASE_MARKERS=1` writes a marker line on stderr at every phase.
pub const PHASE_MARKERS_ENV: &str = "TDC_PHASE_MARKERS";
/// `TDC_PAUSE_AT=<phase>[@n]` waits to be killed at the n-th time the phase is reached.
pub const PAUSE_AT_ENV: &str = "TDC_PAUSE_AT";

const PHASE_PREFIX: &str = "tdc-phase: ";
const LOCK_WAITING_LINE: &str = "tdc-lock: waiting";
const GENERATION_PREFIX: &str = "generation=";

/// One step of a `decrypt` run, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// The store and the machine are open; nothing of the batch is done.
    Opened,
    /// The batch is decrypted and its changes collected, under the write lock; nothing committed.
    Decrypted,
    /// The batch's changes (results in the outbox, ratchets, hashes) are committed.
    Committed,
    /// With `--analytics-out`: payloads are written and flushed to the file, not yet acknowledged
    /// (the one window in which a kill makes a payload go out twice).
    AnalyticsWritten,
    /// The results are written to stdout; nothing is acknowledged.
    Printed,
    /// The printed results are acknowledged (removed from the outbox).
    Acknowledged,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 6] = [
        Phase::Opened,
        Phase::Decrypted,
        Phase::Committed,
        Phase::AnalyticsWritten,
        Phase::Printed,
        Phase::Acknowledged,
    ];

    /// The phase's name in markers and in the environment variables.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Opened => "opened",
            Phase::Decrypted => "decrypted",
            Phase::Committed => "committed",
            Phase::AnalyticsWritten => "analytics_written",
            Phase::Printed => "printed",
            Phase::Acknowledged => "acknowledged",
        }
    }

    /// The phase named `name` (or by one of the fail-point names of earlier versions).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "before_commit" => Some(Phase::Decrypted),
            "after_commit" => Some(Phase::Committed),
            "after_print" => Some(Phase::Printed),
            _ => Phase::ALL.into_iter().find(|phase| phase.name() == name),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// A marker line read back from a process's stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// A phase was reached; `generation` is the store generation a commit left, when known.
    Phase {
        /// The phase.
        phase: Phase,
        /// The store generation after the commit (only on [`Phase::Committed`]).
        generation: Option<u64>,
    },
    /// The process found the store's write lock held by another process and is waiting for it.
    LockWaiting,
}

impl Marker {
    /// The marker on `line`, or `None` if the line is not a marker.
    ///
    /// ```
    /// use to_device_crypto::fail_point::{Marker, Phase};
    ///
    /// assert_eq!(
    ///     Marker::parse("tdc-phase: committed generation=7"),
    ///     Some(Marker::Phase { phase: Phase::Committed, generation: Some(7) })
    /// );
    /// assert_eq!(Marker::parse("tdc-lock: waiting"), Some(Marker::LockWaiting));
    /// assert_eq!(Marker::parse("note: created a random store key"), None);
    /// ```
    pub fn parse(line: &str) -> Option<Self> {
        if line == LOCK_WAITING_LINE {
            return Some(Marker::LockWaiting);
        }
        let mut words = line.strip_prefix(PHASE_PREFIX)?.split(' ');
        let phase = words
            .next()
            .and_then(|name| Phase::ALL.into_iter().find(|phase| phase.name() == name))?;
        let generation = match words.next() {
            None => None,
            Some(word) => Some(word.strip_prefix(GENERATION_PREFIX)?.parse().ok()?),
        };
        Some(Marker::Phase { phase, generation })
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Marker::Phase {
                phase,
                generation: None,
            } => write!(f, "{PHASE_PREFIX}{phase}"),
            Marker::Phase {
                phase,
                generation: Some(generation),
            } => write!(f, "{PHASE_PREFIX}{phase} {GENERATION_PREFIX}{generation}"),
            Marker::LockWaiting => f.write_str(LOCK_WAITING_LINE),
        }
    }
}

struct Settings {
    markers: bool,
    fail_point: Option<Phase>,
    pause_at: Option<(Phase, usize)>,
}

fn phase_from_env(variable: &str, value: &str) -> Phase {
    Phase::from_name(value).unwrap_or_else(|| {
        let names: Vec<&str> = Phase::ALL.iter().map(|phase| phase.name()).collect();
        panic!(
            "{variable}={value:?} names no phase; the phases are {}",
            names.join(", ")
        )
    })
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let pause_at = std::env::var(PAUSE_AT_ENV).ok().map(|value| {
            let (name, nth) = match value.split_once('@') {
                Some((name, nth)) => (
                    name,
                    nth.parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| {
                            panic!("{PAUSE_AT_ENV}={value:?}: the count after @ must be 1 or more")
                        }),
                ),
                None => (value.as_str(), 1),
            };
            (phase_from_env(PAUSE_AT_ENV, name), nth)
        });
        Settings {
            markers: std::env::var_os(PHASE_MARKERS_ENV).is_some_and(|v| v != "0"),
            fail_point: std::env::var(FAIL_POINT_ENV)
                .ok()
                .map(|value| phase_from_env(FAIL_POINT_ENV, &value)),
            pause_at,
        }
    })
}

fn write_marker(marker: Marker) {
    // Stderr is unbuffered; one locked write per line keeps the lines of threads apart.
    let _ = writeln!(std::io::stderr().lock(), "{marker}");
}

/// `phase` was reached: writes its marker, then aborts or pauses if the environment says so.
pub fn reached(phase: Phase) {
    hit(phase, None);
}

/// [`reached`] for a phase that left the store at `generation` (the machine's
/// [`Phase::Committed`]): the marker then orders the commits of several processes.
pub fn reached_at_generation(phase: Phase, generation: u64) {
    hit(phase, Some(generation));
}

/// The store's write lock is held by another process and this one waits for it.
pub fn lock_waiting() {
    if settings().markers {
        write_marker(Marker::LockWaiting);
    }
}

fn hit(phase: Phase, generation: Option<u64>) {
    static TIMES_REACHED: [AtomicUsize; Phase::ALL.len()] =
        [const { AtomicUsize::new(0) }; Phase::ALL.len()];
    let settings = settings();
    let times = TIMES_REACHED[phase.index()].fetch_add(1, Ordering::SeqCst) + 1;
    if settings.markers {
        write_marker(Marker::Phase { phase, generation });
    }
    if settings.fail_point == Some(phase) {
        eprintln!("fail point {phase} hit: aborting");
        std::process::abort();
    }
    if settings.pause_at == Some((phase, times)) {
        eprintln!("paused at {phase} (#{times}): waiting to be killed");
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_reads_back_as_itself() {
        let mut markers = vec![Marker::LockWaiting];
        for phase in Phase::ALL {
            markers.push(Marker::Phase {
                phase,
                generation: None,
            });
            markers.push(Marker::Phase {
                phase,
                generation: Some(42),
            });
        }
        for marker in markers {
            assert_eq!(Marker::parse(&marker.to_string()), Some(marker));
        }
    }

    #[test]
    fn phase_names_and_earlier_fail_point_names_resolve() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_name(phase.name()), Some(phase));
        }
        assert_eq!(Phase::from_name("before_commit"), Some(Phase::Decrypted));
        assert_eq!(Phase::from_name("after_commit"), Some(Phase::Committed));
        assert_eq!(Phase::from_name("after_print"), Some(Phase::Printed));
        assert_eq!(Phase::from_name("commited"), None);
        assert_eq!(Marker::parse("tdc-phase: commited"), None);
        assert_eq!(Marker::parse("tdc-phase: committed generation=x"), None);
    }
}
