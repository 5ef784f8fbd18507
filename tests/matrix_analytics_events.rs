//! The proposed change to the public analytics schema, matrix-analytics-events
//! (`upstream/matrix-analytics-events/*.patch`, against its v0.37.0): one `Error` `name` per
//! `FailureReason`, and the matching entries in the Kotlin and Swift types that the repository
//! generates from its schemas (it carries no TypeScript: that is generated when publishing).
//!
//! The patch has the whole of each file as context, so both sides can be read from it:
//! - the new `schemas/Error.json` must be exactly the old one plus the entries generated here from
//!   `FailureReason` (checked byte for byte);
//! - the Kotlin and Swift hunks must add exactly one enum case per name, with its description
//!   (wrapped by the repository's generator, so compared with whitespace normalised);
//! - our payload, in the flat shape the schema describes (`eventName` + properties), must validate
//!   against the new schema and not against the old one.
//!
//! Refreshing the patch needs a checkout of matrix-analytics-events:
//! `scripts/analytics-events-patch.sh <checkout>` (docs/UPSTREAM.md).

use std::collections::BTreeSet;

use serde_json::{json, Value};
use to_device_analytics::{AnalyticsEvent, FailureReason};

const PATCH_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/upstream/matrix-analytics-events"
);
const DESCRIPTION_PREFIX: &str = "TO_DEVICE domain error. ";

/// One file of the patch: its path and both sides.
struct FileDiff {
    path: String,
    old: Vec<String>,
    new: Vec<String>,
    added: Vec<String>,
}

fn patch_text() -> String {
    let mut patches: Vec<_> = std::fs::read_dir(PATCH_DIR)
        .unwrap_or_else(|e| panic!("{PATCH_DIR}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    assert_eq!(patches.len(), 1, "one patch in {PATCH_DIR}: {patches:?}");
    std::fs::read_to_string(&patches[0]).unwrap()
}

fn parse(patch: &str) -> Vec<FileDiff> {
    let mut files: Vec<FileDiff> = Vec::new();
    let mut in_hunk = false;
    for line in patch.lines() {
        if let Some(rest) = line.strip_prefix("diff --git a/") {
            let path = rest.split(" b/").next().unwrap().to_owned();
            files.push(FileDiff {
                path,
                old: Vec::new(),
                new: Vec::new(),
                added: Vec::new(),
            });
            in_hunk = false;
            continue;
        }
        let Some(file) = files.last_mut() else {
            continue;
        };
        if line.starts_with("@@ ") {
            assert!(
                !in_hunk,
                "{}: the patch must have the whole file as context (one hunk)",
                file.path
            );
            let old_start = line.split_whitespace().nth(1).unwrap();
            assert!(
                old_start.starts_with("-1,"),
                "{}: whole-file context",
                file.path
            );
            in_hunk = true;
            continue;
        }
        if !in_hunk || line.starts_with('\\') {
            continue;
        }
        if line == "-- " {
            // The signature separator of `git format-patch` ends the last hunk.
            in_hunk = false;
            continue;
        }
        match line.split_at_checked(1) {
            Some((" ", text)) => {
                file.old.push(text.to_owned());
                file.new.push(text.to_owned());
            }
            Some(("-", text)) => file.old.push(text.to_owned()),
            Some(("+", text)) => {
                file.new.push(text.to_owned());
                file.added.push(text.to_owned());
            }
            _ if line.is_empty() => {
                file.old.push(String::new());
                file.new.push(String::new());
            }
            _ => in_hunk = false,
        }
    }
    files
}

fn file<'a>(files: &'a [FileDiff], suffix: &str) -> &'a FileDiff {
    files
        .iter()
        .find(|f| f.path.ends_with(suffix))
        .unwrap_or_else(|| panic!("the patch changes no {suffix}"))
}

/// The description of a name in the schema: the domain prefix and the taxonomy's "when".
fn description(reason: FailureReason) -> String {
    format!("{DESCRIPTION_PREFIX}{}", reason.info().when)
}

