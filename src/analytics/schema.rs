//! Documents generated from the taxonomy: the JSON Schema of the payload and the README table.
//!
//! Both are committed (`schemas/to-device-error-event.schema.json`, the table in `README.md`) and
//! `tests/generated_docs.rs` fails when the committed copies differ from what these functions
//! produce (run it with `TDC_BLESS=1` to rewrite them).

use serde_json::{json, Value};

use super::event::ERROR_EVENT_NAME;
use super::taxonomy::FailureReason;

/// The `$id` of the generated schema.
pub const SCHEMA_ID: &str =
    "https://github.com/matrix-org/to-device-crypto/schemas/to-device-error-event.schema.json";

/// The JSON Schema (draft 2020-12) of the PostHog capture payload.
///
/// `properties` follows the property definitions of the public matrix-analytics-events `Error`
/// schema (`domain`, `name`, `cryptoSDK`), restricted to what this crate emits, with
/// `additionalProperties: false` at every level.
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
                "required": ["domain", "name"],
                "additionalProperties": false,
                "properties": {
                    "domain": {
                        "description": "Domain of the error.",
                        "enum": ["E2EE", "VOIP", "TO_DEVICE"]
                    },
                    "name": {
                        "description": "The name of the error: one per to-device failure reason.",
                        "enum": names,
                        "oneOf": name_descriptions
                    },
                    "cryptoSDK": {
                        "description": "Which crypto backend is in use.",
                        "enum": ["Legacy", "Rust"]
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
         <!-- Generated from FailureReason (src/analytics/taxonomy.rs); run `TDC_BLESS=1 cargo test --test generated_docs`. -->\n\n\
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

    #[test]
    fn table_has_a_row_per_reason() {
        let table = failure_table_markdown();
        assert_eq!(table.lines().count(), 2 + FailureReason::ALL.len());
        assert!(table.contains("| `ToDeviceFailedToDecrypt_Store` |"));
    }
}
