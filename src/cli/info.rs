//! `info --store DIR`: what a store holds, for an engineer debugging "Unable to decrypt" — the
//! identity keys, known devices, Olm sessions per sender, the reporting counts, results waiting
//! for acknowledgement and unsent requests. It creates nothing and takes no write lock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use to_device_crypto::analytics::policy::ReportingStats;
use to_device_crypto::keys::DeviceKeys;
use to_device_crypto::{CryptoStore, OutgoingRequest, OutgoingRequestKind};

use super::store_dir::{open_machine, Creation, DB_FILE};
use super::store_errors::describe;
use super::{CliResult, DeviceArgs, StoreArgs};

#[derive(Serialize)]
struct StoreInfo {
    store: String,
    schema_version: i64,
    user_id: String,
    device_id: String,
    curve25519: String,
    ed25519: String,
    device_keys_published: bool,
    unpublished_one_time_keys: usize,
    sync_token: Option<String>,
    known_devices: Vec<KnownDevice>,
    sessions: Vec<SenderSessions>,
    reporting: ReportingStats,
    pending_results: Vec<PendingResult>,
    requests: Vec<OutgoingRequest>,
}

#[derive(Serialize)]
struct KnownDevice {
    user_id: String,
    device_id: String,
    curve25519: String,
    ed25519: String,
}

/// The Olm sessions with one sender key.
#[derive(Serialize)]
struct SenderSessions {
    sender_key: String,
    /// The known device with this key, if any.
    user_id: Option<String>,
    device_id: Option<String>,
    sessions: u64,
    last_used_ms: u64,
}

/// A result waiting for acknowledgement, without its content (which may hold room keys).
#[derive(Serialize)]
struct PendingResult {
    id: String,
    batch: u64,
    index: u64,
    #[serde(rename = "type")]
    event_type: String,
    sender: String,
    sender_key: String,
}

