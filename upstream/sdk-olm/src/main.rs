//! `sdk-olm`: matrix-sdk-crypto (0.19.1 with the upstream patch series in
//! `upstream/matrix-sdk-crypto/`) on its SQLite store, driven from the command line with exactly the
//! inputs and outputs of our `to-device-crypto` CLI, so that the two can be compared event by event
//! (docs/UPSTREAM.md).
//!
//! - `keys`: creates the device on first use and prints its `/keys/upload` body (device keys and
//!   signed one-time keys, 25 by default for a new device as with our CLI), marking them published.
//! - `decrypt`: one `/sync` batch through `OlmMachine::receive_sync_changes`; one line per input
//!   event: decrypted, failed (its `ToDeviceFailedToDecrypt_<Reason>` name from the patched SDK:
//!   `failure_reason`, or the failure stream for events the SDK rejects as `Invalid`) or plaintext.
//! - `encrypt`: `encrypt_content_for_devices` for the device of a `/keys/upload` body, printed as
//!   `/sync`-shaped events, so that the SDK can also be the sender.

mod args;
mod device;
mod input;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use futures_util::{FutureExt, StreamExt};
use matrix_sdk_common::deserialized_responses::{AlgorithmInfo, ProcessedToDeviceEvent};
use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSyncChanges, TrustRequirement,
};
use ruma::api::client::keys::upload_keys;
use ruma::events::AnyToDeviceEvent;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, UInt, UserId};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use to_device_analytics::envelope::{parse_to_device_event, EnvelopeFacts, ToDeviceEnvelope};
use to_device_analytics::{FailureReason, ToDeviceDecryptionFailure};

use crate::args::{Command, StoreArgs};
use crate::input::InputEvent;

/// Why a command failed; printed on stderr, exit code 1.
#[derive(Debug)]
pub enum CliError {
    Usage(args::UsageError),
    Io {
        what: String,
        source: std::io::Error,
    },
    Other(String),
}

impl CliError {
    fn io(what: String, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }

    fn store(error: impl std::fmt::Display) -> Self {
        Self::Other(format!("store error: {error}"))
    }

    fn olm(error: impl std::fmt::Display) -> Self {
        Self::Other(format!("matrix-sdk-crypto error: {error}"))
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(e) => write!(f, "{e}"),
            CliError::Io { what, source } => write!(f, "{what}: {source}"),
            CliError::Other(message) => f.write_str(message),
        }
    }
}

fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(command) => command,
        Err(error) => return fail(CliError::Usage(error)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(CliError::io("cannot start the async runtime".to_owned(), e)),
    };
    let result = runtime.block_on(async {
        match command {
            Command::Keys {
                store,
                one_time_keys,
            } => keys(&store, one_time_keys).await,
            Command::Decrypt {
                store,
                device_keys,
                analytics_out,
                input,
            } => decrypt(&store, device_keys, analytics_out, input).await,
            Command::Encrypt {
                store,
                recipient_keys,
                event_type,
                content,
                count,
            } => encrypt(&store, &recipient_keys, &event_type, &content, count).await,
            Command::Help => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error),
    }
}

fn fail(error: CliError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

fn print_line(value: &Value) -> Result<(), CliError> {
    writeln!(std::io::stdout().lock(), "{value}")
        .map_err(|e| CliError::io("cannot write to stdout".to_owned(), e))
}

fn read_json_file(path: &Path, what: &str) -> Result<Value, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::io(format!("cannot read {what} {}", path.display()), e))?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::Other(format!("{what} {} is not JSON: {e}", path.display())))
}

/// How many one-time keys a new device publishes: as many as our CLI (half of what an Olm account
/// can hold).
const NEW_DEVICE_ONE_TIME_KEYS: usize = 25;

