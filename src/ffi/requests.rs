//! Outgoing requests over FFI: what the app's HTTP stack must send (session recovery).

use serde_json::Value;

use super::types::CryptoError;
use super::OlmMachine;
use crate::requests::{OutgoingRequest, OutgoingRequestKind, RequestError};

/// A request for the app to send; bodies are JSON text.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum OutgoingRequestFfi {
    /// `POST /_matrix/client/v3/keys/claim`; feed the response to `mark_request_as_sent`.
    KeysClaim {
        /// Pass to `mark_request_as_sent`.
        request_id: String,
        /// The request body.
        body_json: String,
    },
    /// `PUT /_matrix/client/v3/sendToDevice/{event_type}/{txn_id}`.
    ToDevice {
        /// Pass to `mark_request_as_sent`.
        request_id: String,
        /// The event type in the URL.
        event_type: String,
        /// The transaction id in the URL.
        txn_id: String,
        /// The request body.
        body_json: String,
    },
}

impl From<OutgoingRequest> for OutgoingRequestFfi {
    fn from(request: OutgoingRequest) -> Self {
        match request.request {
            OutgoingRequestKind::KeysClaim { body } => Self::KeysClaim {
                request_id: request.request_id,
                body_json: body.to_string(),
            },
            OutgoingRequestKind::ToDevice {
                event_type,
                txn_id,
                body,
            } => Self::ToDevice {
                request_id: request.request_id,
                event_type,
                txn_id,
                body_json: body.to_string(),
            },
        }
    }
}

impl From<RequestError> for CryptoError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => store.into(),
            other => Self::InvalidJson {
                detail: other.to_string(),
            },
        }
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl OlmMachine {
    /// Every request still to be sent, oldest first; an unsent request keeps its id.
    pub async fn outgoing_requests(&self) -> Result<Vec<OutgoingRequestFfi>, CryptoError> {
        Ok(self
            .inner
            .outgoing_requests()
            .await?
            .into_iter()
            .map(OutgoingRequestFfi::from)
            .collect())
    }

    /// Marks a request as sent; for a keys claim, `response_json` is the server's response body.
    pub async fn mark_request_as_sent(
        &self,
        request_id: String,
        response_json: Option<String>,
    ) -> Result<(), CryptoError> {
        let response = response_json
            .map(|json| serde_json::from_str::<Value>(&json))
            .transpose()
            .map_err(|e| CryptoError::InvalidJson {
                detail: e.to_string(),
            })?;
        Ok(self
            .inner
            .mark_request_as_sent(&request_id, response.as_ref())
            .await?)
    }
}
