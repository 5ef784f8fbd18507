//! Outgoing requests: what the machine needs the app to send to the homeserver, for apps with
//! their own HTTP stack.
//!
//! Each request has a stable id and stays listed by
//! [`OlmMachine::outgoing_requests`](crate::OlmMachine::outgoing_requests) until the app marks it
//! sent with [`OlmMachine::mark_request_as_sent`](crate::OlmMachine::mark_request_as_sent); requests
//! are persisted, so nothing is lost across restarts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One request to send.
///
/// Serializes as one JSON line, e.g.
/// `{"request_id":"…","kind":"keys_claim","body":{"one_time_keys":{"@alice:example.org":{"ALICEDEV":"signed_curve25519"}}}}`
/// or `{"request_id":"…","kind":"to_device","event_type":"m.room.encrypted","txn_id":"…","body":{"messages":{…}}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutgoingRequest {
    /// The id to pass to `mark_request_as_sent`.
    pub request_id: String,
    /// What to send.
    #[serde(flatten)]
    pub request: OutgoingRequestKind,
}

/// The Matrix request to send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutgoingRequestKind {
    /// `POST /_matrix/client/v3/keys/claim` with this body; feed the response back.
    KeysClaim {
        /// The request body.
        body: Value,
    },
    /// `PUT /_matrix/client/v3/sendToDevice/{event_type}/{txn_id}` with this body.
    ToDevice {
        /// The event type in the URL.
        event_type: String,
        /// The transaction id in the URL (stable across retries, so the server deduplicates).
        txn_id: String,
        /// The request body (`{"messages": {user: {device: content}}}`).
        body: Value,
    },
}

/// A new random id for a request or transaction.
pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 12];
    // An id collision only needs uniqueness within this device's pending requests; if the OS
    // generator fails, the time-based fallback is still unique enough.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..12]);
    }
    crate::encoding::to_hex(&bytes)
}

/// Why a request could not be marked as sent.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No pending request has this id (already marked sent, or never issued).
    #[error("no pending outgoing request has id {0}")]
    UnknownRequest(String),
    /// The server response is not what the request expects.
    #[error("invalid response for request {request_id}: {detail}")]
    InvalidResponse {
        /// The request.
        request_id: String,
        /// What was wrong.
        detail: String,
    },
    /// Creating the new session or encrypting the `m.dummy` failed.
    #[error("cannot create the recovery session: {0}")]
    Olm(String),
    /// The store failed; nothing was changed.
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_serialize_as_documented_json_lines() {
        let claim = OutgoingRequest {
            request_id: "r1".into(),
            request: OutgoingRequestKind::KeysClaim {
                body: json!({"one_time_keys": {"@alice:example.org": {"ALICEDEV": "signed_curve25519"}}}),
            },
        };
        assert_eq!(
            serde_json::to_string(&claim).unwrap(),
            r#"{"request_id":"r1","kind":"keys_claim","body":{"one_time_keys":{"@alice:example.org":{"ALICEDEV":"signed_curve25519"}}}}"#
        );
        let to_device = OutgoingRequest {
            request_id: "r2".into(),
            request: OutgoingRequestKind::ToDevice {
                event_type: "m.room.encrypted".into(),
                txn_id: "t".into(),
                body: json!({"messages": {}}),
            },
        };
        let text = serde_json::to_string(&to_device).unwrap();
        assert_eq!(
            text,
            r#"{"request_id":"r2","kind":"to_device","event_type":"m.room.encrypted","txn_id":"t","body":{"messages":{}}}"#
        );
        assert_eq!(
            serde_json::from_str::<OutgoingRequest>(&text).unwrap(),
            to_device
        );
        assert_ne!(new_id(), new_id());
    }
}
