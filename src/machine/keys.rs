//! Our keys and other devices' keys: the signed device keys, the `/keys/upload` body and
//! one-time key bookkeeping, and `/keys/query` responses.

use serde_json::Value;

use super::{KeysQueryOutcome, OlmMachine};
use crate::error::{KeysError, StoreError};
use crate::olm::account::{keys_upload_body, one_time_key_target, signed_device_keys};
use crate::olm::device_keys::parse_keys_query_response;
use crate::store::{Changes, StoredDevice};

impl OlmMachine {
    /// Our signed device keys, as sent in `sender_device_keys`.
    pub async fn device_keys(&self) -> Value {
        let state = self.state.lock().await;
        signed_device_keys(&state.account, &self.user_id, &self.device_id)
    }

    /// The `/keys/upload` body with every unpublished key (device keys until published, one-time
    /// keys, fallback key), or `None` when there is nothing to upload.
    pub async fn keys_for_upload(&self) -> Option<Value> {
        let state = self.state.lock().await;
        let body = keys_upload_body(
            &state.account,
            &self.user_id,
            &self.device_id,
            !state.device_keys_published,
        );
        body.as_object()
            .is_some_and(|o| !o.is_empty())
            .then_some(body)
    }

    /// Marks every key of the last [`keys_for_upload`](Self::keys_for_upload) as published, after
    /// the server accepted the upload.
    pub async fn mark_keys_as_published(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        state.account.mark_keys_as_published();
        state.device_keys_published = true;
        self.save_account(&mut state).await
    }

    /// Generates `count` new one-time keys (capped so that no unpublished key is evicted), and a
    /// fallback key if there is no unpublished one. Returns how many one-time keys were made.
    pub async fn generate_one_time_keys(&self, count: usize) -> Result<usize, StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let room = state
            .account
            .max_number_of_one_time_keys()
            .saturating_sub(state.account.one_time_keys().len());
        let count = count.min(room);
        state.account.generate_one_time_keys(count);
        if state.account.fallback_key().is_empty() && !state.device_keys_published {
            state.account.generate_fallback_key();
        }
        self.save_account(&mut state).await?;
        Ok(count)
    }

    /// Tops our one-time keys up from the server's count (`/sync`
    /// `device_one_time_keys_count.signed_curve25519`) to half of what the account can hold, and
    /// rotates the fallback key once the server says it was used. Returns how many keys were
    /// generated; upload them with [`keys_for_upload`](Self::keys_for_upload).
    pub async fn receive_one_time_key_count(
        &self,
        server_count: u64,
        fallback_key_unused: bool,
    ) -> Result<usize, StoreError> {
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let target = one_time_key_target(&state.account);
        let published = usize::try_from(server_count).unwrap_or(usize::MAX);
        let unpublished = state.account.one_time_keys().len();
        let missing = target.saturating_sub(published.saturating_add(unpublished));
        state.account.generate_one_time_keys(missing);
        if !fallback_key_unused && state.account.fallback_key().is_empty() {
            state.account.generate_fallback_key();
        }
        if missing > 0 || !fallback_key_unused {
            self.save_account(&mut state).await?;
        } else {
            // Nothing changed: an empty commit writes nothing and marks the cache current again
            // (otherwise the next batch would reload every cached session).
            self.commit(&mut state, Changes::default()).await?;
        }
        Ok(missing)
    }

    /// Learns other devices' keys from a `/keys/query` response body. Devices with an invalid
    /// signature, or listed under another user or device id, are rejected and reported.
    pub async fn receive_keys_query_response(
        &self,
        body: &Value,
    ) -> Result<KeysQueryOutcome, KeysError> {
        let parsed = parse_keys_query_response(body).ok_or_else(|| KeysError::InvalidBody {
            what: "/keys/query response",
            detail: "expected an object with a `device_keys` object".to_owned(),
        })?;
        let mut state = self.state.lock().await;
        let _lock = self.begin_write(&mut state).await?;
        let changes = Changes {
            devices: parsed
                .valid
                .iter()
                .map(|device| StoredDevice {
                    user_id: device.user_id.clone(),
                    device_id: device.device_id.clone(),
                    json: device.signed_json.to_string(),
                })
                .collect(),
            ..Changes::default()
        };
        self.commit(&mut state, changes).await?;
        let stored = parsed.valid.len();
        for device in parsed.valid {
            state.devices.insert(device);
        }
        Ok(KeysQueryOutcome {
            stored,
            rejected: parsed
                .rejected
                .into_iter()
                .map(|(user, device, error)| format!("{user}/{device}: {error}"))
                .collect(),
        })
    }
}
