//! Deterministic crash points for the crash test: with `TDC_FAIL_POINT=<name>` in the
//! environment, the process aborts at that point, exactly as a kill there would.
//!
//! Points: `before_commit` and `after_commit` (in every batch), and the CLI's `analytics_written`
//! (`--analytics-out` flushed, its payloads not yet acknowledged) and `after_print` (output
//! written, results not yet acknowledged). Unset, each check is one cached comparison.

use std::sync::OnceLock;

/// The environment variable that selects a fail point.
pub const FAIL_POINT_ENV: &str = "TDC_FAIL_POINT";

/// Aborts the process if `name` is the selected fail point.
pub fn hit(name: &str) {
    static SELECTED: OnceLock<Option<String>> = OnceLock::new();
    let selected = SELECTED.get_or_init(|| std::env::var(FAIL_POINT_ENV).ok());
    if selected.as_deref() == Some(name) {
        eprintln!("fail point {name} hit: aborting");
        std::process::abort();
    }
}
