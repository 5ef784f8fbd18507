//! Splitting CLI input into individual to-device events: the CLI's own module, also exposed by
//! the library's `testing` feature for the fuzz target and the limit tests.
//!
//! Accepted shapes: a JSON array of events, a whole `/sync` response (its `to_device.events`), a
//! single event object, or JSON lines (one event per line; a line that is not JSON is kept as an
//! event of its own, so it fails with `MalformedEvent` instead of aborting the batch).

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use serde_json::value::RawValue;
// Through the analytics crate, not `crate::`: the CLI compiles this file as its own module too.
use to_device_analytics::json::{check_limits, JsonLimits};

/// Why the input could not be split into events.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The input is empty.
    #[error("the input is empty: expected a JSON array of to-device events, a /sync response or JSON lines")]
    Empty,
    /// A JSON object that is neither a `/sync` response nor an event.
    #[error("the input is a JSON object without `to_device.events` and is not a to-device event")]
    UnrecognisedObject,
}

#[derive(Deserialize)]
struct ToDevice<'a> {
    #[serde(borrow, default)]
    events: Vec<&'a RawValue>,
}

/// The events of one input, each as raw JSON text, plus the `/sync` `next_batch` token if the input
/// was a `/sync` response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SplitInput {
    /// The raw events, in order.
    pub events: Vec<String>,
    /// The `next_batch` token of a `/sync` response.
    pub next_batch: Option<String>,
}

/// Splits `text` into raw to-device events.
///
/// ```
/// use to_device_crypto::sync_input::split_events;
///
/// let array = split_events(r#"[{"type":"a"},{"type":"b"}]"#).unwrap();
/// assert_eq!(array.events, vec![r#"{"type":"a"}"#, r#"{"type":"b"}"#]);
/// let sync = split_events(r#"{"next_batch":"s1","to_device":{"events":[{"type":"a"}]}}"#).unwrap();
/// assert_eq!((sync.events.len(), sync.next_batch.as_deref()), (1, Some("s1")));
/// let lines = split_events("{\"type\":\"a\"}\nnot json\n").unwrap();
/// assert_eq!(lines.events, vec![r#"{"type":"a"}"#, "not json"]);
/// ```
pub fn split_events(text: &str) -> Result<SplitInput, InputError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(InputError::Empty);
    }
    // Nesting is checked before any parse: a hostile input of millions of `[` is then just one
    // (malformed) line, not a deep recursion inside the parser.
    let shallow = check_limits(
        trimmed,
        JsonLimits {
            max_bytes: usize::MAX,
            max_depth: JsonLimits::TO_DEVICE_EVENT.max_depth + 3,
        },
    )
    .is_ok();
    if shallow && trimmed.starts_with('[') {
        if let Ok(events) = serde_json::from_str::<Vec<&RawValue>>(trimmed) {
            return Ok(SplitInput {
                events: events.into_iter().map(|e| e.get().to_owned()).collect(),
                next_batch: None,
            });
        }
    } else if shallow && trimmed.starts_with('{') {
        // Borrowed raw values: a large event is looked at, never copied into a `Value` tree.
        if let Ok(object) = serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(trimmed) {
            if object.contains_key("to_device") || object.contains_key("next_batch") {
                let to_device = object
                    .get("to_device")
                    .map(|raw| serde_json::from_str::<ToDevice<'_>>(raw.get()))
                    .transpose()
                    .map_err(|_| InputError::UnrecognisedObject)?;
                let next_batch = object
                    .get("next_batch")
                    .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
                return Ok(SplitInput {
                    events: to_device
                        .map(|t| t.events.into_iter().map(|e| e.get().to_owned()).collect())
                        .unwrap_or_default(),
                    next_batch,
                });
            }
            if object.contains_key("type") || object.contains_key("content") {
                return Ok(SplitInput {
                    events: vec![trimmed.to_owned()],
                    next_batch: None,
                });
            }
            return Err(InputError::UnrecognisedObject);
        }
    }
    Ok(SplitInput {
        events: trimmed
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect(),
        next_batch: None,
    })
}
