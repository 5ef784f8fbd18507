//! Olm sessions with one sender key and the spec's rules for picking the one that decrypts.

use vodozemac::olm::{
    Account, OlmMessage, Session, SessionConfig, SessionCreationError, SessionKeys,
};
use vodozemac::Curve25519PublicKey;

use crate::error::DecryptionError;

/// One Olm session and its bookkeeping.
pub struct SessionEntry {
    /// The vodozemac session.
    pub session: Session,
    /// Cached `session.session_id()`.
    pub session_id: String,
    /// The keys the session id is the hash of, compared with every pre-key message's: equal keys
    /// are equal ids, without hashing and encoding an id per message.
    pub session_keys: SessionKeys,
    /// When the session last decrypted or encrypted (ms since the Unix epoch).
    pub last_used: u64,
    /// Whether the session changed since it was last stored.
    pub dirty: bool,
}

impl SessionEntry {
    /// Wraps a session that has just been created or loaded.
    pub fn new(session: Session, last_used: u64, dirty: bool) -> Self {
        Self {
            session_id: session.session_id(),
            session_keys: session.session_keys(),
            session,
            last_used,
            dirty,
        }
    }
}

impl std::fmt::Debug for SessionEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEntry")
            .field("session_id", &self.session_id)
            .field("last_used", &self.last_used)
            .field("dirty", &self.dirty)
            .finish()
    }
}

/// How many sessions are kept per sender key. The spec requires at least 4; beyond this the least
/// recently used are dropped, so that pre-key messages on our (never consumed) fallback key cannot
/// make one sender grow our state, and the cost of trying sessions, without bound.
pub const MAX_SESSIONS_PER_SENDER: usize = 50;

/// Drops the least recently used sessions beyond [`MAX_SESSIONS_PER_SENDER`]; returns their ids.
pub fn prune_least_recently_used(sessions: &mut Vec<SessionEntry>) -> Vec<String> {
    if sessions.len() <= MAX_SESSIONS_PER_SENDER {
        return Vec::new();
    }
    sessions.sort_by_key(|entry| std::cmp::Reverse(entry.last_used));
    sessions
        .split_off(MAX_SESSIONS_PER_SENDER)
        .into_iter()
        .map(|entry| entry.session_id)
        .collect()
}

/// What a successful decryption changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decrypted {
    /// Whether a new inbound session was created (and a one-time key consumed).
    pub created_session: bool,
}

/// Decrypts `message` from `sender_key` with the spec's session rules.
///
/// - Pre-key message: the session whose id matches decrypts it (failure: `SessionWedged`);
///   with no such session, a new inbound session is created from our account (unknown one-time
///   key: `UnknownOneTimeKey`; any other error: `SessionCreation`).
/// - Normal message: existing sessions only, most recently used first (none: `MissingSession`;
///   none decrypts: `SessionWedged`).
///
/// A failed attempt leaves every session unchanged (vodozemac checks the MAC before it advances a
/// ratchet), and our account only loses the one-time key when session creation succeeds.
pub fn decrypt_message(
    account: &mut Account,
    sessions: &mut Vec<SessionEntry>,
    sender_key: &Curve25519PublicKey,
    message: &OlmMessage,
    now: u64,
) -> Result<(Vec<u8>, Decrypted), DecryptionError> {
    let wedged = |tried: usize, error: String| DecryptionError::SessionWedged {
        sender_key: sender_key.to_base64(),
        sessions_tried: tried,
        last_error: error,
    };
    match message {
        OlmMessage::PreKey(pre_key) => {
            let session_keys = pre_key.session_keys();
            if let Some(entry) = sessions.iter_mut().find(|e| e.session_keys == session_keys) {
                let plaintext = entry
                    .session
                    .decrypt(message)
                    .map_err(|e| wedged(1, e.to_string()))?;
                entry.last_used = now;
                entry.dirty = true;
                return Ok((
                    plaintext,
                    Decrypted {
                        created_session: false,
                    },
                ));
            }
            let created = account
                .create_inbound_session(SessionConfig::version_1(), *sender_key, pre_key)
                .map_err(|error| match error {
                    SessionCreationError::MissingOneTimeKey(key) => {
                        DecryptionError::UnknownOneTimeKey {
                            sender_key: sender_key.to_base64(),
                            one_time_key: key.to_base64(),
                        }
                    }
                    other => DecryptionError::SessionCreation {
                        sender_key: sender_key.to_base64(),
                        error: other.to_string(),
                    },
                })?;
            sessions.push(SessionEntry::new(created.session, now, true));
            Ok((
                created.plaintext,
                Decrypted {
                    created_session: true,
                },
            ))
        }
        OlmMessage::Normal(_) => {
            if sessions.is_empty() {
                return Err(DecryptionError::MissingSession {
                    sender_key: sender_key.to_base64(),
                });
            }
            let mut order: Vec<usize> = (0..sessions.len()).collect();
            order.sort_unstable_by_key(|&i| std::cmp::Reverse(sessions[i].last_used));
            let mut last_error = String::new();
            for i in order {
                match sessions[i].session.decrypt(message) {
                    Ok(plaintext) => {
                        sessions[i].last_used = now;
                        sessions[i].dirty = true;
                        return Ok((
                            plaintext,
                            Decrypted {
                                created_session: false,
                            },
                        ));
                    }
                    Err(error) => last_error = error.to_string(),
                }
            }
            Err(wedged(sessions.len(), last_error))
        }
    }
}
