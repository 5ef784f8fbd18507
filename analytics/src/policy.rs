//! The reporting policy: which failures become PostHog events, and the counts behind a failure
//! *rate*.
//!
//! Every failure is still published on the failure stream; the policy only decides whether it
//! carries a payload. Rules, in order:
//!
//! 1. **Consent** — with analytics disabled no payload is produced at all (nothing is queued for
//!    later), though the other bookkeeping continues.
//! 2. **Once per message** — a to-device message that already failed (a redelivery, a retried batch,
//!    a relaunch) is never reported again. The caller keeps these marks, persisted with the failure.
//! 3. **Suppression window** — at most one payload per (sender, sender key, name) per window
//!    (default one hour), so one wedged session yields one event per hour, not hundreds.
//! 4. **Global cap** — at most N payloads per minute from this device, against floods.
//!
//! With the defaults, a PostHog `ToDeviceFailedToDecrypt_SessionWedged` count means "sender
//! devices per hour that hit a wedged session with this device"; dividing by the number of
//! reporting devices (or by the decrypted counts of [`ReportingStats`]) gives a rate.
//!
//! This module does not depend on the Olm machine: it sees failures as a [`FailureKey`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::event::AnalyticsEvent;
use super::taxonomy::FailureReason;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;
/// How many hourly buckets [`ReportingStats::hours`] keeps.
pub const STATS_HOURS_KEPT: usize = 24;

/// The configuration of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportingPolicy {
    /// Whether payloads are produced at all (the user's analytics consent).
    pub analytics_enabled: bool,
    /// At most one payload per (sender, sender key, name) in this many seconds; 0 disables the
    /// rule.
    pub suppression_window_secs: u64,
    /// At most this many payloads per minute; `None` disables the cap.
    pub max_events_per_minute: Option<u32>,
}

impl Default for ReportingPolicy {
    /// Consent on (apps switch it with their analytics opt-in), a one-hour window, 30 per minute.
    fn default() -> Self {
        Self {
            analytics_enabled: true,
            suppression_window_secs: 3600,
            max_events_per_minute: Some(30),
        }
    }
}

impl ReportingPolicy {
    /// A policy that reports every distinct failed message (once), without window or cap.
    pub const fn every_message() -> Self {
        Self {
            analytics_enabled: true,
            suppression_window_secs: 0,
            max_events_per_minute: None,
        }
    }
}

/// Which rule kept a failure from producing a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SuppressionRule {
    /// Analytics are disabled (no consent).
    AnalyticsDisabled,
    /// This message already failed before.
    AlreadySeen,
    /// The same sender, sender key and name were reported within the window.
    SuppressionWindow,
    /// The per-minute cap was reached.
    GlobalCap,
}

/// Whether a failure produced a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AnalyticsDecision {
    /// Send this payload.
    Reported(AnalyticsEvent),
    /// No payload, because of this rule.
    Suppressed(SuppressionRule),
}

impl AnalyticsDecision {
    /// The payload, when the failure is to be reported.
    pub fn payload(&self) -> Option<&AnalyticsEvent> {
        match self {
            Self::Reported(event) => Some(event),
            Self::Suppressed(_) => None,
        }
    }
}

/// What the policy needs to know about one failure. Identifiers are hashed before they are kept.
#[derive(Clone, Copy, Debug)]
pub struct FailureKey<'a> {
    /// The failure reason.
    pub reason: FailureReason,
    /// The envelope sender, if known.
    pub sender: Option<&'a str>,
    /// The envelope sender key, if known.
    pub sender_key: Option<&'a str>,
    /// Whether this exact message already failed before (the caller's persisted mark).
    pub already_seen: bool,
}

/// Counts for one failure name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameStats {
    /// Failures seen, reported or not.
    pub seen: u64,
    /// Failures that produced a payload.
    pub reported: u64,
    /// Suppressed because analytics were disabled.
    pub suppressed_disabled: u64,
    /// Suppressed because the message failed before.
    pub suppressed_already_seen: u64,
    /// Suppressed by the (sender, sender key, name) window.
    pub suppressed_window: u64,
    /// Suppressed by the per-minute cap.
    pub suppressed_cap: u64,
}

impl NameStats {
    fn count(&mut self, decision: &AnalyticsDecision) {
        self.seen += 1;
        match decision {
            AnalyticsDecision::Reported(_) => self.reported += 1,
            AnalyticsDecision::Suppressed(SuppressionRule::AnalyticsDisabled) => {
                self.suppressed_disabled += 1
            }
            AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen) => {
                self.suppressed_already_seen += 1
            }
            AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow) => {
                self.suppressed_window += 1
            }
            AnalyticsDecision::Suppressed(SuppressionRule::GlobalCap) => self.suppressed_cap += 1,
        }
    }
}

