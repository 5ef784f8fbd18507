//! The CLI's store directory: `store.sqlite3` plus, unless the key comes from elsewhere, a random
//! `store.key` (mode 0600). The key file protects a database copied on its own, not a stolen home
//! folder: apps keep the key in the Keychain/Keystore instead.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{CryptoStore, OlmMachine, StoreKey};

use super::StoreArgs;

/// The environment variable that may hold the store key (64 hex digits).
pub const STORE_KEY_ENV: &str = "TO_DEVICE_CRYPTO_STORE_KEY";

pub struct OpenedMachine {
    pub machine: OlmMachine,
}

fn read_key_file(path: &Path) -> Result<StoreKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the store key file {}: {e}", path.display()))?;
    StoreKey::from_hex(&text).ok_or_else(|| {
        format!(
            "the store key file {} must hold 64 hex digits",
            path.display()
        )
    })
}

fn store_key(args: &StoreArgs) -> Result<StoreKey, String> {
    if let Some(path) = &args.store_key_file {
        return read_key_file(path);
    }
    if let Ok(text) = std::env::var(STORE_KEY_ENV) {
        return StoreKey::from_hex(&text)
            .ok_or_else(|| format!("${STORE_KEY_ENV} must hold 64 hex digits"));
    }
    let path = args.store.join("store.key");
    if path.exists() {
        return read_key_file(&path);
    }
    let key = StoreKey::generate().map_err(|e| e.to_string())?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| format!("cannot create the store key file {}: {e}", path.display()))?;
    writeln!(file, "{}", key.to_hex())
        .map_err(|e| format!("cannot write the store key file {}: {e}", path.display()))?;
    eprintln!(
        "note: created a random store key in {} (it protects a copied database, not a stolen home folder; pass --store-key-file or ${STORE_KEY_ENV} to manage it yourself)",
        path.display()
    );
    Ok(key)
}

fn random_device_id() -> Result<String, String> {
    let mut bytes = [0u8; 10];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes.iter().map(|b| char::from(b'A' + b % 26)).collect())
}

pub async fn open_machine(args: &StoreArgs) -> Result<OpenedMachine, String> {
    std::fs::create_dir_all(&args.store).map_err(|e| {
        format!(
            "cannot create the store directory {}: {e}",
            args.store.display()
        )
    })?;
    let key = store_key(args)?;
    let store = SqliteStore::open(args.store.join("store.sqlite3"), key, Synchronous::Normal)
        .map_err(|e| format!("cannot open the store in {}: {e}", args.store.display()))?;
    let existing = store.load_account().await.map_err(|e| e.to_string())?;
    let (user_id, device_id) = match existing {
        Some(account) => {
            for (given, stored, what) in [
                (&args.user_id, &account.user_id, "user id"),
                (&args.device_id, &account.device_id, "device id"),
            ] {
                if given.as_ref().is_some_and(|given| given != stored) {
                    return Err(format!(
                        "the store in {} belongs to {what} {stored}, not {}",
                        args.store.display(),
                        given.as_deref().unwrap_or_default()
                    ));
                }
            }
            (account.user_id, account.device_id)
        }
        None => (
            args.user_id
                .clone()
                .unwrap_or_else(|| "@cli-user:localhost".to_owned()),
            match &args.device_id {
                Some(device_id) => device_id.clone(),
                None => random_device_id()?,
            },
        ),
    };
    let machine = OlmMachine::open(&user_id, &device_id, Arc::new(store))
        .await
        .map_err(|e| e.to_string())?;
    Ok(OpenedMachine { machine })
}
