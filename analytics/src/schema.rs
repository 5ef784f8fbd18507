//! Documents generated from the taxonomy: the JSON Schema of the payload and the README table.
//!
//! Both are committed (`schemas/to-device-error-event.schema.json`, the table in `README.md`) and
//! `tests/generated_docs.rs` fails when the committed copies differ from what these functions
//! produce (run it with `TDC_BLESS=1` to rewrite them).

use serde_json::{json, Value};

use super::event::{CryptoSdk, ErrorDomain, ERROR_EVENT_NAME};
use super::taxonomy::FailureReason;

/// The `$id` of the generated schema: a URN, since the schema is published with the crate rather
/// than at a web address.
pub const SCHEMA_ID: &str = "urn:to-device-analytics:schema:to-device-error-event";

/// The JSON Schema (draft 2020-12) of the PostHog capture payload.
///
/// `properties` follows the property definitions of the public matrix-analytics-events `Error`
/// schema (`domain`, `name`, `cryptoSDK`), restricted to exactly what a to-device failure payload
/// holds — `domain` is `TO_DEVICE`, `cryptoSDK` is `Rust`, all three are required — with
/// `additionalProperties: false` at every level, so that it is a strict test oracle.
pub fn payload_json_schema() -> Value {
    let names: Vec<&str> = FailureReason::ALL
        .iter()
        .map(|reason| reason.analytics_name())
        .collect();
    let name_descriptions: Vec<Value> = FailureReason::ALL
        .iter()
        .map(|reason| {
            let info = reason.info();
            json!({"const": info.analytics_name, "description": info.when})
        })
        .collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "To-device decryption failure (PostHog capture payload)",
        "description": "A PostHog `Error` event in capture shape: `event` is the schema's `eventName`, `properties` are the public `Error` properties. Generated from FailureReason; do not edit.",
        "type": "object",
        "required": ["event", "properties"],
        "additionalProperties": false,
        "properties": {
            "event": {"description": "The PostHog event name.", "enum": [ERROR_EVENT_NAME]},
            "properties": {
                "type": "object",
                "required": ["domain", "name", "cryptoSDK"],
                "additionalProperties": false,
                "properties": {
                    "domain": {
                        "description": "Domain of the error: always TO_DEVICE for these events.",
                        "const": ErrorDomain::ToDevice.as_str()
                    },
                    "name": {
                        "description": "The name of the error: one per to-device failure reason.",
                        "enum": names,
                        "oneOf": name_descriptions
                    },
                    "cryptoSDK": {
                        "description": "Which crypto backend is in use: always the Rust stack.",
                        "const": CryptoSdk::Rust.as_str()
                    }
                }
            }
        }
    })
}

/// The committed text of the schema file: sorted keys, two-space indent, trailing newline.
pub fn payload_json_schema_text() -> String {
    let mut text = crate::json::to_sorted_pretty_string(&payload_json_schema());
    text.push('\n');
    text
}

/// The README failure table (Markdown), one row per reason.
pub fn failure_table_markdown() -> String {
    let mut table =
        String::from("| name | when | typical root cause | what to look at |\n|---|---|---|---|\n");
    for reason in FailureReason::ALL {
        let info = reason.info();
        table.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            info.analytics_name, info.when, info.typical_root_cause, info.what_to_check
        ));
    }
    table
}

/// `docs/analytics-schema.md`: the proposed additions to the public matrix-analytics-events
/// `Error` schema, one entry per name, ready to propose upstream.
pub fn upstream_schema_proposal_markdown() -> String {
    let mut doc = String::from(
        "# Proposed additions to the `Error` analytics schema\n\n\
         <!-- Generated from FailureReason (analytics/src/taxonomy.rs); run `TDC_BLESS=1 cargo test --test generated_docs`. -->\n\n\
         The public matrix-analytics-events `Error` schema (`schemas/Error.json`) has one to-device name,\n\
         `ToDeviceFailedToDecrypt`. We propose one name per failure reason, so that a to-device\n\
         decryption failure says *why* it happened. Each is sent with `domain: \"TO_DEVICE\"` and\n\
         `cryptoSDK: \"Rust\"`, and no other property.\n\n\
         Until the schema lists them, the generated Swift/Kotlin `AnalyticsEvent.Error` types cannot\n\
         carry these names: apps send them through the PostHog SDK directly\n\
         (`capture(event, properties)` with the payload's `event` and `properties`).\n\n\
         Proposed `name` enum additions (for `Error.json` `properties.name.enum`, with these\n\
         descriptions in `oneOf`):\n\n",
    );
    for reason in FailureReason::ALL {
        let info = reason.info();
        doc.push_str(&format!("- `{}`: {}\n", info.analytics_name, info.when));
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_lists_every_name_once() {
        let schema = payload_json_schema();
        let names = schema["properties"]["properties"]["properties"]["name"]["enum"]
            .as_array()
            .unwrap();
        assert_eq!(names.len(), FailureReason::ALL.len());
    }

    fn validator() -> jsonschema::Validator {
        jsonschema::validator_for(&payload_json_schema()).expect("the schema is valid JSON Schema")
    }

    #[test]
    fn every_payload_validates() {
        let validator = validator();
        for reason in FailureReason::ALL {
            let payload: Value =
                serde_json::from_str(&crate::AnalyticsEvent::for_failure(reason).to_json())
                    .unwrap();
            assert!(validator.is_valid(&payload), "{payload}");
        }
    }

    #[test]
    fn the_schema_refuses_anything_a_payload_never_holds() {
        let validator = validator();
        let good = json!({"event": "Error", "properties": {"domain": "TO_DEVICE",
            "name": "ToDeviceFailedToDecrypt_SessionWedged", "cryptoSDK": "Rust"}});
        assert!(validator.is_valid(&good));
        let mut mutations: Vec<(&str, Value)> = Vec::new();
        let mut push = |label, change: &dyn Fn(&mut Value)| {
            let mut payload = good.clone();
            change(&mut payload);
            mutations.push((label, payload));
        };
        push("room-event domain", &|p| {
            p["properties"]["domain"] = json!("E2EE")
        });
        push("legacy SDK", &|p| {
            p["properties"]["cryptoSDK"] = json!("Legacy")
        });
        push("no cryptoSDK", &|p| {
            p["properties"].as_object_mut().unwrap().remove("cryptoSDK");
        });
        push("no domain", &|p| {
            p["properties"].as_object_mut().unwrap().remove("domain");
        });
        push("the public schema's closed name", &|p| {
            p["properties"]["name"] = json!("ToDeviceFailedToDecrypt")
        });
        push("an extra property", &|p| {
            p["properties"]["context"] = json!("@bob:example.org")
        });
        push("an extra top-level field", &|p| {
            p["distinct_id"] = json!("x")
        });
        push("another event", &|p| p["event"] = json!("UnableToDecrypt"));
        for (label, payload) in mutations {
            assert!(!validator.is_valid(&payload), "{label}: {payload}");
        }
    }

    #[test]
    fn table_has_a_row_per_reason() {
        let table = failure_table_markdown();
        assert_eq!(table.lines().count(), 2 + FailureReason::ALL.len());
        assert!(table.contains("| `ToDeviceFailedToDecrypt_Store` |"));
    }
}