/// `schemas/Error.json` with one `name` entry per reason after the existing
/// `ToDeviceFailedToDecrypt`, in the file's own one-entry-per-line style.
fn patched_error_json(old: &[String]) -> Vec<String> {
    let anchor = old
        .iter()
        .position(|l| l.contains(r#"{"const": "ToDeviceFailedToDecrypt","#))
        .expect("Error.json names ToDeviceFailedToDecrypt");
    let indent: String = old[anchor]
        .chars()
        .take_while(|c| c.is_whitespace())
        .collect();
    let mut new = old[..anchor].to_vec();
    let last = old[anchor].trim_end_matches(',');
    new.push(format!("{last},"));
    for (i, reason) in FailureReason::ALL.iter().enumerate() {
        let comma = if i + 1 == FailureReason::ALL.len() && !old[anchor].ends_with(',') {
            ""
        } else {
            ","
        };
        new.push(format!(
            "{indent}{{\"const\": {}, \"description\": {}}}{comma}",
            serde_json::to_string(reason.analytics_name()).unwrap(),
            serde_json::to_string(&description(*reason)).unwrap(),
        ));
    }
    new.extend_from_slice(&old[anchor + 1..]);
    new
}

#[test]
fn error_json_gains_one_name_per_failure_reason() {
    if let (Some(_), Some(checkout)) = (
        std::env::var_os("TDC_BLESS"),
        std::env::var_os("MATRIX_ANALYTICS_EVENTS_DIR"),
    ) {
        // Rewrites the schema of a matrix-analytics-events checkout, from which
        // scripts/analytics-events-patch.sh regenerates the types and the patch.
        let path = std::path::Path::new(&checkout).join("schemas/Error.json");
        let old = std::fs::read_to_string(&path).unwrap();
        let old: Vec<String> = old.lines().map(str::to_owned).collect();
        std::fs::write(&path, patched_error_json(&old).join("\n") + "\n").unwrap();
        return;
    }
    let files = parse(&patch_text());
    let error_json = file(&files, "schemas/Error.json");
    let expected = patched_error_json(&error_json.old);
    assert_eq!(
        error_json.new, expected,
        "the Error.json change is stale: run scripts/analytics-events-patch.sh <checkout>"
    );
    // Still valid JSON, and the names are exactly the taxonomy's, plus the existing ones.
    let schema: Value = serde_json::from_str(&error_json.new.join("\n")).unwrap();
    let names: BTreeSet<&str> = schema["properties"]["name"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["const"].as_str().unwrap())
        .collect();
    for reason in FailureReason::ALL {
        assert!(names.contains(reason.analytics_name()));
    }
}

/// The enum cases a hunk adds, as (identifier, description with whitespace normalised).
fn added_cases(
    added: &[String],
    case_line: impl Fn(&str) -> Option<String>,
    doc_line: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut cases = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    for line in added {
        let line = line.trim();
        if let Some(name) = case_line(line) {
            cases.push((name, doc.join(" ")));
            doc.clear();
        } else if let Some(text) = doc_line(line) {
            for word in text.split_whitespace() {
                // The generator wraps like Python's textwrap, which also breaks after the hyphen
                // of a hyphenated word ("pre-" / "key").
                match doc.last_mut() {
                    Some(last) if last.ends_with('-') && last.len() > 1 => last.push_str(word),
                    _ => doc.push(word.to_owned()),
                }
            }
        }
    }
    cases
}

fn expected_cases() -> Vec<(String, String)> {
    let mut cases: Vec<(String, String)> = FailureReason::ALL
        .iter()
        .map(|r| {
            let text = description(*r)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            (r.analytics_name().to_owned(), text)
        })
        .collect();
    // The repository's generator sorts enum cases by name.
    cases.sort();
    cases
}

#[test]
fn kotlin_and_swift_types_carry_each_name_with_its_description() {
    let files = parse(&patch_text());
    let kotlin = file(&files, "plan/Error.kt");
    let kotlin_cases = added_cases(
        &kotlin.added,
        |l| {
            let (name, raw) = l.strip_suffix("\"),")?.split_once("(\"")?;
            (name == raw).then(|| name.to_owned())
        },
        |l| l.strip_prefix("* ").map(str::to_owned),
    );
    assert_eq!(kotlin_cases, expected_cases());
    let swift = file(&files, "swift/Error.swift");
    let swift_cases = added_cases(
        &swift.added,
        |l| {
            let (name, raw) = l.strip_prefix("case ")?.split_once(" = \"")?;
            (raw.strip_suffix('"')? == name).then(|| name.to_owned())
        },
        |l| l.strip_prefix("/// ").map(str::to_owned),
    );
    assert_eq!(swift_cases, expected_cases());
    // Nothing but the new cases: no line removed, and each added line belongs to a case.
    for f in [kotlin, swift] {
        assert_eq!(
            f.old.len() + f.added.len(),
            f.new.len(),
            "{}: lines removed",
            f.path
        );
    }
}

/// Our payload as the schema describes it: the PostHog event name as `eventName`, plus the
/// properties.
fn flat(reason: FailureReason) -> Value {
    let event = AnalyticsEvent::for_failure(reason);
    let mut flat = json!({ "eventName": event.event });
    for (key, value) in event.properties_map() {
        flat[key] = json!(value);
    }
    flat
}

#[test]
fn our_payloads_validate_against_the_patched_schema_only() {
    let files = parse(&patch_text());
    let error_json = file(&files, "schemas/Error.json");
    let old: Value = serde_json::from_str(&error_json.old.join("\n")).unwrap();
    let new: Value = serde_json::from_str(&error_json.new.join("\n")).unwrap();
    let old = jsonschema::validator_for(&old).unwrap();
    let new = jsonschema::validator_for(&new).unwrap();
    for reason in FailureReason::ALL {
        let payload = flat(reason);
        assert_eq!(
            payload,
            json!({ "eventName": "Error", "domain": "TO_DEVICE", "name": reason.analytics_name(), "cryptoSDK": "Rust" })
        );
        assert!(
            new.is_valid(&payload),
            "{payload} against the patched schema"
        );
        assert!(!old.is_valid(&payload), "{payload} is already in v0.37");
        // The schema forbids anything else, such as an identifier.
        let mut leaky = payload.clone();
        leaky["sender"] = json!("@alice:example.org");
        assert!(!new.is_valid(&leaky));
    }
    // The existing to-device name is unchanged.
    assert!(old.is_valid(
        &json!({ "eventName": "Error", "domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt" })
    ));
    assert!(new.is_valid(
        &json!({ "eventName": "Error", "domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt" })
    ));
}
