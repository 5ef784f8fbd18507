//! The store directory and what the device learns from the server: the machine on its SQLite store,
//! `/keys/query` and `/keys/claim` answers built from the JSON our CLI exchanges.

use std::io::Write;
use std::path::Path;

use matrix_sdk_crypto::store::CryptoStore;
use matrix_sdk_crypto::{OlmMachine, OlmMachineBuilder};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::api::client::keys::{claim_keys, get_keys};
use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde_json::{json, Value};

use crate::args::StoreArgs;
use crate::CliError;

/// The file next to the database that holds its passphrase (Element X keeps it in the Keychain or
/// Keystore; a file is what a CLI has).
pub const PASSPHRASE_FILE: &str = "store.passphrase";

/// An opened device.
pub struct Device {
    pub machine: OlmMachine,
    /// Whether this call created the device.
    pub created: bool,
}

fn passphrase(dir: &Path) -> Result<String, CliError> {
    let path = dir.join(PASSPHRASE_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CliError::io(format!("cannot read {}", path.display()), e))?;
        return Ok(text.trim().to_owned());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| CliError::Other(format!("no randomness for the store passphrase: {e}")))?;
    let passphrase: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| CliError::io(format!("cannot create {}", path.display()), e))?;
    writeln!(file, "{passphrase}")
        .map_err(|e| CliError::io(format!("cannot write {}", path.display()), e))?;
    Ok(passphrase)
}

fn random_device_id() -> Result<String, CliError> {
    let mut bytes = [0u8; 10];
    getrandom::fill(&mut bytes)
        .map_err(|e| CliError::Other(format!("no randomness for a device id: {e}")))?;
    Ok(bytes.iter().map(|b| char::from(b'A' + b % 26)).collect())
}

/// Opens (and on first use creates) the device in `args.store`.
pub async fn open(args: &StoreArgs) -> Result<Device, CliError> {
    let dir = &args.store;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::io(format!("cannot create {}", dir.display()), e))?;
    let passphrase = passphrase(dir)?;
    let store = SqliteCryptoStore::open(dir, Some(&passphrase))
        .await
        .map_err(|e| CliError::Other(format!("cannot open the store in {}: {e}", dir.display())))?;
    let existing = store.load_account().await.map_err(CliError::store)?;
    let created = existing.is_none();
    let (user_id, device_id): (OwnedUserId, OwnedDeviceId) = match existing {
        Some(account) => {
            let (user_id, device_id) =
                (account.user_id().to_owned(), account.device_id().to_owned());
            for (given, stored, what) in [
                (&args.user_id, user_id.as_str(), "user id"),
                (&args.device_id, device_id.as_str(), "device id"),
            ] {
                if given.as_deref().is_some_and(|given| given != stored) {
                    return Err(CliError::Other(format!(
                        "the store in {} belongs to {what} {stored}, not {}",
                        dir.display(),
                        given.as_deref().unwrap_or_default()
                    )));
                }
            }
            (user_id, device_id)
        }
        None => {
            let user_id = args.user_id.as_deref().unwrap_or("@cli-user:localhost");
            let user_id = UserId::parse(user_id)
                .map_err(|e| CliError::Other(format!("invalid user id {user_id}: {e}")))?;
            let device_id = match &args.device_id {
                Some(device_id) => device_id.clone(),
                None => random_device_id()?,
            };
            (user_id, device_id.into())
        }
    };
    let machine = OlmMachineBuilder::new(&user_id, &device_id)
        .with_crypto_store(store)
        .build()
        .await
        .map_err(CliError::store)?;
    Ok(Device { machine, created })
}

/// Feeds a `/keys/query` response body to the machine, as the answer to a key query for the
/// body's users. For a user the machine already knows, the devices it knows are kept in the answer
/// (a `/keys/query` answer lists all of a user's devices; one without a known device would mark it
/// deleted), so that bodies can name one device at a time.
pub async fn receive_keys_query(machine: &OlmMachine, body: &Value) -> Result<(), CliError> {
    let device_keys = body
        .get("device_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            CliError::Other(
                "the keys are not a /keys/query response: no `device_keys` object".to_owned(),
            )
        })?;
    let mut users = Vec::new();
    let mut answer = serde_json::Map::new();
    for (user, devices) in device_keys {
        let user_id = UserId::parse(user.as_str()).map_err(|e| {
            CliError::Other(format!(
                "invalid user id {user} in the /keys/query response: {e}"
            ))
        })?;
        let mut all = serde_json::Map::new();
        for known in machine
            .get_user_devices(&user_id, None)
            .await
            .map_err(CliError::store)?
            .devices()
        {
            let keys = serde_json::to_value(known.as_device_keys())
                .map_err(|e| CliError::Other(e.to_string()))?;
            all.insert(known.device_id().to_string(), keys);
        }
        if let Some(devices) = devices.as_object() {
            all.extend(devices.clone());
        }
        answer.insert(user.clone(), Value::Object(all));
        users.push(user_id);
    }
    machine
        .update_tracked_users(users.iter().map(|u| &**u))
        .await
        .map_err(CliError::store)?;
    let (request_id, _) = machine.query_keys_for_users(users.iter().map(|u| &**u));
    let mut response = get_keys::v3::Response::new();
    response.device_keys = serde_json::from_value(Value::Object(answer))
        .map_err(|e| CliError::Other(format!("the /keys/query response does not parse: {e}")))?;
    machine
        .mark_request_as_sent(&request_id, &response)
        .await
        .map_err(CliError::olm)?;
    Ok(())
}

/// This device's own signed device keys, as the store holds them.
pub async fn own_device_keys(machine: &OlmMachine) -> Result<Value, CliError> {
    let own = machine
        .get_device(machine.user_id(), machine.device_id(), None)
        .await
        .map_err(CliError::store)?
        .ok_or_else(|| {
            CliError::Other("the store has no device keys for its own device".to_owned())
        })?;
    serde_json::to_value(own.as_device_keys()).map_err(|e| CliError::Other(e.to_string()))
}

/// When the machine needs an Olm session with `user_id`'s devices, answers its `/keys/claim` with
/// the first one-time key of `one_time_keys` (a `/keys/upload` body's map), as a server hands out
/// one key per claim. Only a device without a session is claimed for, so a keys file with one key
/// serves one session.
pub async fn claim_one_time_key(
    machine: &OlmMachine,
    user_id: &UserId,
    device_id: &str,
    one_time_keys: &serde_json::Map<String, Value>,
) -> Result<(), CliError> {
    let Some((request_id, _)) = machine
        .get_missing_sessions(std::iter::once(user_id))
        .await
        .map_err(CliError::store)?
    else {
        return Ok(());
    };
    let (key_id, key) = one_time_keys.iter().next().ok_or_else(|| {
        CliError::Other(format!(
            "no session with {user_id} {device_id} and no one-time key in the keys file"
        ))
    })?;
    let response = claim_keys::v3::Response::new(
        serde_json::from_value(json!({ user_id.as_str(): { device_id: { key_id: key } } }))
            .map_err(|e| {
                CliError::Other(format!("the one-time key {key_id} does not parse: {e}"))
            })?,
    );
    machine
        .mark_request_as_sent(&request_id, &response)
        .await
        .map_err(CliError::olm)
}
