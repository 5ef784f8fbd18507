//! JSON helpers: canonical JSON (what Matrix signatures cover), deterministic pretty printing, and
//! the size and nesting limits checked before any untrusted JSON is parsed.

use std::fmt::Write as _;

use serde_json::Value;

/// Limits enforced on one to-device event before it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonLimits {
    /// Largest accepted event, in bytes of JSON text.
    pub max_bytes: usize,
    /// Deepest accepted nesting of arrays and objects.
    pub max_depth: usize,
}

impl JsonLimits {
    /// The limits used for to-device events: 256 KiB (four times the 64 KiB federation event
    /// limit, since to-device payloads such as key bundles run larger) and a nesting depth of 64
    /// (real Olm events nest about 6 levels).
    pub const TO_DEVICE_EVENT: JsonLimits = JsonLimits {
        max_bytes: 256 * 1024,
        max_depth: 64,
    };
}

/// Why [`check_limits`] rejected a JSON text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The text is larger than allowed.
    #[error("the event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the rejected text.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Arrays/objects nest deeper than allowed.
    #[error("the event nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
}

/// Rejects a JSON text that is too large or nests too deeply, in one pass and without allocating,
/// so that hostile input is refused before a parser spends memory on it.
///
/// ```
/// use to_device_analytics::json::{check_limits, JsonLimits};
///
/// let limits = JsonLimits { max_bytes: 1024, max_depth: 2 };
/// assert!(check_limits(r#"{"a":[1]}"#, limits).is_ok());
/// assert!(check_limits(r#"{"a":[[1]]}"#, limits).is_err());
/// assert!(check_limits(r#"{"a":"[[[[["}"#, limits).is_ok()); // brackets inside strings don't count
/// ```
pub fn check_limits(text: &str, limits: JsonLimits) -> Result<(), LimitError> {
    if text.len() > limits.max_bytes {
        return Err(LimitError::TooLarge {
            size: text.len(),
            limit: limits.max_bytes,
        });
    }
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string: jump from one quote or backslash to the next (string contents
                // are most of an Olm event, its base64 ciphertext).
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                        Some(offset) if bytes[i + offset] == b'\\' => i += offset + 2,
                        Some(offset) => {
                            i += offset;
                            break;
                        }
                        None => return Ok(()), // unterminated: the parser reports it
                    }
                    if i >= bytes.len() {
                        return Ok(());
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limits.max_depth {
                    return Err(LimitError::TooDeep {
                        limit: limits.max_depth,
                    });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Serializes `value` as Matrix canonical JSON: object keys sorted by code point, no insignificant
/// whitespace, UTF-8.
///
/// Keys are sorted here rather than relying on `serde_json`'s map order, which changes when any
/// crate in the build enables its `preserve_order` feature.
///
/// ```
/// use serde_json::json;
/// use to_device_analytics::json::to_canonical_string;
///
/// let value = json!({"b": 1, "a": {"d": [true, null], "c": "é"}});
/// assert_eq!(to_canonical_string(&value), r#"{"a":{"c":"é","d":[true,null]},"b":1}"#);
/// ```
pub fn to_canonical_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, None, 0);
    out
}

/// Serializes `value` with sorted keys and two-space indentation: a stable text for committed,
/// generated files.
pub fn to_sorted_pretty_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, Some("  "), 0);
    out
}

fn write_value(out: &mut String, value: &Value, indent: Option<&str>, level: usize) {
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, level + 1);
                write_value(out, item, indent, level + 1);
            }
            newline(out, indent, level);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, level + 1);
                write_scalar(out, &Value::String(key.clone()));
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_value(out, item, indent, level + 1);
            }
            newline(out, indent, level);
            out.push('}');
        }
        other => write_scalar(out, other),
    }
}

fn write_scalar(out: &mut String, value: &Value) {
    // Scalars (and empty containers) serialize the same in every mode.
    let _ = write!(out, "{value}");
}

fn newline(out: &mut String, indent: Option<&str>, level: usize) {
    if let Some(indent) = indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_matches_the_spec_examples() {
        // Examples from the Matrix spec's "Canonical JSON" section.
        assert_eq!(to_canonical_string(&json!({})), "{}");
        assert_eq!(
            to_canonical_string(&json!({"one": 1, "two": "Two"})),
            r#"{"one":1,"two":"Two"}"#
        );
        assert_eq!(
            to_canonical_string(&json!({"b": "2", "a": "1"})),
            r#"{"a":"1","b":"2"}"#
        );
        assert_eq!(
            to_canonical_string(
                &json!({"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}})
            ),
            r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#
        );
        assert_eq!(
            to_canonical_string(&json!({"a": "日本語"})),
            r#"{"a":"日本語"}"#
        );
        assert_eq!(
            to_canonical_string(&json!({"本": 2, "日": 1})),
            r#"{"日":1,"本":2}"#
        );
        assert_eq!(
            to_canonical_string(&json!({"a": "\u{1d11e}"})),
            "{\"a\":\"\u{1d11e}\"}"
        );
        assert_eq!(to_canonical_string(&json!({"a": null})), r#"{"a":null}"#);
    }

    #[test]
    fn limits_reject_large_and_deep_input() {
        let limits = JsonLimits {
            max_bytes: 10,
            max_depth: 3,
        };
        assert!(matches!(
            check_limits("[1,2,3,4,5,6]", limits),
            Err(LimitError::TooLarge {
                size: 13,
                limit: 10
            })
        ));
        assert_eq!(
            check_limits("[[[[]]]]", limits),
            Err(LimitError::TooDeep { limit: 3 })
        );
        assert_eq!(check_limits(r#"["\"[[[["]"#, limits), Ok(()));
    }

    /// The byte-at-a-time scanner `check_limits` replaced: the reference for its fast string skip.
    fn depth_by_bytes(text: &str, max_depth: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &byte in text.as_bytes() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max_depth {
                        return false;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        true
    }

    proptest::proptest! {
        #[test]
        fn the_string_skip_agrees_with_a_byte_scan(text in r#"[\[\]{}"\\a,]{0,40}"#, max_depth in 0usize..5) {
            let limits = JsonLimits { max_bytes: 1024, max_depth };
            proptest::prop_assert_eq!(check_limits(&text, limits).is_ok(), depth_by_bytes(&text, max_depth));
        }
    }

    #[test]
    fn pretty_output_is_sorted_and_stable() {
        let text = to_sorted_pretty_string(&json!({"b": [1, {}], "a": {}}));
        assert_eq!(text, "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {}\n  ]\n}");
    }
}
