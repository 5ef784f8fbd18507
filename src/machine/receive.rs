//! The receive path: one event or one `/sync` batch, from raw JSON to outcomes. Envelopes are
//! parsed ahead in chunks (one replay query per chunk), each Olm message is decrypted with the
//! sender's sessions and checked, and everything the batch changed becomes one store
//! transaction; failures are then handed to the reporting policy and published.

use std::collections::HashMap;

use to_device_analytics::json::to_compact_string;
use vodozemac::olm::{OlmMessage, Session, SessionPickle};
use vodozemac::Curve25519PublicKey;

use super::outbox::{pending_result_json, result_id};
use super::recovery::{remember_recovery_device, SenderIdentity};
use super::reporting::UNDECIDED;
use super::state::stored_account;
use super::{
    corrupted, now_millis, BatchChanges, DecryptedToDeviceEvent, FailedToDeviceEvent, MachineState,
    OlmMachine, ToDeviceOutcome,
};
use crate::analytics::policy::FailureKey;
use crate::analytics::FailureReason;
use crate::error::{DecryptionError, StoreError};
use crate::olm::envelope::{parse_event, EnvelopeFacts, MessageHash, OlmEnvelope, ParsedEvent};
use crate::olm::plaintext::{check_plaintext, PlaintextContext};
use crate::olm::sessions::{decrypt_message, prune_least_recently_used, SessionEntry};
use crate::reporting::{FailureDiagnostics, ToDeviceDecryptionFailure};
use crate::store::{Changes, StoredResult, StoredSession};

/// How many events of a batch are parsed ahead of decryption (and checked against the store's
/// replay hashes in one query).
const PARSE_CHUNK: usize = 256;

/// Where one event sits: its index in the batch, the batch's time, and whether it must be
/// encrypted (the single-event API) or may be a plain to-device event (a `/sync` batch).
#[derive(Clone, Copy)]
struct EventPosition {
    index: usize,
    now: u64,
    require_encrypted: bool,
}

impl OlmMachine {
    /// Decrypts one `m.room.encrypted` to-device event (raw JSON).
    ///
    /// On failure the typed error names the reason, and one item is published on the failure
    /// stream. An unencrypted event has nothing to decrypt and fails with `UnsupportedAlgorithm`;
    /// use [`receive_to_device_events`](Self::receive_to_device_events) for `/sync` batches, which
    /// pass plain events through.
    pub async fn decrypt_to_device_event(
        &self,
        raw_event: &str,
    ) -> Result<DecryptedToDeviceEvent, DecryptionError> {
        let mut outcomes = self.receive_batch(&[raw_event], None, true).await?;
        match outcomes.pop() {
            Some(ToDeviceOutcome::Decrypted(event)) => Ok(event),
            Some(ToDeviceOutcome::Failed(failed)) => Err(failed.error),
            Some(ToDeviceOutcome::Plaintext(_)) | None => {
                unreachable!(
                    "exactly one outcome, and plain events fail when encryption is required"
                )
            }
        }
    }

    /// Decrypts the to-device events of one `/sync` response (raw JSON each), in order.
    ///
    /// Returns one outcome per event. Everything the batch changed — ratchets, new sessions, used
    /// one-time keys, message hashes — is committed in one store transaction before this returns,
    /// then one failure item per failed event is published. If the store fails, nothing is
    /// committed, one `Store` failure is published, and the app should retry the whole batch.
    pub async fn receive_to_device_events<S: AsRef<str>>(
        &self,
        raw_events: &[S],
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        self.receive_batch(raw_events, None, false).await
    }

    /// Like [`receive_to_device_events`](Self::receive_to_device_events), and also commits the
    /// `/sync` response's `next_batch` token with the batch, so that an app that restarts resumes
    /// exactly from the committed point ([`sync_token`](Self::sync_token)).
    pub async fn receive_sync<S: AsRef<str>>(
        &self,
        raw_events: &[S],
        next_batch: Option<&str>,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        self.receive_batch(raw_events, next_batch, false).await
    }

