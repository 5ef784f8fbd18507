//! `decrypt`: one input (bounded in size) as one batch in one transaction, one JSON line per
//! input event, the pending results of earlier runs first (each printed once per run), then the
//! acknowledgement, the PostHog payloads, the outgoing requests and, on stderr, why a failure
//! that needs a new session did or did not get one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};
use to_device_analytics::json::write_compact;
#[cfg(feature = "testing")]
use to_device_crypto::fail_point::Phase;
use to_device_crypto::keys::DeviceKeys;
use to_device_crypto::{
    CryptoStore, DecryptedToDeviceEvent, FailedToDeviceEvent, OutgoingRequestKind, ToDeviceOutcome,
};

use super::analytics_out::{cli_analytics_lease, AnalyticsOut};
use super::input::{self, ByteLimit};
use super::store_dir::{open_machine, OpenedMachine};
use super::store_errors::describe;
use super::sync_input::split_events;
use super::{read_json_file, CliResult, CreateArgs, DeviceArgs, StoreArgs};

/// The arguments of `decrypt`.
#[derive(clap::Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    create: CreateArgs,
    /// The senders' device keys: a /keys/query response body, a device's /keys/upload body (what
    /// `keys` prints) or one signed device-keys object. Repeat for several files. A failure that
    /// needs a new session gets one only from a known device.
    #[arg(long, value_name = "FILE")]
    device_keys: Vec<PathBuf>,
    /// Append the PostHog events of failures (those that pass the reporting policy) to this
    /// file, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    analytics_out: Option<PathBuf>,
    /// Write every still-unsent outgoing request (e.g. session recovery) to this file, one
    /// JSON object per line.
    #[arg(long, value_name = "FILE")]
    requests_out: Option<PathBuf>,
    /// Refuse an input larger than this many bytes (K, M and G suffixes allowed): the whole
    /// input is held in memory as one batch.
    #[arg(long, value_name = "N", default_value = "64M")]
    max_input_bytes: ByteLimit,
    /// The input file; `-` or nothing reads stdin.
    input: Option<PathBuf>,
}

// The printed lines. Their keys are in alphabetical order — the order of the lines before these
// structs existed (serde_json's sorted map) — and that order is part of the format (README,
// "The CLI"), so the fields below are declared sorted.

/// A decrypted result, printed for an input of this run or, with `batch`, for an earlier run's
/// input that was never acknowledged.
#[derive(Serialize)]
struct DecryptedLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<u64>,
    content: &'a Value,
    /// The outbox id: equal ids are the same result (de-duplicate on it).
    id: &'a str,
    index: u64,
    /// Whether this result was printed before, by a run that did not acknowledge it.
    pending: bool,
    result: &'static str,
    sender: &'a str,
    sender_device_id: Option<&'a str>,
    sender_device_verified: bool,
    sender_key: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
}

impl<'a> DecryptedLine<'a> {
    fn new(index: u64, event: &'a DecryptedToDeviceEvent, batch: Option<u64>) -> Self {
        Self {
            batch,
            content: &event.content,
            id: &event.id,
            index,
            pending: event.re_emitted,
            result: "decrypted",
            sender: &event.sender,
            sender_device_id: event.sender_device_id.as_deref(),
            sender_device_verified: event.sender_device_verified,
            sender_key: &event.sender_curve25519_key,
            event_type: &event.event_type,
        }
    }
}

#[derive(Serialize)]
struct PlaintextLine<'a> {
    content: Option<&'a Value>,
    index: u64,
    result: &'static str,
    sender: Option<&'a Value>,
    #[serde(rename = "type")]
    event_type: Option<&'a Value>,
}

#[derive(Serialize)]
struct FailedLine<'a> {
    error: String,
    index: u64,
    name: &'static str,
    result: &'static str,
    sender: Option<&'a str>,
    sender_key: Option<&'a str>,
    /// The decrypted type, known when the message decrypted but failed a check.
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
}

/// stdout, one JSON line at a time.
struct Lines<W: Write> {
    out: W,
    /// The line being written: built here with [`write_compact`] (serde_json writing straight
    /// into the `BufWriter` would copy every token with its own `memmove` call), then handed to
    /// `out` in one piece.
    line: Vec<u8>,
}

impl<W: Write> Lines<W> {
    fn write(&mut self, line: &impl Serialize) -> CliResult {
        self.line.clear();
        write_compact(&mut self.line, line)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.line.push(b'\n');
                self.out.write_all(&self.line).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }

    fn flush(&mut self) -> CliResult {
        self.out
            .flush()
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }
}