/// The session table's non-secret columns (sender key, count, last use), read on a read-only
/// connection: the store API has no listing of sessions, and `info` must not write.
/// Returns the schema version too.
fn sessions_per_sender_key(db: &Path) -> Result<(i64, Vec<SenderSessions>), rusqlite::Error> {
    let connection = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let version = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let mut statement = connection.prepare(
        "SELECT sender_key, COUNT(*), MAX(last_used) FROM sessions
         GROUP BY sender_key ORDER BY MAX(last_used) DESC, sender_key",
    )?;
    let rows = statement
        .query_map([], |row| {
            Ok(SenderSessions {
                sender_key: row.get(0)?,
                user_id: None,
                device_id: None,
                sessions: row.get::<_, i64>(1)?.max(0) as u64,
                last_used_ms: row.get::<_, i64>(2)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok((version, rows))
}

/// Runs `info`.
pub async fn run(store_args: StoreArgs, as_json: bool) -> CliResult {
    let dir = store_args.store.clone();
    let opened = open_machine(&store_args, &DeviceArgs::default(), Creation::Refused).await?;
    let machine = &opened.machine;
    let store = opened.store.as_ref();
    let failed = |e: to_device_crypto::StoreError| describe(&dir, &e);
    let known_devices: Vec<DeviceKeys> = store
        .load_devices()
        .await
        .map_err(failed)?
        .iter()
        .filter_map(|stored| serde_json::from_str::<Value>(&stored.json).ok())
        .filter_map(|json| DeviceKeys::from_signed_json(&json).ok())
        .collect();
    let by_key: HashMap<String, &DeviceKeys> = known_devices
        .iter()
        .map(|device| (device.curve25519.to_base64(), device))
        .collect();
    let (schema_version, sessions) = sessions_per_sender_key(&dir.join(DB_FILE))
        .map_err(|e| describe(&dir, &to_device_crypto::StoreError::Sqlite(e)))?;
    let upload = machine.keys_for_upload().await;
    let identity = machine.identity_keys();
    let info = StoreInfo {
        store: dir.display().to_string(),
        schema_version,
        user_id: machine.user_id().to_owned(),
        device_id: machine.device_id().to_owned(),
        curve25519: identity.curve25519.to_base64(),
        ed25519: identity.ed25519.to_base64(),
        device_keys_published: upload
            .as_ref()
            .is_none_or(|body| body.get("device_keys").is_none()),
        unpublished_one_time_keys: upload
            .as_ref()
            .and_then(|body| body.get("one_time_keys"))
            .and_then(Value::as_object)
            .map_or(0, |keys| keys.len()),
        sync_token: machine.sync_token().await.map_err(failed)?,
        sessions: sessions
            .into_iter()
            .map(|mut sender| {
                if let Some(device) = by_key.get(&sender.sender_key) {
                    sender.user_id = Some(device.user_id.clone());
                    sender.device_id = Some(device.device_id.clone());
                }
                sender
            })
            .collect(),
        known_devices: known_devices
            .iter()
            .map(|device| KnownDevice {
                user_id: device.user_id.clone(),
                device_id: device.device_id.clone(),
                curve25519: device.curve25519.to_base64(),
                ed25519: device.ed25519.to_base64(),
            })
            .collect(),
        reporting: machine.reporting_stats().await,
        pending_results: machine
            .pending_decrypted_events()
            .await
            .map_err(failed)?
            .into_iter()
            .map(|pending| PendingResult {
                id: pending.event.id,
                batch: pending.batch,
                index: pending.index,
                event_type: pending.event.event_type,
                sender: pending.event.sender,
                sender_key: pending.event.sender_curve25519_key,
            })
            .collect(),
        requests: machine.outgoing_requests().await.map_err(failed)?,
    };
    let text = if as_json {
        serde_json::to_string_pretty(&info).map_err(|e| e.to_string())? + "\n"
    } else {
        render(&info)
    };
    print!("{text}");
    Ok(())
}

fn render(info: &StoreInfo) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "store           {} (schema version {})",
        info.store, info.schema_version
    ));
    line(format!(
        "device          {} {}",
        info.user_id, info.device_id
    ));
    line(format!("curve25519      {}", info.curve25519));
    line(format!("ed25519         {}", info.ed25519));
    line(format!(
        "keys            device keys {}published; {} unpublished one-time key(s)",
        if info.device_keys_published {
            ""
        } else {
            "not yet "
        },
        info.unpublished_one_time_keys
    ));
    line(format!(
        "sync token      {}",
        info.sync_token.as_deref().unwrap_or("none")
    ));
    line(String::new());
    line(format!(
        "known devices ({}, from --device-keys / /keys/query):",
        info.known_devices.len()
    ));
    for device in &info.known_devices {
        line(format!(
            "  {} {}  curve25519 {}",
            device.user_id, device.device_id, device.curve25519
        ));
    }
    let session_count: u64 = info.sessions.iter().map(|s| s.sessions).sum();
    line(format!(
        "sessions ({session_count} with {} sender key(s)):",
        info.sessions.len()
    ));
    for sender in &info.sessions {
        let who = match (&sender.user_id, &sender.device_id) {
            (Some(user), Some(device)) => format!("{user} {device}"),
            _ => "unknown device".to_owned(),
        };
        line(format!(
            "  {who}  sender key {}: {} session(s), last used {}",
            sender.sender_key,
            sender.sessions,
            utc(sender.last_used_ms)
        ));
    }
    let total = &info.reporting.total;
    line(format!(
        "reporting (since {}): {} decrypted",
        utc(total.start_ms),
        total.decrypted
    ));
    for (reason, stats) in &total.failures {
        line(format!(
            "  {:<48} seen {}, reported {}, suppressed: already seen {}, window {}, cap {}, analytics off {}",
            reason.analytics_name(),
            stats.seen,
            stats.reported,
            stats.suppressed_already_seen,
            stats.suppressed_window,
            stats.suppressed_cap,
            stats.suppressed_disabled
        ));
    }
    line(format!(
        "pending results ({}, decrypted and not yet acknowledged):",
        info.pending_results.len()
    ));
    for pending in &info.pending_results {
        line(format!(
            "  id {}  batch {} index {}  {} from {}",
            pending.id, pending.batch, pending.index, pending.event_type, pending.sender
        ));
    }
    line(format!("unsent requests ({}):", info.requests.len()));
    for request in &info.requests {
        let mut text = format!("  {}  ", request.request_id);
        match &request.request {
            OutgoingRequestKind::KeysClaim { body } => {
                let _ = write!(text, "keys_claim for {}", claimed_devices(body));
            }
            OutgoingRequestKind::ToDevice {
                event_type, body, ..
            } => {
                let _ = write!(
                    text,
                    "to_device {event_type} to {}",
                    claimed_devices(&serde_json::json!({"one_time_keys": body["messages"]}))
                );
            }
        }
        line(text);
    }
    out
}

/// `@user DEVICE, …` of a `{"one_time_keys"|"messages": {user: {device: …}}}` body.
fn claimed_devices(body: &Value) -> String {
    let mut devices = Vec::new();
    for (user, user_devices) in body["one_time_keys"].as_object().into_iter().flatten() {
        for device in user_devices
            .as_object()
            .into_iter()
            .flatten()
            .map(|(d, _)| d)
        {
            devices.push(format!("{user} {device}"));
        }
    }
    devices.join(", ")
}

/// `ms` since the Unix epoch as an ISO 8601 UTC time (`1970-01-01T00:00:00Z` for 0).
pub fn utc(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, day_seconds) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        day_seconds / 3600,
        day_seconds % 3600 / 60,
        day_seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso_8601_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_785_584_096_789), "2026-08-01T11:34:56Z");
        assert_eq!(utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
