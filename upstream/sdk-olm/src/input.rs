//! Splitting the `decrypt` input into to-device events, with the same rules as our CLI
//! (`to_device_crypto::sync_input`): a JSON array of events, a `/sync` response (its
//! `to_device.events` and `next_batch`), a single event object, or JSON lines. A JSON line that is
//! not JSON stays an input of its own, so that it is reported instead of aborting the batch.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

/// One input event: raw JSON text, or a line that is not JSON.
#[derive(Debug)]
pub enum InputEvent {
    Json(Box<RawValue>),
    NotJson { error: String },
}

/// The events of one input and the `/sync` `next_batch` token, if any.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<InputEvent>,
    pub next_batch: Option<String>,
}

/// Why the input is not a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum InputError {
    Empty,
    UnrecognisedObject,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InputError::Empty => {
                "the input is empty: expected a JSON array of to-device events, a /sync response or JSON lines"
            }
            InputError::UnrecognisedObject => {
                "the input is a JSON object without `to_device.events` and is not a to-device event"
            }
        })
    }
}

pub fn split(text: &str) -> Result<Batch, InputError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(InputError::Empty);
    }
    if trimmed.starts_with('[') {
        if let Ok(events) = serde_json::from_str::<Vec<Box<RawValue>>>(trimmed) {
            return Ok(Batch {
                events: events.into_iter().map(InputEvent::Json).collect(),
                next_batch: None,
            });
        }
    } else if trimmed.starts_with('{') {
        if let Ok(object) = serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(trimmed) {
            if object.contains_key("to_device") || object.contains_key("next_batch") {
                #[derive(serde::Deserialize)]
                struct ToDevice {
                    #[serde(default)]
                    events: Vec<Box<RawValue>>,
                }
                let events = match object.get("to_device") {
                    Some(raw) => {
                        serde_json::from_str::<ToDevice>(raw.get())
                            .map_err(|_| InputError::UnrecognisedObject)?
                            .events
                    }
                    None => Vec::new(),
                };
                let next_batch = object
                    .get("next_batch")
                    .and_then(|raw| serde_json::from_str(raw.get()).ok());
                return Ok(Batch {
                    events: events.into_iter().map(InputEvent::Json).collect(),
                    next_batch,
                });
            }
            if object.contains_key("type") || object.contains_key("content") {
                let event = RawValue::from_string(trimmed.to_owned())
                    .map_err(|_| InputError::UnrecognisedObject)?;
                return Ok(Batch {
                    events: vec![InputEvent::Json(event)],
                    next_batch: None,
                });
            }
            return Err(InputError::UnrecognisedObject);
        }
    }
    let events = trimmed
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| match RawValue::from_string(line.to_owned()) {
            Ok(raw) => InputEvent::Json(raw),
            Err(error) => InputEvent::NotJson {
                error: error.to_string(),
            },
        })
        .collect();
    Ok(Batch {
        events,
        next_batch: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(batch: &Batch) -> Vec<String> {
        batch
            .events
            .iter()
            .map(|e| match e {
                InputEvent::Json(raw) => raw.get().to_owned(),
                InputEvent::NotJson { .. } => "(not JSON)".to_owned(),
            })
            .collect()
    }

    #[test]
    fn every_shape_of_input() {
        let array = split(r#"[{"type":"a"},{"type":"b"}]"#).unwrap();
        assert_eq!(texts(&array), [r#"{"type":"a"}"#, r#"{"type":"b"}"#]);
        let sync = split(r#"{"next_batch":"s1","to_device":{"events":[{"type":"a"}]},"rooms":{}}"#)
            .unwrap();
        assert_eq!(texts(&sync), [r#"{"type":"a"}"#]);
        assert_eq!(sync.next_batch.as_deref(), Some("s1"));
        let single = split(r#"{"type":"a","content":{}}"#).unwrap();
        assert_eq!(texts(&single), [r#"{"type":"a","content":{}}"#]);
        let lines = split("{\"type\":\"a\"}\n\nnot json\n").unwrap();
        assert_eq!(texts(&lines), [r#"{"type":"a"}"#, "(not JSON)"]);
    }

    #[test]
    fn empty_and_unrecognised_inputs_are_errors() {
        assert_eq!(split(" \n").unwrap_err(), InputError::Empty);
        assert_eq!(
            split(r#"{"rooms":{}}"#).unwrap_err(),
            InputError::UnrecognisedObject
        );
        assert_eq!(
            split(r#"{"to_device":{"events":7}}"#).unwrap_err(),
            InputError::UnrecognisedObject
        );
    }
}