fn write_outcome(out: &mut Lines<impl Write>, index: u64, outcome: &ToDeviceOutcome) -> CliResult {
    match outcome {
        ToDeviceOutcome::Decrypted(event) => out.write(&DecryptedLine::new(index, event, None)),
        ToDeviceOutcome::Plaintext(event) => out.write(&PlaintextLine {
            content: event.get("content"),
            index,
            result: "plaintext",
            sender: event.get("sender"),
            event_type: event.get("type"),
        }),
        ToDeviceOutcome::Failed(failed) => out.write(&FailedLine {
            error: failed.error.to_string(),
            index,
            name: failed.error.reason().analytics_name(),
            result: "failed",
            sender: failed.facts.sender.as_deref(),
            sender_key: failed.facts.sender_key.as_deref(),
            event_type: failed.facts.decrypted_type.as_deref(),
        }),
    }
}

/// `--device-keys` as a `/keys/query` response: a `/keys/upload` body or a bare device-keys
/// object is wrapped into one.
fn as_keys_query_response(body: Value) -> Value {
    let device_keys_object = |value: &Value| {
        value.get("user_id").and_then(Value::as_str).is_some()
            && value.get("device_id").and_then(Value::as_str).is_some()
            && value.get("keys").is_some()
    };
    let device = match body.get("device_keys") {
        Some(inner) if device_keys_object(inner) => inner.clone(),
        _ if device_keys_object(&body) => body,
        _ => return body,
    };
    let (user, id) = (device["user_id"].clone(), device["device_id"].clone());
    let (Some(user), Some(id)) = (user.as_str(), id.as_str()) else {
        unreachable!("checked by device_keys_object")
    };
    json!({ "device_keys": { user: { id: device } } })
}

/// Runs `decrypt`.
pub async fn run(args: DecryptArgs) -> CliResult {
    let dir = args.store.store.clone();
    let text = input::read_text(args.input.as_deref(), args.max_input_bytes)
        .map_err(|e| e.message(Some("--max-input-bytes")))?;
    let input = split_events(&text).map_err(|e| e.to_string())?;
    drop(text);
    let opened = open_machine(&args.store, &args.device, args.create.creation()).await?;
    let machine = &opened.machine;
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Opened);
    for path in &args.device_keys {
        let body = as_keys_query_response(read_json_file(path, "the device keys")?);
        let outcome = machine
            .receive_keys_query_response(&body)
            .await
            .map_err(|e| format!("--device-keys {}: {}", path.display(), describe(&dir, &e)))?;
        for rejected in outcome.rejected {
            eprintln!("warning: ignoring device keys {rejected}");
        }
    }
    // Analytics first: payloads earlier runs left undelivered (killed after their commit), then
    // this batch's, each written and flushed before it is acknowledged (see `AnalyticsOut`). The
    // leftovers go out before the batch, so that however long the batch takes, no claim of this
    // run outlives its lease before its payloads are on disk.
    let mut analytics = args
        .analytics_out
        .clone()
        .map(AnalyticsOut::open)
        .transpose()?;
    if let Some(out) = &mut analytics {
        machine.set_analytics_lease(cli_analytics_lease());
        let leftovers = machine
            .flush_pending_analytics()
            .await
            .map_err(|e| describe(&dir, &e))?;
        out.append(&leftovers)?;
        out.deliver(machine).await?;
    }
    // Results of earlier runs that were never acknowledged (a run killed after committing, or
    // whose acknowledgement failed): printed first, marked pending, with their original batch and
    // index — except those that an input of this run matches, which its own line prints.
    let earlier = machine
        .pending_decrypted_events()
        .await
        .map_err(|e| describe(&dir, &e))?;
    let outcomes = machine
        .receive_sync(&input.events, input.next_batch.as_deref())
        .await
        .map_err(|e| format!("the batch was not decrypted: {}", describe(&dir, &e)))?;
    if let Some(out) = &mut analytics {
        // This batch's payloads, claimed by this run when they were committed (and any that
        // another process abandoned meanwhile), written before any result is acknowledged.
        let batch_payloads = machine
            .flush_pending_analytics()
            .await
            .map_err(|e| describe(&dir, &e))?;
        out.append(&batch_payloads)?;
        out.deliver(machine).await?;
    }
    let this_run: HashSet<&str> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            ToDeviceOutcome::Decrypted(event) => Some(event.id.as_str()),
            _ => None,
        })
        .collect();
    let mut printed: Vec<String> = Vec::new();
    let mut out = Lines {
        out: BufWriter::new(std::io::stdout().lock()),
        line: Vec::new(),
    };
    for pending in earlier
        .iter()
        .filter(|pending| !this_run.contains(pending.event.id.as_str()))
    {
        out.write(&DecryptedLine::new(
            pending.index,
            &pending.event,
            Some(pending.batch),
        ))?;
        printed.push(pending.event.id.clone());
    }
    for (index, outcome) in outcomes.iter().enumerate() {
        write_outcome(&mut out, index as u64, outcome)?;
    }
    printed.extend(this_run.iter().map(|id| (*id).to_owned()));
    out.flush()?;
    drop(out);
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Printed);
    machine
        .acknowledge(&printed)
        .await
        .map_err(|e| format!("the results were printed but not acknowledged (the next run prints them again, marked pending): {}", describe(&dir, &e)))?;
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Acknowledged);
    if let Some(path) = &args.requests_out {
        super::write_requests(
            machine,
            &dir,
            &mut std::fs::File::create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        )
        .await?;
    }
    recovery_hints(&opened, &dir, &outcomes).await
}

