//! The failure taxonomy without a machine: an app that only has a reason name (from logs, a
//! server, or another SDK that adopts our names) builds the PostHog payload and reads the reason's
//! documentation from Swift, Kotlin and Python.

use super::types::{FailureReasonFfi, PosthogErrorEvent};
use crate::analytics::{AnalyticsEvent, FailureReason};

/// The documentation of one failure reason: the columns of the README's failure table.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct FailureReasonInfo {
    /// The reason.
    pub reason: FailureReasonFfi,
    /// The short name, e.g. `SessionWedged`.
    pub name: String,
    /// The PostHog `Error` event `name`, e.g. `ToDeviceFailedToDecrypt_SessionWedged`.
    pub analytics_name: String,
    /// When this reason is reported (the check that failed).
    pub description: String,
    /// The most likely root cause in the field.
    pub typical_root_cause: String,
    /// What an app engineer should look at first.
    pub what_to_look_at: String,
    /// Whether a new Olm session with the sender fixes it (the machine then queues a
    /// `/keys/claim` for a known sender device).
    pub needs_new_session: bool,
}

#[uniffi::export]
impl FailureReasonFfi {
    /// The PostHog `Error` event `name`, e.g. `ToDeviceFailedToDecrypt_SessionWedged`.
    pub fn analytics_name(&self) -> String {
        FailureReason::from(*self).analytics_name().to_owned()
    }

    /// The PostHog event for this reason: exactly what a listener receives for such a failure.
    pub fn posthog_event(&self) -> PosthogErrorEvent {
        AnalyticsEvent::for_failure((*self).into()).into()
    }

    /// When this reason is reported, its typical root cause and what to look at.
    pub fn info(&self) -> FailureReasonInfo {
        let reason = FailureReason::from(*self);
        let info = reason.info();
        FailureReasonInfo {
            reason: *self,
            name: info.reason.to_owned(),
            analytics_name: info.analytics_name.to_owned(),
            description: info.when.to_owned(),
            typical_root_cause: info.typical_root_cause.to_owned(),
            what_to_look_at: info.what_to_check.to_owned(),
            needs_new_session: reason.needs_new_session(),
        }
    }
}

/// The reason named `name`: a short name (`SessionWedged`) or an analytics name
/// (`ToDeviceFailedToDecrypt_SessionWedged`); `None` for anything else (names are
/// case-sensitive).
#[uniffi::export]
pub fn failure_reason_from_name(name: String) -> Option<FailureReasonFfi> {
    FailureReason::from_reason_name(&name)
        .or_else(|| FailureReason::from_analytics_name(&name))
        .map(FailureReasonFfi::from)
}

/// Every failure reason, in the order of the README's table.
#[uniffi::export]
pub fn all_failure_reasons() -> Vec<FailureReasonFfi> {
    FailureReason::ALL.into_iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_both_names_and_documents_itself() {
        assert_eq!(all_failure_reasons().len(), FailureReason::ALL.len());
        for reason in all_failure_reasons() {
            let core = FailureReason::from(reason);
            let info = reason.info();
            assert_eq!(failure_reason_from_name(info.name.clone()), Some(reason));
            assert_eq!(
                failure_reason_from_name(info.analytics_name.clone()),
                Some(reason)
            );
            assert_eq!(info.analytics_name, reason.analytics_name());
            assert_eq!(info.description, core.info().when);
            assert_eq!(
                reason.posthog_event().json,
                AnalyticsEvent::for_failure(core).to_json()
            );
            assert_eq!(reason.posthog_event().name, reason);
        }
        for unknown in [
            "",
            "sessionwedged",
            "ToDeviceFailedToDecrypt_",
            "DecryptionFailure",
        ] {
            assert_eq!(failure_reason_from_name(unknown.into()), None, "{unknown}");
        }
    }
}
