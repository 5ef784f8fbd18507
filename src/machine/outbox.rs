//! The outbox: decrypted results kept in the store until the app acknowledges them (at-least-once
//! delivery), their ids, and their stored form — the JSON of [`DecryptedToDeviceEvent`], written
//! directly from the plaintext's own `content` text instead of serializing the parsed content again.

use serde_json::value::RawValue;
use to_device_analytics::json::write_compact;

use super::{corrupted, DecryptedToDeviceEvent, OlmMachine, PendingDecryptedEvent};
use crate::error::StoreError;
use crate::olm::envelope::MessageHash;
use crate::store::Changes;

impl OlmMachine {
    /// The `next_batch` token committed with the last [`receive_sync`](Self::receive_sync).
    pub async fn sync_token(&self) -> Result<Option<String>, StoreError> {
        self.store.sync_token().await
    }

    /// Every decrypted result not yet acknowledged, oldest first: after a crash, hand these to the
    /// app again (delivery is at least once).
    pub async fn pending_decrypted_events(&self) -> Result<Vec<PendingDecryptedEvent>, StoreError> {
        self.store
            .load_pending_results()
            .await?
            .into_iter()
            .map(|stored| {
                let mut event: DecryptedToDeviceEvent =
                    serde_json::from_str(&stored.json).map_err(corrupted("decrypted result"))?;
                event.re_emitted = true;
                Ok(PendingDecryptedEvent {
                    batch: stored.batch,
                    index: stored.index,
                    event,
                })
            })
            .collect()
    }

    /// Removes handled results from the outbox; a later re-delivery of their messages is then a
    /// `ReplayedMessage`.
    pub async fn acknowledge(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let changes = Changes {
            acknowledged: ids.to_vec(),
            ..Changes::default()
        };
        self.commit(&mut state, changes).await
    }
}

/// The outbox id of a decrypted message.
pub(super) fn result_id(hash: &MessageHash) -> String {
    crate::encoding::to_hex(&hash.0[..16])
}

/// The JSON that `serde_json::to_string(event)` produces, with `content` copied from
/// `raw_content` (the text `event.content` was parsed from).
pub(super) fn pending_result_json(
    event: &DecryptedToDeviceEvent,
    raw_content: &RawValue,
) -> String {
    let mut out = Vec::with_capacity(raw_content.get().len() + 256);
    string_field(&mut out, "{\"id\":", &event.id);
    out.extend_from_slice(if event.re_emitted {
        b",\"re_emitted\":true"
    } else {
        b",\"re_emitted\":false"
    });
    string_field(&mut out, ",\"event_type\":", &event.event_type);
    out.extend_from_slice(b",\"content\":");
    out.extend_from_slice(raw_content.get().as_bytes());
    string_field(&mut out, ",\"sender\":", &event.sender);
    string_field(
        &mut out,
        ",\"sender_curve25519_key\":",
        &event.sender_curve25519_key,
    );
    string_field(
        &mut out,
        ",\"sender_ed25519_key\":",
        &event.sender_ed25519_key,
    );
    match &event.sender_device_id {
        Some(device_id) => string_field(&mut out, ",\"sender_device_id\":", device_id),
        None => out.extend_from_slice(b",\"sender_device_id\":null"),
    }
    out.extend_from_slice(if event.sender_device_verified {
        b",\"sender_device_verified\":true}"
    } else {
        b",\"sender_device_verified\":false}"
    });
    String::from_utf8(out).expect("built from UTF-8 pieces")
}

/// Appends `name` (the text before the value: separator, key and colon) and `value` as a JSON string.
fn string_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    // Writing a `&str` into a `Vec` cannot fail.
    write_compact(out, value).expect("a string serializes");
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        // Quotes, backslashes, control characters and non-ASCII: everything escaping must handle.
        proptest::string::string_regex("[a-z\"\\\\\u{0}-\u{1f}é😀:@!]{0,12}").unwrap()
    }

    proptest! {
        #[test]
        fn matches_what_serde_writes(
            id in text(), re_emitted: bool, event_type in text(), sender in text(),
            curve in text(), ed in text(), device_id in proptest::option::of(text()),
            verified: bool, content_text in text(),
            // Content as clients send it: any key order, spacing and escapes.
            spaced: bool,
        ) {
            let raw_content = if spaced {
                format!("{{ \"body\" : {} , \"n\" : [1, 2.5, null] }}", serde_json::to_string(&content_text).unwrap())
            } else {
                format!("{{\"n\":[1,2.5,null],\"body\":{}}}", serde_json::to_string(&content_text).unwrap())
            };
            let raw: Box<RawValue> = serde_json::from_str(&raw_content).unwrap();
            let event = DecryptedToDeviceEvent {
                id, re_emitted, event_type,
                content: serde_json::from_str(raw.get()).unwrap(),
                sender, sender_curve25519_key: curve, sender_ed25519_key: ed,
                sender_device_id: device_id, sender_device_verified: verified,
            };
            let written = pending_result_json(&event, &raw);
            let as_value: Value = serde_json::from_str(&written).unwrap();
            prop_assert_eq!(as_value, serde_json::to_value(&event).unwrap());
            let read_back: DecryptedToDeviceEvent = serde_json::from_str(&written).unwrap();
            prop_assert_eq!(read_back, event);
        }
    }
}
