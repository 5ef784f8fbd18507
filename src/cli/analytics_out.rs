//! `decrypt --analytics-out FILE`: the PostHog payloads the reporting policy let through, read from
//! the store's analytics outbox (not the failure stream, so a batch of any size writes every one),
//! appended to FILE and flushed to disk before they are acknowledged — a kill at any point loses
//! none.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use to_device_crypto::OlmMachine;

use super::CliResult;

/// The environment variable that sets how long (ms) a `decrypt` run's claim on the payloads it
/// writes holds; for tests that must see a killed run's payloads again without waiting.
pub const ANALYTICS_LEASE_ENV: &str = "TO_DEVICE_CRYPTO_ANALYTICS_LEASE_MS";

/// A `decrypt` run writes its payloads within moments of committing them, so its claim needs far
/// less than the library's default lease: a run killed before writing leaves them to the runs
/// that start 10 s later.
pub fn cli_analytics_lease() -> std::time::Duration {
    let millis = std::env::var(ANALYTICS_LEASE_ENV)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(10_000);
    std::time::Duration::from_millis(millis)
}

/// `--analytics-out`: payloads are appended as they are claimed, and [`AnalyticsOut::deliver`]
/// flushes the file to disk and only then acknowledges them, so a kill at any point loses none
/// (at worst, a kill between the flush and the acknowledgement writes a payload twice).
pub struct AnalyticsOut {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// Appended, not yet acknowledged.
    written: Vec<to_device_crypto::AnalyticsPayloadId>,
    /// Everything appended by this run (a second claim returns this run's own claims again).
    appended: std::collections::HashSet<to_device_crypto::AnalyticsPayloadId>,
}

impl AnalyticsOut {
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Self {
            path,
            file: std::io::BufWriter::new(file),
            written: Vec::new(),
            appended: std::collections::HashSet::new(),
        })
    }

    pub fn append(&mut self, payloads: &[to_device_crypto::PendingAnalyticsEvent]) -> CliResult {
        for payload in payloads {
            if !self.appended.insert(payload.id) {
                continue; // claimed again by the second flush of this run
            }
            writeln!(self.file, "{}", payload.event.to_json())
                .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
            self.written.push(payload.id);
        }
        Ok(())
    }

    pub async fn deliver(&mut self, machine: &OlmMachine) -> CliResult {
        if self.written.is_empty() {
            return Ok(());
        }
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        #[cfg(feature = "testing")]
        to_device_crypto::fail_point::reached(
            to_device_crypto::fail_point::Phase::AnalyticsWritten,
        );
        machine
            .acknowledge_analytics(&self.written)
            .await
            .map_err(|e| e.to_string())?;
        self.written.clear();
        Ok(())
    }
}