    async fn receive_batch<S: AsRef<str>>(
        &self,
        raw_events: &[S],
        next_batch: Option<&str>,
        require_encrypted: bool,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        let mut state = self.state.lock().await;
        let result = self
            .process_batch(&mut state, raw_events, next_batch, require_encrypted)
            .await;
        let store_failure = result.as_ref().err().map(|error| {
            // The cache (policy state included) is ahead of the store (`begin_write` marked it
            // stale): revert it now so that the retried batch is judged afresh, then count the
            // Store failure itself.
            state.policy_dirty = true;
            let key = FailureKey {
                reason: FailureReason::Store,
                sender: None,
                sender_key: None,
                already_seen: false,
            };
            (error.to_string(), key)
        });
        let store_decision = match store_failure {
            Some((error, key)) => {
                if let Err(reload_error) = self.reload(&mut state).await {
                    tracing::warn!(target: super::LOG_TARGET, %reload_error, "cannot reload the store after a failed commit");
                }
                let policy = state.policy;
                let decision = state.policy_state.decide(&policy, &key, now_millis());
                Some((error, decision))
            }
            None => None,
        };
        drop(state);
        match result {
            Ok(outcomes) => {
                for (index, outcome) in outcomes.iter().enumerate() {
                    if let ToDeviceOutcome::Failed(failed) = outcome {
                        self.publish_failure(index, failed);
                    }
                }
                Ok(outcomes)
            }
            Err(error) => {
                let (message, decision) = store_decision.expect("set for every error");
                self.reporter.publish(ToDeviceDecryptionFailure::new(
                    FailureReason::Store,
                    FailureDiagnostics {
                        error: message,
                        ..FailureDiagnostics::default()
                    },
                    decision,
                ));
                Err(error)
            }
        }
    }

    async fn process_batch<S: AsRef<str>>(
        &self,
        state: &mut MachineState,
        raw_events: &[S],
        next_batch: Option<&str>,
        require_encrypted: bool,
    ) -> Result<Vec<ToDeviceOutcome>, StoreError> {
        let _lock = self.begin_write(state).await?;
        let mut batch = BatchChanges {
            batch_number: Some(self.store.last_batch_number().await? + 1),
            sync_token: next_batch.map(str::to_owned),
            ..BatchChanges::default()
        };
        let mut outcomes = Vec::with_capacity(raw_events.len());
        let now = now_millis();
        // Envelopes first, so that the store answers the replay check once per chunk of events;
        // chunks bound the memory the parsed envelopes take on a large batch.
        for (chunk_number, chunk) in raw_events.chunks(PARSE_CHUNK).enumerate() {
            let parsed: Vec<_> = chunk
                .iter()
                .map(|raw| {
                    let mut facts = EnvelopeFacts::default();
                    let parsed = parse_event(raw.as_ref(), &self.curve25519_base64, &mut facts);
                    (parsed, facts)
                })
                .collect();
            let hashes: Vec<MessageHash> = parsed
                .iter()
                .filter_map(|(parsed, _)| match parsed {
                    Ok(ParsedEvent::Olm(envelope)) => Some(envelope.message_hash),
                    _ => None,
                })
                .collect();
            batch.stored_hashes = self.store.known_message_hashes(&hashes).await?;
            // Hashes from before replay keys: a pre-key message received then could decrypt
            // again (on a fallback key, once its session was pruned), so it is looked up now; any
            // other such replay fails to decrypt and is looked up then (`legacy_replay`).
            let legacy = if self.store.has_legacy_message_hashes() {
                self.legacy_pre_key_replays(&parsed).await?
            } else {
                HashMap::new()
            };
            batch.stored_hashes.extend(legacy.keys().copied());
            batch.stored_pending = if batch.stored_hashes.is_empty() {
                HashMap::new()
            } else {
                // A result decrypted before replay keys is pending under its old id.
                let lookup_id = |key: &MessageHash| result_id(legacy.get(key).unwrap_or(key));
                let ids: Vec<String> = batch.stored_hashes.iter().map(lookup_id).collect();
                let mut found = self.store.pending_results(&ids).await?;
                batch
                    .stored_hashes
                    .iter()
                    .filter_map(|key| {
                        found
                            .remove(&lookup_id(key))
                            .map(|result| (result_id(key), result))
                    })
                    .collect()
            };
            for (offset, (raw, (parsed, facts))) in chunk.iter().zip(parsed).enumerate() {
                let position = EventPosition {
                    index: chunk_number * PARSE_CHUNK + offset,
                    now,
                    require_encrypted,
                };
                let outcome = self
                    .process_event(state, &mut batch, raw.as_ref(), parsed, facts, position)
                    .await;
                match outcome {
                    Ok(outcome) => outcomes.push(outcome),
                    // `begin_write` left the cache marked stale: the next call reloads it.
                    Err(error) => return Err(error),
                }
            }
        }
        self.apply_reporting_policy(state, &mut batch, &mut outcomes, raw_events, now)
            .await?;
        self.schedule_recovery(state, &mut batch, &outcomes, now)
            .await?;
        let changes = self.collect_changes(state, batch)?;
        #[cfg(feature = "testing")]
        crate::fail_point::reached(crate::fail_point::Phase::Decrypted);
        self.commit(state, changes).await?;
        #[cfg(feature = "testing")]
        crate::fail_point::reached_at_generation(
            crate::fail_point::Phase::Committed,
            state.generation,
        );
        Ok(outcomes)
    }