async fn keys(args: &StoreArgs, one_time_keys: Option<usize>) -> Result<(), CliError> {
    let device = device::open(args).await?;
    let machine = &device.machine;
    let count = one_time_keys.unwrap_or(if device.created {
        NEW_DEVICE_ONE_TIME_KEYS
    } else {
        0
    });
    if count > 0 || device.created {
        // The SDK tops its one-time keys up to what it can hold when the server reports fewer: tell
        // it the server holds all but `count`. Offering fallback-key support makes it create one.
        let max = machine
            .store()
            .load_account()
            .await
            .map_err(CliError::store)?
            .map_or(50, |a| a.max_one_time_keys());
        let server_count = max.checked_sub(count).ok_or_else(|| {
            CliError::Other(format!(
                "--one-time-keys: an Olm account holds at most {max}"
            ))
        })?;
        let counts = [(
            OneTimeKeyAlgorithm::SignedCurve25519,
            UInt::try_from(server_count).unwrap_or_default(),
        )]
        .into();
        let no_events = Vec::new();
        machine
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: no_events,
                    changed_devices: &Default::default(),
                    one_time_keys_counts: &counts,
                    unused_fallback_keys: Some(&[]),
                    next_batch_token: None,
                },
                &settings(),
            )
            .await
            .map_err(CliError::olm)?;
    }
    let mut body = json!({});
    for request in machine.outgoing_requests().await.map_err(CliError::store)? {
        let AnyOutgoingRequest::KeysUpload(upload) = request.request() else {
            continue;
        };
        if let Some(device_keys) = &upload.device_keys {
            body["device_keys"] =
                serde_json::to_value(device_keys).map_err(|e| CliError::Other(e.to_string()))?;
        }
        // A new account comes with as many one-time keys as it can hold (50); print as many as
        // our CLI does. The others are marked published with them, as if lost in transit: they
        // are never claimed.
        let printed = if device.created { count } else { usize::MAX };
        let one_time_keys: serde_json::Map<String, Value> = upload
            .one_time_keys
            .iter()
            .take(printed)
            .map(|(id, key)| Ok((id.to_string(), serde_json::to_value(key)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| CliError::Other(e.to_string()))?;
        body["one_time_keys"] = Value::Object(one_time_keys);
        body["fallback_keys"] = serde_json::to_value(&upload.fallback_keys)
            .map_err(|e| CliError::Other(e.to_string()))?;
        // The server now holds what it held plus what was uploaded.
        let uploaded = machine
            .store()
            .load_account()
            .await
            .map_err(CliError::store)?
            .map_or(0, |a| a.max_one_time_keys());
        let response = upload_keys::v3::Response::new(
            [(
                OneTimeKeyAlgorithm::SignedCurve25519,
                UInt::try_from(uploaded).unwrap_or_default(),
            )]
            .into(),
        );
        machine
            .mark_request_as_sent(request.request_id(), &response)
            .await
            .map_err(CliError::olm)?;
        break;
    }
    // Another device's `encrypt` reads this file: always include the device keys, also once they
    // were published.
    if body.get("device_keys").is_none() {
        body["device_keys"] = device::own_device_keys(machine).await?;
    }
    print_line(&body)
}

fn settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

async fn decrypt(
    args: &StoreArgs,
    device_keys: Option<PathBuf>,
    analytics_out: Option<PathBuf>,
    input: Option<PathBuf>,
) -> Result<(), CliError> {
    let text = match input.as_ref().filter(|p| p.as_os_str() != "-") {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::io(format!("cannot read input {}", path.display()), e))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::io("cannot read stdin".to_owned(), e))?;
            text
        }
    };
    let batch = input::split(&text).map_err(|e| CliError::Other(e.to_string()))?;
    let device = device::open(args).await?;
    let machine = &device.machine;
    if let Some(path) = device_keys {
        device::receive_keys_query(machine, &read_json_file(&path, "device keys")?).await?;
    }

    // A `/sync` response is JSON, so a line that is not JSON never reaches the SDK: it is reported
    // here, with the name the envelope checks give it.
    let mut to_device_events: Vec<Raw<AnyToDeviceEvent>> = Vec::new();
    let mut positions = Vec::new();
    for (index, event) in batch.events.iter().enumerate() {
        if let InputEvent::Json(raw) = event {
            to_device_events.push(Raw::from_json(raw.clone()));
            positions.push(index);
        }
    }
    let our_curve25519_key = machine.identity_keys().curve25519.to_base64();
    let mut failures = machine.to_device_decryption_failure_stream();
    let changed_devices = Default::default();
    let counts = Default::default();
    let (processed, _) = machine
        .receive_sync_changes(
            EncryptionSyncChanges {
                to_device_events,
                changed_devices: &changed_devices,
                one_time_keys_counts: &counts,
                unused_fallback_keys: None,
                next_batch_token: batch.next_batch.clone(),
            },
            &settings(),
        )
        .await
        .map_err(CliError::olm)?;
    // The machine returns one result per event, in order; it drops only events from dehydrated
    // devices, which this CLI cannot line up with its input.
    if processed.len() != positions.len() {
        return Err(CliError::Other(format!(
            "matrix-sdk-crypto returned {} results for {} events (events from dehydrated devices are dropped)",
            processed.len(),
            positions.len()
        )));
    }
    let mut items: Vec<ToDeviceDecryptionFailure> = Vec::new();
    while let Some(Some(item)) = failures.next().now_or_never() {
        items.push(item.map_err(|e| CliError::Other(e.to_string()))?);
    }
    let item_at = |sdk_index: usize| items.iter().find(|i| i.diagnostics.index == sdk_index);

    let mut results = processed
        .iter()
        .zip(positions.iter().copied())
        .enumerate()
        .peekable();
    for (index, event) in batch.events.iter().enumerate() {
        let line = match event {
            InputEvent::NotJson { error, .. } => json!({
                "index": index,
                "result": "failed",
                "name": FailureReason::MalformedEvent.analytics_name(),
                "error": format!("not JSON ({error}); a /sync response cannot carry it, so matrix-sdk-crypto never sees it"),
                "sender": null,
                "sender_key": null,
                "type": null,
            }),
            InputEvent::Json(raw) => {
                let Some((sdk_index, (result, _))) = results.next() else {
                    return Err(CliError::Other("fewer results than events".to_owned()));
                };
                result_line(index, result, item_at(sdk_index), || {
                    result_id(raw.get(), &our_curve25519_key)
                })
            }
        };
        print_line(&line)?;
    }
    std::io::stdout()
        .flush()
        .map_err(|e| CliError::io("cannot write to stdout".to_owned(), e))?;

    if let Some(path) = analytics_out {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CliError::io(format!("cannot open {}", path.display()), e))?;
        // Only what passes the reporting policy is an analytics event.
        for payload in items.iter().filter_map(ToDeviceDecryptionFailure::payload) {
            writeln!(file, "{}", payload.to_json())
                .map_err(|e| CliError::io(format!("cannot write {}", path.display()), e))?;
        }
    }
    Ok(())
}

