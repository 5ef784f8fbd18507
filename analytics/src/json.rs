//! JSON helpers: canonical JSON (what Matrix signatures cover), deterministic pretty printing,
//! compact serialization tuned for size-optimised builds, and the size and nesting limits checked
//! before any untrusted JSON is parsed.

use std::fmt::Write as _;
use std::io;

use serde::Serialize;
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

/// Appends the compact JSON of `value` to `out`: byte for byte what `serde_json::to_writer`
/// writes.
///
/// Why not `serde_json::to_writer(&mut Vec<u8>, …)` itself: in a size-optimised build (opt-level
/// "s", what the mobile libraries and the CLI ship with) every token serde_json writes — each
/// comma and bracket, the digits of each number — becomes an out-of-line `extend_from_slice` and
/// a libc `memmove` of one to three bytes. Number-heavy JSON such as vodozemac's pickles (keys are
/// arrays of numbers) spent about 70 % of its serialization time in those two functions; writing
/// short pieces byte by byte halves it (an account pickle with 50 one-time keys: 44–52 µs →
/// 19–29 µs). This is what persisting an account costs on every new inbound session.
///
/// ```
/// use serde_json::json;
/// use to_device_analytics::json::write_compact;
///
/// let value = json!({"keys": [1, 22, 255], "name": "é\n"});
/// let mut out = b"prefix:".to_vec();
/// write_compact(&mut out, &value).unwrap();
/// assert_eq!(out, [&b"prefix:"[..], &serde_json::to_vec(&value).unwrap()].concat());
/// ```
///
/// # Errors
/// Those of the value's `Serialize` implementation (e.g. a map with non-string keys); `out` may
/// then hold part of the value.
pub fn write_compact<T: ?Sized + Serialize>(
    out: &mut Vec<u8>,
    value: &T,
) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::new(ShortWrites(out)))
}

/// The compact JSON of `value` as a `String`: what `serde_json::to_string` returns, built as
/// [`write_compact`] builds it.
///
/// # Errors
/// Those of the value's `Serialize` implementation.
pub fn to_compact_string<T: ?Sized + Serialize>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    write_compact(&mut out, value)?;
    // serde_json writes only UTF-8 (it escapes nothing it cannot represent).
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// A `Vec<u8>` writer that copies short writes byte by byte instead of calling `memmove`.
struct ShortWrites<'a>(&'a mut Vec<u8>);

impl io::Write for ShortWrites<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // Tokens (punctuation, numbers up to 255, short keys) are at most a few bytes.
        if buf.len() <= 4 {
            self.0.reserve(4);
            for &byte in buf {
                self.0.push(byte);
            }
        } else {
            self.0.extend_from_slice(buf);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Any JSON value: strings with escapes and non-ASCII text, integers and floats, nesting.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\"\\\\\n\t\u{0}\u{1f}é€😀a-z]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn compact_writing_is_serde_jsons_output_byte_for_byte(value in any_json(), prefix in prop::collection::vec(any::<u8>(), 0..6)) {
            let mut out = prefix.clone();
            write_compact(&mut out, &value).unwrap();
            prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
            prop_assert_eq!(&out[prefix.len()..], &serde_json::to_vec(&value).unwrap()[..]);
            prop_assert_eq!(to_compact_string(&value).unwrap(), serde_json::to_string(&value).unwrap());
        }
    }

    #[test]
    fn byte_arrays_and_failing_values_behave_as_with_serde_json() {
        // Pickles are mostly arrays of small numbers: every width of number and both sides of
        // the four-byte boundary of a write.
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(
            to_compact_string(&bytes).unwrap(),
            serde_json::to_string(&bytes).unwrap()
        );
        let words = ["", "a", "ab", "abc", "abcd", "abcde", "abcdefghij"];
        assert_eq!(
            to_compact_string(&words).unwrap(),
            serde_json::to_string(&words).unwrap()
        );
        // A map with non-string keys fails the same way.
        let map: std::collections::BTreeMap<Vec<u8>, u8> = [(vec![1], 1)].into();
        assert!(to_compact_string(&map).is_err());
        assert!(serde_json::to_string(&map).is_err());
    }

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

        #[test]
        fn the_string_skip_agrees_with_a_byte_scan_across_long_strings(
            text in r#"(a{0,40}|[\[\]{}"\\,]){0,16}"#,
            max_depth in 0usize..5,
        ) {
            // Long strings too (memchr's vector loop and its tail), ending at every offset.
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