    /// Decrypts one event. `Err` only for store failures, which abort the batch.
    async fn process_event(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        raw: &str,
        parsed: Result<ParsedEvent, DecryptionError>,
        mut facts: EnvelopeFacts,
        position: EventPosition,
    ) -> Result<ToDeviceOutcome, StoreError> {
        let result = self
            .decrypt_event(state, batch, parsed, position, &mut facts)
            .await;
        Ok(match result {
            Ok(Some(event)) => ToDeviceOutcome::Decrypted(event),
            Ok(None) => match serde_json::from_str(raw) {
                Ok(event) => ToDeviceOutcome::Plaintext(event),
                Err(error) => ToDeviceOutcome::Failed(FailedToDeviceEvent {
                    error: DecryptionError::MalformedEvent(error.to_string()),
                    facts,
                    analytics: UNDECIDED,
                    analytics_id: None,
                }),
            },
            Err(DecryptionError::Store(error)) => return Err(error),
            Err(error) => ToDeviceOutcome::Failed(FailedToDeviceEvent {
                error,
                facts,
                analytics: UNDECIDED,
                analytics_id: None,
            }),
        })
    }

    async fn decrypt_event(
        &self,
        state: &mut MachineState,
        batch: &mut BatchChanges,
        parsed: Result<ParsedEvent, DecryptionError>,
        event: EventPosition,
        facts: &mut EnvelopeFacts,
    ) -> Result<Option<DecryptedToDeviceEvent>, DecryptionError> {
        let EventPosition {
            index,
            now,
            require_encrypted,
        } = event;
        let envelope = match parsed? {
            ParsedEvent::Plain { event_type } if require_encrypted => {
                return Err(DecryptionError::UnsupportedAlgorithm(Some(format!(
                    "none: a plain {event_type} event"
                ))))
            }
            ParsedEvent::Plain { .. } => return Ok(None),
            ParsedEvent::Olm(envelope) => envelope,
        };
        // A message decrypted before is re-emitted while its result is pending (not yet
        // acknowledged), and a replay once it was acknowledged (or never accepted).
        if let Some(&position) = batch.decrypted_in_batch.get(&envelope.message_hash) {
            let mut event: DecryptedToDeviceEvent =
                serde_json::from_str(&batch.pending_results[position].json)
                    .map_err(corrupted("decrypted result"))?;
            event.re_emitted = true;
            return Ok(Some(event));
        }
        if batch.seen_hashes.contains(&envelope.message_hash)
            || batch.stored_hashes.contains(&envelope.message_hash)
        {
            if let Some(stored) = batch.stored_pending.get(&result_id(&envelope.message_hash)) {
                let mut event: DecryptedToDeviceEvent =
                    serde_json::from_str(&stored.json).map_err(corrupted("decrypted result"))?;
                event.re_emitted = true;
                return Ok(Some(event));
            }
            return Err(DecryptionError::ReplayedMessage {
                sender_key: envelope.sender_key.to_base64(),
            });
        }

        let sender_key_bytes = envelope.sender_key.to_bytes();
        self.ensure_sessions_loaded(state, &envelope.sender_key)
            .await?;
        let MachineState {
            account,
            sessions,
            devices,
            recovery_devices,
            verified_device_keys,
            ..
        } = state;
        let sessions = sessions.entry(sender_key_bytes).or_default();
        let decrypted = decrypt_message(
            account,
            sessions,
            &envelope.sender_key,
            &envelope.message,
            now,
        );
        let (plaintext, decrypted) = match decrypted {
            Ok(decrypted) => decrypted,
            // A message decrypted before replay keys fails to decrypt when it is replayed (its
            // message key is used up): only now is its old hash worth computing.
            Err(error) if self.store.has_legacy_message_hashes() => {
                return match self.legacy_replay(&envelope).await? {
                    Some(event) => Ok(Some(event)),
                    None => Err(error),
                };
            }
            Err(error) => return Err(error),
        };

        // From here on the message decrypted: its ratchet step, new session, used one-time key
        // and hash are committed whatever the plaintext checks say, so that a re-delivery is a
        // replay rather than a false "wedged".
        batch.dirty_sender_keys.insert(sender_key_bytes);
        batch.account_changed |= decrypted.created_session;
        if decrypted.created_session {
            let sender_key = envelope.sender_key.to_base64();
            for session_id in prune_least_recently_used(sessions) {
                batch
                    .removed_sessions
                    .push((sender_key.clone(), session_id));
            }
        }
        batch.seen_hashes.insert(envelope.message_hash);
        batch.message_hashes.push(envelope.message_hash);

        let context = PlaintextContext {
            our_user_id: &self.user_id,
            our_ed25519: &self.ed25519_base64,
            envelope_sender: &envelope.sender,
            sender_key: &envelope.sender_key,
            known_devices: devices,
        };
        let accepted = match check_plaintext(&plaintext, &context, verified_device_keys) {
            Ok(accepted) => accepted,
            Err(error) => {
                facts.decrypted_type = plaintext_type(&plaintext);
                return Err(error);
            }
        };
        if let (Some(device_keys), Some(device_id)) = (
            accepted.unknown_sender_device_keys,
            accepted.sender_device_id.as_deref(),
        ) {
            let sender = SenderIdentity {
                user_id: &envelope.sender,
                device_id,
                curve25519: &envelope.sender_key,
                ed25519: &accepted.sender_ed25519,
            };
            remember_recovery_device(
                recovery_devices,
                batch,
                device_keys,
                accepted.unknown_sender_device,
                &sender,
            );
        }
        let accepted_raw_content = accepted.raw_content;
        let event = DecryptedToDeviceEvent {
            id: result_id(&envelope.message_hash),
            re_emitted: false,
            event_type: accepted.event_type,
            content: accepted.content,
            sender: envelope.sender,
            sender_curve25519_key: envelope.sender_key.to_base64(),
            sender_ed25519_key: accepted.sender_ed25519,
            sender_device_id: accepted.sender_device_id,
            sender_device_verified: accepted.sender_device_verified,
        };
        batch
            .decrypted_in_batch
            .insert(envelope.message_hash, batch.pending_results.len());
        batch.pending_results.push(StoredResult {
            id: event.id.clone(),
            batch: batch.batch_number.unwrap_or_default(),
            index: index as u64,
            json: pending_result_json(&event, accepted_raw_content),
        });
        Ok(Some(event))
    }