/// An `id` for a decrypted result, of the shape our CLI prints (32 hex digits, stable per message):
/// the first 16 bytes of SHA-256 over the sender's Curve25519 key, the Olm message type and the
/// message bytes of our ciphertext entry — the hash matrix-sdk-crypto keeps as its
/// `OlmMessageHash` for the replay check, which it does not hand out with a decrypted event, so it
/// is computed here from the envelope. Our crate derives its ids from replay keys instead, so the
/// values differ and are not compared (docs/UPSTREAM.md, "Allowed differences").
fn result_id(raw: &str, our_curve25519_key: &str) -> Option<String> {
    let mut facts = EnvelopeFacts::default();
    let ToDeviceEnvelope::Olm(ciphertext) =
        parse_to_device_event(raw, our_curve25519_key, &mut facts).ok()?
    else {
        return None;
    };
    let hash = Sha256::new()
        .chain_update(ciphertext.sender_key)
        .chain_update([ciphertext.message_type])
        .chain_update(&ciphertext.body)
        .finalize();
    Some(hash[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// One output line, in our CLI's format (`to-device-crypto decrypt`, README "The CLI"), except
/// what matrix-sdk-crypto cannot know: a failed line's decrypted `type` is always null (the SDK
/// drops the plaintext of a message that fails a check), and `pending` is always false (the SDK
/// has no outbox of results to re-emit).
fn result_line(
    index: usize,
    result: &ProcessedToDeviceEvent,
    failure: Option<&ToDeviceDecryptionFailure>,
    id: impl FnOnce() -> Option<String>,
) -> Value {
    let failed = |name: Option<&str>, error: String| {
        json!({
            "index": index,
            "result": "failed",
            "name": name,
            "error": error,
            "sender": failure.and_then(|item| item.diagnostics.sender.as_deref()),
            "sender_key": failure.and_then(|item| item.diagnostics.sender_key.as_deref()),
            "type": null,
        })
    };
    let raw_json = |raw: &Raw<AnyToDeviceEvent>| -> Value {
        serde_json::from_str(raw.json().get()).unwrap_or(Value::Null)
    };
    match result {
        ProcessedToDeviceEvent::Decrypted {
            raw,
            encryption_info,
        } => {
            let event = raw_json(raw);
            let sender_key = match &encryption_info.algorithm_info {
                AlgorithmInfo::OlmV1Curve25519AesSha2 {
                    curve25519_public_key_base64,
                } => Value::from(curve25519_public_key_base64.as_str()),
                _ => Value::Null,
            };
            json!({
                "id": id(),
                "index": index,
                "pending": false,
                "result": "decrypted",
                "type": event["type"],
                "sender": encryption_info.sender.as_str(),
                "content": event["content"],
                "sender_key": sender_key,
                "sender_device_id": encryption_info.sender_device.as_ref().map(|d| d.as_str()),
                // The SDK names the sending device once its Ed25519 key is established (from
                // `/keys/query` or valid `sender_device_keys`); for `m.room_key` it defers that.
                "sender_device_verified": encryption_info.sender_device.is_some(),
            })
        }
        ProcessedToDeviceEvent::UnableToDecrypt { utd_info, .. } => failed(
            utd_info.failure_reason.map(FailureReason::analytics_name),
            match failure {
                Some(item) => item.diagnostics.error.clone(),
                None => format!("{:?} without a failure reason", utd_info.reason),
            },
        ),
        ProcessedToDeviceEvent::Invalid(raw) => match failure {
            Some(item) => failed(
                Some(item.reason.analytics_name()),
                item.diagnostics.error.clone(),
            ),
            // Not an encrypted event: a plaintext event the SDK could not read, and ignores.
            None => {
                let event = raw_json(raw);
                json!({
                    "index": index,
                    "result": "invalid",
                    "type": event["type"],
                    "sender": event["sender"],
                })
            }
        },
        ProcessedToDeviceEvent::PlainText(raw) => {
            let event = raw_json(raw);
            json!({
                "index": index,
                "result": "plaintext",
                "type": event["type"],
                "sender": event["sender"],
                "content": event["content"],
            })
        }
    }
}

async fn encrypt(
    args: &StoreArgs,
    recipient_keys: &Path,
    event_type: &str,
    content: &str,
    count: Option<usize>,
) -> Result<(), CliError> {
    let keys = read_json_file(recipient_keys, "recipient keys")?;
    let device_keys = &keys["device_keys"];
    let (Some(user_id), Some(device_id)) = (
        device_keys["user_id"].as_str(),
        device_keys["device_id"].as_str(),
    ) else {
        return Err(CliError::Other(format!(
            "{} is not a /keys/upload body: no device_keys with user_id and device_id",
            recipient_keys.display()
        )));
    };
    let user = UserId::parse(user_id)
        .map_err(|e| CliError::Other(format!("invalid user id {user_id}: {e}")))?;
    let content: Value = serde_json::from_str(content)
        .map_err(|e| CliError::Other(format!("--content is not JSON: {e}")))?;
    let contents: Vec<Value> = match count {
        None => vec![content],
        Some(n) => (0..n)
            .map(|seq| {
                let mut content = content.clone();
                if let Some(object) = content.as_object_mut() {
                    object.insert("seq".to_owned(), json!(seq));
                }
                content
            })
            .collect(),
    };

    let device = device::open(args).await?;
    let machine = &device.machine;
    device::receive_keys_query(
        machine,
        &json!({ "device_keys": { user_id: { device_id: device_keys } } }),
    )
    .await?;
    let recipient = machine
        .get_device(&user, device_id.into(), None)
        .await
        .map_err(CliError::store)?
        .ok_or_else(|| {
            CliError::Other(format!(
                "matrix-sdk-crypto did not accept the device keys of {user_id} {device_id}"
            ))
        })?;
    let empty = serde_json::Map::new();
    let one_time_keys = keys["one_time_keys"].as_object().unwrap_or(&empty);
    device::claim_one_time_key(machine, &user, device_id, one_time_keys).await?;

    let mut events = Vec::new();
    for content in &contents {
        let (requests, withheld) = machine
            .encrypt_content_for_devices(
                vec![(*recipient).clone()],
                event_type,
                content,
                CollectStrategy::AllDevices,
            )
            .await
            .map_err(CliError::olm)?;
        if let Some((_, code)) = withheld.first() {
            return Err(CliError::Other(format!(
                "matrix-sdk-crypto did not encrypt for {user_id} {device_id}: {}",
                code.as_str()
            )));
        }
        for request in requests {
            let messages = serde_json::to_value(&request.messages)
                .map_err(|e| CliError::Other(e.to_string()))?;
            for content in messages.as_object().into_iter().flat_map(|m| m.values()) {
                for content in content.as_object().into_iter().flat_map(|d| d.values()) {
                    events.push(json!({
                        "type": request.event_type.to_string(),
                        "sender": machine.user_id().as_str(),
                        "content": content,
                    }));
                }
            }
        }
    }
    print_line(&Value::Array(events))
}
