//! The PostHog `Error` event produced for a to-device decryption failure.
//!
//! The payload can only be built from a [`FailureReason`]: it has no field that could carry a user
//! id, device id, key, event id, message content or error text, so privacy holds by construction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::taxonomy::FailureReason;

/// The PostHog event name of every payload (the public schema's `eventName`).
pub const ERROR_EVENT_NAME: &str = "Error";

/// The public `Error` schema's `domain` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorDomain {
    /// Room-event decryption errors (not produced by this crate).
    #[serde(rename = "E2EE")]
    E2ee,
    /// Call errors (not produced by this crate).
    #[serde(rename = "VOIP")]
    Voip,
    /// To-device decryption errors: every payload of this crate.
    #[serde(rename = "TO_DEVICE")]
    ToDevice,
}

impl ErrorDomain {
    /// The value as it appears in the payload.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::E2ee => "E2EE",
            Self::Voip => "VOIP",
            Self::ToDevice => "TO_DEVICE",
        }
    }
}

/// The public `Error` schema's `cryptoSDK` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CryptoSdk {
    /// The libolm-based legacy stack (not produced by this crate).
    Legacy,
    /// A vodozemac/Rust stack: every payload of this crate.
    Rust,
}

impl CryptoSdk {
    /// The value as it appears in the payload.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "Legacy",
            Self::Rust => "Rust",
        }
    }
}

/// The properties of the PostHog `Error` event, exactly as the schema names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ErrorEventProperties {
    /// Always [`ErrorDomain::ToDevice`].
    pub domain: ErrorDomain,
    /// The failure reason, serialized as its analytics name.
    #[serde(serialize_with = "serialize_analytics_name")]
    pub name: FailureReason,
    /// Always [`CryptoSdk::Rust`].
    #[serde(rename = "cryptoSDK")]
    pub crypto_sdk: CryptoSdk,
}

fn serialize_analytics_name<S: serde::Serializer>(
    reason: &FailureReason,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(reason.analytics_name())
}

/// A PostHog-ready analytics event in capture shape: event name plus properties.
///
/// ```
/// use to_device_analytics::{AnalyticsEvent, FailureReason};
///
/// let event = AnalyticsEvent::for_failure(FailureReason::SessionWedged);
/// assert_eq!(
///     event.to_json(),
///     r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_SessionWedged","cryptoSDK":"Rust"}}"#
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct AnalyticsEvent {
    /// Always `"Error"`.
    pub event: &'static str,
    /// The event properties.
    pub properties: ErrorEventProperties,
}

impl AnalyticsEvent {
    /// The payload reporting a to-device decryption failure for `reason`.
    pub const fn for_failure(reason: FailureReason) -> Self {
        Self {
            event: ERROR_EVENT_NAME,
            properties: ErrorEventProperties {
                domain: ErrorDomain::ToDevice,
                name: reason,
                crypto_sdk: CryptoSdk::Rust,
            },
        }
    }

    /// The failure reason this payload reports.
    pub const fn reason(&self) -> FailureReason {
        self.properties.name
    }

    /// The payload as one line of JSON, the shape the CLI and the listeners emit.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the payload only holds static strings")
    }

    /// The properties as a string map, ready for `capture(event, properties)` in the PostHog SDKs.
    pub fn properties_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "domain".to_owned(),
                self.properties.domain.as_str().to_owned(),
            ),
            ("name".to_owned(), self.reason().analytics_name().to_owned()),
            (
                "cryptoSDK".to_owned(),
                self.properties.crypto_sdk.as_str().to_owned(),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_serializes_to_the_capture_shape() {
        let json = AnalyticsEvent::for_failure(FailureReason::MissingSession).to_json();
        assert_eq!(
            json,
            r#"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_MissingSession","cryptoSDK":"Rust"}}"#
        );
    }

    #[test]
    fn properties_map_matches_the_json_properties() {
        for reason in FailureReason::ALL {
            let event = AnalyticsEvent::for_failure(reason);
            let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
            let from_json: BTreeMap<String, String> =
                serde_json::from_value(json["properties"].clone()).unwrap();
            assert_eq!(from_json, event.properties_map());
        }
    }
}