/// The failures of one sending device that need a new session.
#[derive(Default)]
struct NeedsSession {
    events: usize,
    names: BTreeSet<&'static str>,
}

/// Says on stderr, per sending device whose messages need a new session, whether recovery was
/// queued, and if not why not and what to pass.
async fn recovery_hints(
    opened: &OpenedMachine,
    dir: &Path,
    outcomes: &[ToDeviceOutcome],
) -> CliResult {
    let mut senders: BTreeMap<(&str, &str), NeedsSession> = BTreeMap::new();
    for outcome in outcomes {
        let ToDeviceOutcome::Failed(FailedToDeviceEvent { error, facts, .. }) = outcome else {
            continue;
        };
        let reason = error.reason();
        if let (true, Some(sender), Some(sender_key)) =
            (reason.needs_new_session(), &facts.sender, &facts.sender_key)
        {
            let entry = senders.entry((sender, sender_key)).or_default();
            entry.events += 1;
            entry.names.insert(reason.as_str());
        }
    }
    if senders.is_empty() {
        return Ok(());
    }
    let store = opened.store.as_ref();
    let devices: Vec<DeviceKeys> = store
        .load_devices()
        .await
        .map_err(|e| describe(dir, &e))?
        .iter()
        .filter_map(|stored| serde_json::from_str(&stored.json).ok())
        .filter_map(|json: Value| DeviceKeys::from_signed_json(&json).ok())
        .collect();
    let requests = opened
        .machine
        .outgoing_requests()
        .await
        .map_err(|e| describe(dir, &e))?;
    for ((sender, sender_key), failed) in senders {
        let what = format!(
            "{} event(s) from {sender} (sender key {sender_key}) failed with {}",
            failed.events,
            failed.names.into_iter().collect::<Vec<_>>().join(", ")
        );
        let device = devices
            .iter()
            .find(|d| d.user_id == sender && d.curve25519.to_base64() == sender_key);
        let Some(device) = device else {
            eprintln!(
                "hint: {what}, and no new session was requested: this store does not know the \
                 sending device, so it cannot claim one of its one-time keys. Pass the device's \
                 keys with --device-keys FILE (a /keys/query response listing {sender}'s device \
                 with curve25519 key {sender_key}, or that device's /keys/upload body; see the \
                 README, \"Device keys for --device-keys\") and decrypt these events again"
            );
            continue;
        };
        let queued = requests.iter().find(|request| match &request.request {
            OutgoingRequestKind::KeysClaim { body } => body["one_time_keys"][sender]
                .get(&device.device_id)
                .is_some(),
            OutgoingRequestKind::ToDevice { .. } => false,
        });
        match queued {
            Some(request) => eprintln!(
                "note: {what}; a /keys/claim for device {} is queued (request {}): send it and \
                 pass the response with `requests --store {} --mark-sent {} --response FILE`",
                device.device_id,
                request.request_id,
                dir.display(),
                request.request_id
            ),
            None => {
                let last = store
                    .last_recovery_attempt(sender_key)
                    .await
                    .map_err(|e| describe(dir, &e))?;
                let when = match last {
                    Some(ms) => format!("at {}", super::info::utc(ms)),
                    None => "before".to_owned(),
                };
                eprintln!(
                    "hint: {what}; no new /keys/claim was queued for device {}: recovery with it \
                     already started {when}, and the spec allows one new session per device per \
                     hour. `requests --store {}` lists what is still unsent; the sender's next \
                     messages use the new session once it has received our m.dummy",
                    device.device_id,
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_files_of_every_shape_become_a_keys_query_response() {
        let device = json!({"user_id": "@a:x", "device_id": "D", "keys": {}, "algorithms": []});
        let expected = json!({"device_keys": {"@a:x": {"D": device.clone()}}});
        assert_eq!(as_keys_query_response(device.clone()), expected);
        let upload = json!({"device_keys": device.clone(), "one_time_keys": {}});
        assert_eq!(as_keys_query_response(upload), expected);
        assert_eq!(as_keys_query_response(expected.clone()), expected);
        let other = json!({"unrelated": true});
        assert_eq!(as_keys_query_response(other.clone()), other);
    }
}