/// Counts over one period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodStats {
    /// Start of the period, ms since the Unix epoch.
    pub start_ms: u64,
    /// Events that decrypted.
    pub decrypted: u64,
    /// Failure counts per name (names with no failure are absent).
    pub failures: BTreeMap<FailureReason, NameStats>,
}

/// Failure and decryption counts: since the store was created, and per hour for the last
/// [`STATS_HOURS_KEPT`] hours, so an app can compute failure rates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportingStats {
    /// Everything since the counts started.
    pub total: PeriodStats,
    /// One entry per hour that saw activity, oldest first.
    pub hours: Vec<PeriodStats>,
    /// Payloads a listener never received because its queue was full (not persisted).
    pub listener_drops: u64,
    /// The analytics outbox, when the caller keeps one (filled in by the caller, not by
    /// [`PolicyState`]).
    #[serde(default)]
    pub outbox: AnalyticsOutboxStats,
}

/// The state of an analytics outbox: payloads waiting for acknowledgement and payloads given up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsOutboxStats {
    /// Payloads committed and not yet acknowledged.
    pub pending: u64,
    /// Payloads dropped, oldest first, because the outbox was full.
    pub dropped_full: u64,
    /// Payloads dropped because every delivery attempt failed (a listener kept throwing).
    pub dropped_undeliverable: u64,
}

/// The policy's persisted state: windows, the cap's minute, and the counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Last report time per hashed (sender, sender key, name).
    windows: HashMap<String, u64>,
    /// The same entries ordered by report time, so that expired windows are dropped from the
    /// oldest end (O(log n) each) instead of by a scan of every window per decision. Derived
    /// from `windows` (not stored); rebuilt whenever the two disagree in size.
    #[serde(skip)]
    expiry: BTreeSet<(u64, String)>,
    cap_minute_start_ms: u64,
    cap_count: u32,
    stats: ReportingStats,
}