    /// The pre-key messages among `parsed` that the store saw before replay keys (by their
    /// whole-message hash), as replay key → old hash.
    async fn legacy_pre_key_replays(
        &self,
        parsed: &[(Result<ParsedEvent, DecryptionError>, EnvelopeFacts)],
    ) -> Result<HashMap<MessageHash, MessageHash>, StoreError> {
        let old_hashes: HashMap<MessageHash, MessageHash> = parsed
            .iter()
            .filter_map(|(parsed, _)| match parsed {
                Ok(ParsedEvent::Olm(envelope))
                    if matches!(envelope.message, OlmMessage::PreKey(_)) =>
                {
                    Some((envelope.legacy_hash(), envelope.message_hash))
                }
                _ => None,
            })
            .collect();
        if old_hashes.is_empty() {
            return Ok(HashMap::new());
        }
        let query: Vec<MessageHash> = old_hashes.keys().copied().collect();
        let known = self.store.known_legacy_message_hashes(&query).await?;
        Ok(old_hashes
            .into_iter()
            .filter(|(old, _)| known.contains(old))
            .map(|(old, key)| (key, old))
            .collect())
    }

    /// A message that failed to decrypt, looked up by its whole-message hash in a store from
    /// before replay keys: its pending result again (re-emitted) if it has one, a
    /// `ReplayedMessage` if it was decrypted then, `None` if it never was.
    async fn legacy_replay(
        &self,
        envelope: &OlmEnvelope,
    ) -> Result<Option<DecryptedToDeviceEvent>, DecryptionError> {
        let old = envelope.legacy_hash();
        if !self
            .store
            .known_legacy_message_hashes(&[old])
            .await?
            .contains(&old)
        {
            return Ok(None);
        }
        let id = result_id(&old);
        match self
            .store
            .pending_results(std::slice::from_ref(&id))
            .await?
            .remove(&id)
        {
            Some(stored) => {
                let mut event: DecryptedToDeviceEvent =
                    serde_json::from_str(&stored.json).map_err(corrupted("decrypted result"))?;
                event.re_emitted = true;
                Ok(Some(event))
            }
            None => Err(DecryptionError::ReplayedMessage {
                sender_key: envelope.sender_key.to_base64(),
            }),
        }
    }

