//! Encryption for another device: reusing or creating the outbound Olm session, and the
//! `m.room.encrypted` content with the plaintext fields the spec requires.

use serde_json::{json, Value};
use vodozemac::olm::{Session, SessionConfig};

use super::{now_millis, BatchChanges, MachineState, OlmMachine};
use crate::error::EncryptionError;
use crate::olm::account::signed_device_keys;
use crate::olm::device_keys::{DeviceKeys, PublishedKeys, OLM_V1_ALGORITHM};
use crate::olm::envelope::ENCRYPTED_EVENT_TYPE;
use crate::olm::sessions::SessionEntry;

impl OlmMachine {
    /// Encrypts one event per entry of `contents` for the device that published `recipient`,
    /// as `/sync`-shaped `m.room.encrypted` to-device events.
    ///
    /// Uses the most recently used session with that device, or creates one from the first of its
    /// one-time keys we never used before (fallback keys last). The plaintext carries our
    /// `sender_device_keys`. Everything is committed before the events are returned.
    pub async fn encrypt(
        &self,
        recipient: &PublishedKeys,
        event_type: &str,
        contents: &[Value],
    ) -> Result<Vec<Value>, EncryptionError> {
        if contents.iter().any(|c| !c.is_object()) {
            return Err(EncryptionError::ContentNotAnObject);
        }
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let device = &recipient.device;
        self.ensure_sessions_loaded(&mut state, &device.curve25519)
            .await?;
        let mut batch = BatchChanges::default();
        let has_session = state
            .sessions
            .get(device.curve25519.as_bytes())
            .is_some_and(|s| !s.is_empty());
        if !has_session {
            let session = self
                .create_outbound_session(&mut state, &mut batch, recipient)
                .await?;
            state
                .sessions
                .entry(device.curve25519.to_bytes())
                .or_default()
                .push(SessionEntry::new(session, now_millis(), true));
        }
        let our_device_keys = signed_device_keys(&state.account, &self.user_id, &self.device_id);
        let sessions = state
            .sessions
            .get_mut(device.curve25519.as_bytes())
            .expect("a session exists or was just created");
        let entry = sessions
            .iter_mut()
            .max_by_key(|e| e.last_used)
            .expect("a session exists or was just created");
        let mut events = Vec::with_capacity(contents.len());
        for content in contents {
            let encrypted = self.encrypted_content(
                &mut entry.session,
                device,
                event_type,
                content,
                &our_device_keys,
            )?;
            events.push(json!({
                "type": ENCRYPTED_EVENT_TYPE,
                "sender": self.user_id,
                "content": encrypted,
            }));
        }
        entry.last_used = now_millis();
        entry.dirty = true;
        batch.dirty_sender_keys.insert(device.curve25519.to_bytes());
        let changes = self.collect_changes(&mut state, batch)?;
        self.commit(&mut state, changes).await?;
        Ok(events)
    }

    /// The `m.room.encrypted` content of one Olm-encrypted event for `device`, with the plaintext
    /// fields the spec requires and our `sender_device_keys`.
    pub(super) fn encrypted_content(
        &self,
        session: &mut Session,
        device: &DeviceKeys,
        event_type: &str,
        content: &Value,
        our_device_keys: &Value,
    ) -> Result<Value, EncryptionError> {
        let plaintext = json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "recipient": device.user_id,
            "recipient_keys": {"ed25519": device.ed25519.to_base64()},
            "keys": {"ed25519": self.ed25519_base64},
            "sender_device_keys": our_device_keys,
        });
        let message = session
            .encrypt(plaintext.to_string())
            .map_err(|e| EncryptionError::Olm(e.to_string()))?;
        let (message_type, body) = message.to_parts();
        Ok(json!({
            "algorithm": OLM_V1_ALGORITHM,
            "sender_key": self.curve25519_base64,
            "ciphertext": {
                device.curve25519.to_base64(): {
                    "type": message_type,
                    "body": vodozemac::base64_encode(body),
                }
            }
        }))
    }

    async fn create_outbound_session(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        recipient: &PublishedKeys,
    ) -> Result<Session, EncryptionError> {
        let mut candidates: Vec<_> = recipient.one_time_keys.iter().collect();
        // Fallback keys only when no one-time key is left: they are shared by every sender.
        candidates.sort_by_key(|k| k.fallback);
        for key in candidates {
            let key_base64 = key.key.to_base64();
            if !key.fallback && self.store.is_one_time_key_claimed(&key_base64).await? {
                continue;
            }
            let session = state
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    recipient.device.curve25519,
                    key.key,
                )
                .map_err(|e| EncryptionError::Olm(e.to_string()))?;
            batch.claimed_one_time_keys.push(key_base64);
            return Ok(session);
        }
        Err(EncryptionError::NoOneTimeKey {
            user_id: recipient.device.user_id.clone(),
            device_id: recipient.device.device_id.clone(),
        })
    }
}
