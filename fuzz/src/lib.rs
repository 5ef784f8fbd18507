//! Shared code of the fuzz targets and the seed generator: the recorded state of the machine that
//! the `decrypt` target decrypts with, and the structured mutator for non-JSON inputs.

use std::sync::Arc;

use serde_json::{json, Value};
use to_device_crypto::olm::envelope::MessageHash;
use to_device_crypto::store::{Changes, StoredAccount, StoredDevice, StoredSession};
use to_device_crypto::{CryptoStore, MemoryStore, OlmMachine};

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("state.json: `{key}` is not a string"))
}

/// Restores the recorded machine on a fresh memory store.
pub async fn open_recorded_machine(state: &Value) -> (OlmMachine, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let hashes = state["message_hashes"]
        .as_array()
        .expect("message_hashes")
        .iter()
        .map(|h| {
            let hex = h.as_str().expect("hex hash");
            let mut bytes = [0u8; 32];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
            }
            MessageHash(bytes)
        })
        .collect();
    let changes = Changes {
        account: Some(StoredAccount {
            user_id: str_of(state, "user_id").to_owned(),
            device_id: str_of(state, "device_id").to_owned(),
            pickle: str_of(state, "account_pickle").to_owned(),
            device_keys_published: true,
        }),
        sessions: state["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| StoredSession {
                sender_key: str_of(s, "sender_key").to_owned(),
                session_id: str_of(s, "session_id").to_owned(),
                pickle: str_of(s, "pickle").to_owned(),
                last_used: s["last_used"].as_u64().expect("last_used"),
            })
            .collect(),
        message_hashes: hashes,
        devices: state["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| StoredDevice {
                user_id: str_of(d, "user_id").to_owned(),
                device_id: str_of(d, "device_id").to_owned(),
                json: str_of(d, "json").to_owned(),
            })
            .collect(),
        ..Changes::default()
    };
    store.save_changes(changes).await.expect("memory store");
    let machine = OlmMachine::open(
        str_of(state, "user_id"),
        str_of(state, "device_id"),
        store.clone(),
    )
    .await
    .expect("the recorded account opens (regenerate fuzz/seeds if the pickle format changed)");
    (machine, store)
}

/// Reads bytes off the front of the fuzz input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((first, rest)) => {
                self.0 = rest;
                *first
            }
            None => 0,
        }
    }
    fn index(&mut self, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        (usize::from(self.byte()) << 8 | usize::from(self.byte())) % len
    }
    fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

fn ciphertext_entry(event: &mut Value) -> Option<&mut Value> {
    event
        .pointer_mut("/content/ciphertext")?
        .as_object_mut()?
        .values_mut()
        .next()
        .filter(|entry| entry.is_object())
}

/// The JSON pointers a structured mutation may delete or retype.
const FIELDS: [&str; 9] = [
    "/type",
    "/sender",
    "/content",
    "/content/algorithm",
    "/content/sender_key",
    "/content/ciphertext",
    "", // the ciphertext entry itself
    "#type",
    "#body",
];

fn hostile_value(selector: u8) -> Value {
    match selector % 10 {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1.5),
        4 => json!(u64::MAX),
        5 => json!(""),
        6 => json!([]),
        7 => json!({}),
        8 => json!("\u{0}\u{ffff}"),
        _ => json!([[[[[[[[{"a": []}]]]]]]]]),
    }
}

fn field_slot<'a>(event: &'a mut Value, field: &str) -> Option<(&'a mut Value, String)> {
    match field {
        "" => {
            let map = event.pointer_mut("/content/ciphertext")?.as_object_mut()?;
            let key = map.keys().next()?.clone();
            Some((event.pointer_mut("/content/ciphertext")?, key))
        }
        "#type" | "#body" => Some((ciphertext_entry(event)?, field[1..].to_owned())),
        pointer => {
            let (parent, key) = pointer.rsplit_once('/')?;
            Some((event.pointer_mut(parent)?, key.to_owned()))
        }
    }
}

