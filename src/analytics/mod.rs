//! Analytics for to-device decryption failures: the taxonomy, the PostHog payload and the
//! documents generated from them.
//!
//! Nothing here depends on the Olm machine or the store: another SDK can map its own errors to a
//! [`FailureReason`] and reuse [`AnalyticsEvent`] and the schema as they are.

pub mod event;
pub mod policy;
pub mod schema;
pub mod taxonomy;

pub use event::{AnalyticsEvent, CryptoSdk, ErrorDomain, ErrorEventProperties, ERROR_EVENT_NAME};
pub use policy::{AnalyticsDecision, ReportingPolicy, ReportingStats, SuppressionRule};
pub use taxonomy::{FailureReason, ReasonInfo, ANALYTICS_NAME_PREFIX};
