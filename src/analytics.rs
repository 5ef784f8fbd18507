//! Analytics for to-device decryption failures: the taxonomy, the PostHog payload, the documents
//! generated from them and the reporting policy.
//!
//! These live in the [`to_device_analytics`] crate, which does not depend on this crate's Olm
//! machine, store or FFI, so that other SDKs can adopt them; they are re-exported here under the
//! paths this crate has always used.

pub use to_device_analytics::event::{
    AnalyticsEvent, CryptoSdk, ErrorDomain, ErrorEventProperties, ERROR_EVENT_NAME,
};
pub use to_device_analytics::policy::{
    AnalyticsDecision, AnalyticsOutboxStats, ReportingPolicy, ReportingStats, SuppressionRule,
};
pub use to_device_analytics::taxonomy::{FailureReason, ReasonInfo, ANALYTICS_NAME_PREFIX};
pub use to_device_analytics::{envelope, event, policy, schema, taxonomy};