    pub(super) async fn ensure_sessions_loaded(
        &self,
        state: &mut MachineState,
        sender_key: &Curve25519PublicKey,
    ) -> Result<(), StoreError> {
        if state.sessions.contains_key(sender_key.as_bytes()) {
            return Ok(());
        }
        let stored = self.store.load_sessions(&sender_key.to_base64()).await?;
        let mut entries = Vec::with_capacity(stored.len());
        for session in stored {
            let pickle: SessionPickle =
                serde_json::from_str(&session.pickle).map_err(corrupted("session pickle"))?;
            entries.push(SessionEntry::new(
                Session::from_pickle(pickle),
                session.last_used,
                false,
            ));
        }
        state.sessions.insert(sender_key.to_bytes(), entries);
        Ok(())
    }

    pub(super) fn collect_changes(
        &self,
        state: &mut MachineState,
        batch: BatchChanges,
    ) -> Result<Changes, StoreError> {
        let mut changes = Changes {
            message_hashes: batch.message_hashes,
            claimed_one_time_keys: batch.claimed_one_time_keys,
            failure_marks: batch.failure_marks,
            outgoing_requests: batch.outgoing_requests,
            sent_requests: batch.sent_requests,
            recovery_attempts: batch.recovery_attempts,
            pending_results: batch.pending_results,
            removed_sessions: batch.removed_sessions,
            recovery_devices: batch.recovery_devices,
            sync_token: batch.sync_token,
            batch_number: batch.batch_number,
            analytics_claim: (!batch.analytics.is_empty())
                .then(|| self.analytics_claim(now_millis())),
            analytics: batch.analytics,
            ..Changes::default()
        };
        if batch.policy_changed || state.policy_dirty {
            changes.policy_state = Some(state.policy_state.to_json());
            state.policy_dirty = false;
        }
        if batch.account_changed {
            changes.account = Some(stored_account(
                &state.account,
                &self.user_id,
                &self.device_id,
                state.device_keys_published,
            )?);
        }
        for sender_key in batch.dirty_sender_keys {
            let Some(entries) = state.sessions.get_mut(&sender_key) else {
                continue;
            };
            let sender_key = Curve25519PublicKey::from_bytes(sender_key).to_base64();
            for entry in entries.iter_mut().filter(|e| e.dirty) {
                entry.dirty = false;
                changes.sessions.push(StoredSession {
                    sender_key: sender_key.clone(),
                    session_id: entry.session_id.clone(),
                    pickle: to_compact_string(&entry.session.pickle())
                        .map_err(corrupted("session pickle"))?,
                    last_used: entry.last_used,
                });
            }
        }
        Ok(changes)
    }
}

/// The `type` of a decrypted plaintext that failed its checks, if it has a string one: only on the
/// failure path, for the failure's diagnostics.
fn plaintext_type(plaintext: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        event_type: Option<String>,
    }
    serde_json::from_slice::<TypeOnly>(plaintext)
        .ok()
        .and_then(|plaintext| plaintext.event_type)
}