fn window_key(key: &FailureKey<'_>) -> String {
    let mut hasher = Sha256::new();
    for part in [
        key.sender.unwrap_or_default(),
        key.sender_key.unwrap_or_default(),
        key.reason.as_str(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first_half = [0u8; 16];
    first_half.copy_from_slice(&digest[..16]);
    format!("{:032x}", u128::from_be_bytes(first_half))
}

impl PolicyState {
    /// Decides whether the failure `key` produces a payload at `now_ms`, and counts it.
    ///
    /// ```
    /// use to_device_analytics::policy::{AnalyticsDecision, FailureKey, PolicyState, ReportingPolicy, SuppressionRule};
    /// use to_device_analytics::FailureReason;
    ///
    /// let mut state = PolicyState::default();
    /// let policy = ReportingPolicy::default();
    /// let key = FailureKey { reason: FailureReason::SessionWedged, sender: Some("@a:b"), sender_key: Some("K"), already_seen: false };
    /// assert!(matches!(state.decide(&policy, &key, 0), AnalyticsDecision::Reported(_)));
    /// // The same wedged session a minute later: inside the one-hour window.
    /// assert_eq!(state.decide(&policy, &key, 60_000), AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow));
    /// ```
    pub fn decide(
        &mut self,
        policy: &ReportingPolicy,
        key: &FailureKey<'_>,
        now_ms: u64,
    ) -> AnalyticsDecision {
        let decision = self.rule(policy, key, now_ms);
        self.stats
            .total
            .failures
            .entry(key.reason)
            .or_default()
            .count(&decision);
        self.current_hour(now_ms)
            .failures
            .entry(key.reason)
            .or_default()
            .count(&decision);
        decision
    }

    fn rule(
        &mut self,
        policy: &ReportingPolicy,
        key: &FailureKey<'_>,
        now_ms: u64,
    ) -> AnalyticsDecision {
        if !policy.analytics_enabled {
            return AnalyticsDecision::Suppressed(SuppressionRule::AnalyticsDisabled);
        }
        if key.already_seen {
            return AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen);
        }
        let window_ms = policy.suppression_window_secs.saturating_mul(1000);
        let window_key = (window_ms > 0).then(|| window_key(key));
        if let Some(window_key) = &window_key {
            self.drop_expired_windows(now_ms, window_ms);
            let open = self
                .windows
                .get(window_key)
                .is_some_and(|reported| now_ms.saturating_sub(*reported) < window_ms);
            if open {
                return AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow);
            }
        }
        if let Some(cap) = policy.max_events_per_minute {
            if now_ms.saturating_sub(self.cap_minute_start_ms) >= MINUTE_MS {
                self.cap_minute_start_ms = now_ms;
                self.cap_count = 0;
            }
            if self.cap_count >= cap {
                return AnalyticsDecision::Suppressed(SuppressionRule::GlobalCap);
            }
            self.cap_count += 1;
        }
        if let Some(window_key) = window_key {
            if let Some(previous) = self.windows.insert(window_key.clone(), now_ms) {
                self.expiry.remove(&(previous, window_key.clone()));
            }
            self.expiry.insert((now_ms, window_key));
        }
        AnalyticsDecision::Reported(AnalyticsEvent::for_failure(key.reason))
    }

    /// Drops the windows that ended by `now_ms`, oldest first: a decision costs O(log n) per
    /// window it drops, not a scan of every window. (A window is judged open by its own time
    /// anyway; dropping only bounds the map to the windows still open.)
    fn drop_expired_windows(&mut self, now_ms: u64, window_ms: u64) {
        if self.expiry.len() != self.windows.len() {
            // Deserialized without `from_json`, or a clock that went back: rebuild the order.
            self.expiry = self
                .windows
                .iter()
                .map(|(key, reported)| (*reported, key.clone()))
                .collect();
        }
        while let Some((reported, _)) = self.expiry.first() {
            if now_ms.saturating_sub(*reported) < window_ms {
                break;
            }
            let (_, key) = self.expiry.pop_first().expect("just looked at it");
            self.windows.remove(&key);
        }
    }

    /// How many suppression windows the state holds (open ones, and at most the ones that ended
    /// since the last decision).
    pub fn window_count(&self) -> usize {
        self.windows.len()
    }

    /// Counts `count` successfully decrypted events at `now_ms`.
    pub fn record_decrypted(&mut self, count: u64, now_ms: u64) {
        if count == 0 {
            return;
        }
        self.stats.total.decrypted += count;
        self.current_hour(now_ms).decrypted += count;
    }

    fn current_hour(&mut self, now_ms: u64) -> &mut PeriodStats {
        let hour_start = now_ms - now_ms % HOUR_MS;
        if self.stats.total.start_ms == 0 {
            self.stats.total.start_ms = now_ms;
        }
        if self.stats.hours.last().map(|h| h.start_ms) != Some(hour_start) {
            self.stats.hours.push(PeriodStats {
                start_ms: hour_start,
                ..PeriodStats::default()
            });
            let excess = self.stats.hours.len().saturating_sub(STATS_HOURS_KEPT);
            self.stats.hours.drain(..excess);
        }
        self.stats.hours.last_mut().expect("just ensured")
    }

    /// The counts so far.
    pub fn stats(&self) -> &ReportingStats {
        &self.stats
    }

    /// Serializes the state for the store.
    pub fn to_json(&self) -> String {
        crate::json::to_compact_string(self).expect("the state holds only strings and numbers")
    }

    /// Restores the state the store kept.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        let mut state: Self = serde_json::from_str(json)?;
        state.expiry = state
            .windows
            .iter()
            .map(|(key, reported)| (*reported, key.clone()))
            .collect();
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reason: FailureReason, sender: &'static str, already_seen: bool) -> FailureKey<'static> {
        FailureKey {
            reason,
            sender: Some(sender),
            sender_key: Some("KEY"),
            already_seen,
        }
    }

    fn reported(decision: AnalyticsDecision) -> bool {
        matches!(decision, AnalyticsDecision::Reported(_))
    }

    #[test]
    fn ended_windows_are_dropped_and_open_ones_kept_across_a_restart() {
        let policy = ReportingPolicy {
            max_events_per_minute: None,
            ..ReportingPolicy::default()
        };
        let window = policy.suppression_window_secs * 1000;
        let mut state = PolicyState::default();
        let senders: Vec<String> = (0..1000).map(|i| format!("@s{i}:x")).collect();
        fn key_of(sender: &str) -> FailureKey<'_> {
            FailureKey {
                reason: FailureReason::SessionWedged,
                sender: Some(sender),
                sender_key: Some("KEY"),
                already_seen: false,
            }
        }
        for (i, sender) in senders.iter().enumerate() {
            assert!(reported(state.decide(&policy, &key_of(sender), i as u64)));
        }
        assert_eq!(state.window_count(), 1000);
        // Half of the windows have ended: one decision drops exactly those.
        let mut state = PolicyState::from_json(&state.to_json()).unwrap();
        assert_eq!(
            state.decide(&policy, &key_of(&senders[999]), window + 499),
            AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow)
        );
        assert_eq!(state.window_count(), 500);
        assert!(reported(state.decide(
            &policy,
            &key_of(&senders[0]),
            window + 499
        )));
        assert_eq!(state.window_count(), 501);
        // The re-opened window of senders[0] ends an hour after its new report, not before.
        assert_eq!(
            state.decide(&policy, &key_of(&senders[0]), 2 * window + 498),
            AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow)
        );
        assert_eq!(
            state.window_count(),
            1,
            "only senders[0]'s window is still open"
        );
        assert!(reported(state.decide(
            &policy,
            &key_of(&senders[0]),
            2 * window + 499
        )));
    }

    #[test]
    fn a_wedged_session_reports_once_per_window() {
        let policy = ReportingPolicy::default();
        let mut state = PolicyState::default();
        let wedged = key(FailureReason::SessionWedged, "@a:x", false);
        assert!(reported(state.decide(&policy, &wedged, 1_000)));
        for minute in 1..60 {
            assert_eq!(
                state.decide(&policy, &wedged, 1_000 + minute * MINUTE_MS),
                AnalyticsDecision::Suppressed(SuppressionRule::SuppressionWindow)
            );
        }
        // Another name, or another sender, is reported; the window reopens after an hour.
        assert!(reported(state.decide(
            &policy,
            &key(FailureReason::MissingSession, "@a:x", false),
            2_000
        )));
        assert!(reported(state.decide(
            &policy,
            &key(FailureReason::SessionWedged, "@b:x", false),
            2_000
        )));
        assert!(reported(state.decide(&policy, &wedged, 1_000 + HOUR_MS)));
        let stats = &state.stats().total.failures[&FailureReason::SessionWedged];
        assert_eq!(
            (stats.seen, stats.reported, stats.suppressed_window),
            (62, 3, 59)
        );
    }

    #[test]
    fn a_message_is_reported_at_most_once() {
        let policy = ReportingPolicy::every_message();
        let mut state = PolicyState::default();
        assert!(reported(state.decide(
            &policy,
            &key(FailureReason::JsonError, "@a:x", false),
            0
        )));
        assert_eq!(
            state.decide(&policy, &key(FailureReason::JsonError, "@a:x", true), 0),
            AnalyticsDecision::Suppressed(SuppressionRule::AlreadySeen)
        );
    }

    #[test]
    fn the_cap_limits_payloads_per_minute() {
        let policy = ReportingPolicy {
            max_events_per_minute: Some(3),
            ..ReportingPolicy::every_message()
        };
        let mut state = PolicyState::default();
        let decisions: Vec<bool> = (0..5)
            .map(|_| {
                reported(state.decide(
                    &policy,
                    &key(FailureReason::MalformedEvent, "@a:x", false),
                    10,
                ))
            })
            .collect();
        assert_eq!(decisions, [true, true, true, false, false]);
        assert!(reported(state.decide(
            &policy,
            &key(FailureReason::MalformedEvent, "@a:x", false),
            10 + MINUTE_MS
        )));
    }

    #[test]
    fn without_consent_nothing_is_reported_and_nothing_is_replayed_later() {
        let mut policy = ReportingPolicy {
            analytics_enabled: false,
            ..ReportingPolicy::default()
        };
        let mut state = PolicyState::default();
        let failure = key(FailureReason::SessionWedged, "@a:x", false);
        assert_eq!(
            state.decide(&policy, &failure, 0),
            AnalyticsDecision::Suppressed(SuppressionRule::AnalyticsDisabled)
        );
        policy.analytics_enabled = true;
        // Nothing was queued: the next failure is simply the first reported one.
        assert!(reported(state.decide(&policy, &failure, 1)));
        assert_eq!(
            state.stats().total.failures[&FailureReason::SessionWedged].seen,
            2
        );
    }

    #[test]
    fn hourly_stats_roll_over_and_survive_serialization() {
        let policy = ReportingPolicy::default();
        let mut state = PolicyState::default();
        for hour in 0..30 {
            state.record_decrypted(10, hour * HOUR_MS + 5);
            state.decide(
                &policy,
                &key(FailureReason::MissingSession, "@a:x", false),
                hour * HOUR_MS + 6,
            );
        }
        assert_eq!(state.stats().hours.len(), STATS_HOURS_KEPT);
        assert_eq!(state.stats().total.decrypted, 300);
        assert_eq!(state.stats().hours.last().unwrap().decrypted, 10);
        let restored = PolicyState::from_json(&state.to_json()).unwrap();
        assert_eq!(restored, state);
        // The window keys are hashes: no identifier is kept.
        assert!(!state.to_json().contains("@a:x"));
    }
}
