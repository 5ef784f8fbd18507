//! Our keys and other devices' keys: the signed device keys, the `/keys/upload` body and
//! one-time key bookkeeping, and `/keys/query` responses.

use serde_json::Value;

use super::{KeysQueryOutcome, MachineState, OlmMachine, RefusedKeyChange};
use crate::error::{KeysError, StoreError};
use crate::olm::account::{keys_upload_body, one_time_key_target, signed_device_keys};
use crate::olm::device_keys::{parse_keys_query_response, DeviceKeys};
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
    ///
    /// A device we already know keeps its Ed25519 key: an entry that changes it is refused (the
    /// known keys stay), counted in [`KeysQueryOutcome::refused_key_changes`] and logged, as
    /// matrix-sdk-crypto does. Our own device counts as known, with our own keys. A Curve25519
    /// change under the same Ed25519 key is accepted, also as matrix-sdk-crypto does: the new
    /// object is self-signed by the unchanged Ed25519 key, so the device itself published it.
    /// A stored device replaces what a `sender_device_keys` taught about it.
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
        let mut accepted = Vec::with_capacity(parsed.valid.len());
        let mut refused_key_changes = Vec::new();
        for device in parsed.valid {
            match self.refused_key_change(&state, &device) {
                Some(refused) => refused_key_changes.push(refused),
                None => accepted.push(device),
            }
        }
        if !refused_key_changes.is_empty() {
            tracing::warn!(
                target: super::LOG_TARGET,
                refused = refused_key_changes.len(),
                "refused /keys/query entries that change a known device's Ed25519 key; the known keys stay in use"
            );
        }
        let changes = Changes {
            devices: accepted
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
        let stored = accepted.len();
        for device in accepted {
            state
                .recovery_devices
                .remove(&device.user_id, &device.device_id);
            state.devices.insert(device);
        }
        Ok(KeysQueryOutcome {
            stored,
            rejected: parsed
                .rejected
                .into_iter()
                .map(|(user, device, error)| format!("{user}/{device}: {error}"))
                .collect(),
            refused_key_changes,
        })
    }

    /// The rule for a validly self-signed `/keys/query` entry about a device we may know: refused
    /// when it changes the known Ed25519 key (matrix-sdk-crypto's `update_device` returns
    /// `SigningKeyChanged` and keeps the old device). Everything else, a Curve25519 change
    /// included, is allowed: the entry is signed by the device's unchanged Ed25519 key.
    fn refused_key_change(
        &self,
        state: &MachineState,
        received: &DeviceKeys,
    ) -> Option<RefusedKeyChange> {
        let known_ed25519 =
            if received.user_id == self.user_id && received.device_id == self.device_id {
                // Our own device: the server must not hand out other keys for it.
                self.identity_keys.ed25519
            } else {
                state
                    .devices
                    .by_id(&received.user_id, &received.device_id)?
                    .ed25519
            };
        (known_ed25519 != received.ed25519).then(|| RefusedKeyChange {
            user_id: received.user_id.clone(),
            device_id: received.device_id.clone(),
            known_ed25519: known_ed25519.to_base64(),
            received_ed25519: received.ed25519.to_base64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use vodozemac::olm::Account;

    use crate::olm::device_keys::signable_json;
    use crate::olm::device_keys::OLM_V1_ALGORITHM;
    use crate::OlmMachine;

    const ALICE: &str = "@alice:example.org";

    /// A `/keys/query` body listing ALICEPHONE with `curve25519_of`'s Curve25519 key and
    /// `signer`'s Ed25519 key, self-signed by `signer`.
    fn query(signer: &Account, curve25519_of: &Account) -> serde_json::Value {
        let mut keys = json!({
            "user_id": ALICE,
            "device_id": "ALICEPHONE",
            "algorithms": [OLM_V1_ALGORITHM],
            "keys": {
                "curve25519:ALICEPHONE": curve25519_of.curve25519_key().to_base64(),
                "ed25519:ALICEPHONE": signer.ed25519_key().to_base64(),
            },
        });
        let signature = signer.sign(signable_json(&keys)).to_base64();
        keys["signatures"] = json!({ALICE: {"ed25519:ALICEPHONE": signature}});
        json!({"device_keys": {ALICE: {"ALICEPHONE": keys}}})
    }

    /// The Curve25519 rule, as matrix-sdk-crypto's `update_device`: a new Curve25519 key under
    /// the known Ed25519 key (so signed by the device itself) replaces the old one; a new Ed25519
    /// key is refused whatever the Curve25519 key.
    #[tokio::test]
    async fn curve25519_may_change_under_the_known_ed25519_key_ed25519_may_not() {
        let bob = OlmMachine::in_memory("@bob:example.org", "BOBPHONE")
            .await
            .unwrap();
        let alice = Account::new();
        let new_curve = Account::new();
        let outcome = bob
            .receive_keys_query_response(&query(&alice, &alice))
            .await
            .unwrap();
        assert_eq!((outcome.stored, outcome.refused_key_changes.len()), (1, 0));

        let outcome = bob
            .receive_keys_query_response(&query(&alice, &new_curve))
            .await
            .unwrap();
        assert_eq!((outcome.stored, outcome.refused_key_changes.len()), (1, 0));
        {
            let state = bob.state.lock().await;
            assert!(state
                .devices
                .by_curve25519(ALICE, &alice.curve25519_key())
                .is_none());
            let device = state
                .devices
                .by_curve25519(ALICE, &new_curve.curve25519_key())
                .expect("found by the new key");
            assert_eq!(device.ed25519, alice.ed25519_key());
        }

        // Another Ed25519 key, even with the known Curve25519 key: refused, the known keys kept.
        let outcome = bob
            .receive_keys_query_response(&query(&Account::new(), &new_curve))
            .await
            .unwrap();
        assert_eq!((outcome.stored, outcome.refused_key_changes.len()), (0, 1));
        let state = bob.state.lock().await;
        let device = state.devices.by_id(ALICE, "ALICEPHONE").unwrap();
        assert_eq!(device.ed25519, alice.ed25519_key());
        assert_eq!(device.curve25519, new_curve.curve25519_key());
    }
}