/// Turns a non-JSON fuzz input into a hostile variant of one real event: the first bytes pick the
/// template, the following pairs pick mutations (byte flips in the decoded body, truncation,
/// field deletions, type changes, swapped sender keys and senders, re-addressing, raw Olm bytes).
pub fn mutate(templates: &[Value], data: &[u8]) -> String {
    if templates.is_empty() {
        return String::from_utf8_lossy(data).into_owned();
    }
    let mut input = Bytes(data);
    let mut event = templates[input.index(templates.len())].clone();
    for _ in 0..4 {
        if input.0.is_empty() {
            break;
        }
        let op = input.byte();
        match op % 10 {
            0 | 1 => {
                // Flip bits in the decoded body.
                let at = input.index(usize::MAX);
                let mask = input.byte() | 1;
                if let Some(entry) = ciphertext_entry(&mut event) {
                    if let Some(mut body) = entry["body"]
                        .as_str()
                        .and_then(|b| vodozemac::base64_decode(b).ok())
                    {
                        if !body.is_empty() {
                            let i = at % body.len();
                            body[i] ^= mask;
                        }
                        entry["body"] = json!(vodozemac::base64_encode(body));
                    }
                }
            }
            2 => {
                // Truncate the decoded body.
                let keep = input.index(usize::MAX);
                if let Some(entry) = ciphertext_entry(&mut event) {
                    if let Some(mut body) = entry["body"]
                        .as_str()
                        .and_then(|b| vodozemac::base64_decode(b).ok())
                    {
                        body.truncate(keep % (body.len() + 1));
                        entry["body"] = json!(vodozemac::base64_encode(body));
                    }
                }
            }
            3 => {
                let field = FIELDS[input.index(FIELDS.len())];
                if let Some((parent, key)) = field_slot(&mut event, field) {
                    if let Some(map) = parent.as_object_mut() {
                        map.remove(&key);
                    }
                }
            }
            4 => {
                let field = FIELDS[input.index(FIELDS.len())];
                let value = hostile_value(input.byte());
                if let Some((parent, key)) = field_slot(&mut event, field) {
                    if let Some(map) = parent.as_object_mut() {
                        map.insert(key, value);
                    }
                }
            }
            5 => {
                // Swap in the sender key (or sender) of another template.
                let other = &templates[input.index(templates.len())];
                let what = if input.byte() % 2 == 0 {
                    "/content/sender_key"
                } else {
                    "/sender"
                };
                if let (Some(slot), Some(value)) = (event.pointer_mut(what), other.pointer(what)) {
                    *slot = value.clone();
                }
            }
            6 => {
                // Take the ciphertext entry of another template (another key, session or type).
                let other = &templates[input.index(templates.len())];
                if let Some(ciphertext) = other.pointer("/content/ciphertext") {
                    if let Some(slot) = event.pointer_mut("/content/ciphertext") {
                        *slot = ciphertext.clone();
                    }
                }
            }
            7 => {
                let message_type = input.byte();
                if let Some(entry) = ciphertext_entry(&mut event) {
                    entry["type"] = json!(message_type % 3);
                }
            }
            8 => {
                // Raw Olm message bytes: the rest of the input becomes the body.
                let message_type = input.byte() % 2;
                let body = vodozemac::base64_encode(input.rest());
                if let Some(entry) = ciphertext_entry(&mut event) {
                    entry["type"] = json!(message_type);
                    entry["body"] = json!(body);
                }
            }
            _ => {
                // Add many recipients / a padding field.
                let count = input.byte();
                if let Some(map) = event
                    .pointer_mut("/content/ciphertext")
                    .and_then(Value::as_object_mut)
                {
                    for i in 0..count {
                        map.insert(format!("key{i}"), json!({"type": 0, "body": "AAAA"}));
                    }
                }
            }
        }
    }
    event.to_string()
}
