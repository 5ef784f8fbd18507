//! The CLI's store directory: `store.sqlite3` plus, unless the key comes from elsewhere, a random
//! `store.key` (mode 0600). The key file protects a database copied on its own, not a stolen home
//! folder: apps keep the key in the Keychain/Keystore instead.
//!
//! Rules: only `keys` or `--create` makes a new store (a typo in `--store` must not become a new
//! device); a new random key is never written beside an existing database (it could not open it);
//! a key file without its database does not silently start a new identity (`--new-identity`).
//! The directory is created 0700 and the database file 0600 before SQLite opens it (SQLite gives
//! its `-wal` and `-shm` files the database's mode), without touching the process's umask.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{CryptoStore, OlmMachine, StoreKey};

use super::store_errors::describe;
use super::{DeviceArgs, StoreArgs};

/// The environment variable that may hold the store key (64 hex digits).
pub const STORE_KEY_ENV: &str = "TO_DEVICE_CRYPTO_STORE_KEY";
/// The database file in the store directory.
pub const DB_FILE: &str = "store.sqlite3";
/// The key file in the store directory.
pub const KEY_FILE: &str = "store.key";
/// The store's cross-process lock file (named by `SqliteStore`: the database path + `.lock`),
/// created private with a new store like the database.
const LOCK_FILE: &str = "store.sqlite3.lock";

/// A machine opened on a store directory.
pub struct OpenedMachine {
    pub machine: OlmMachine,
    /// The store itself, for read-only questions the machine does not answer (recovery
    /// attempts, known devices).
    pub store: Arc<SqliteStore>,
}

/// Whether a command may create a store (`keys`, or `--create`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// Only an existing store with a device is opened.
    Refused,
    /// A missing store (directory, key, database, device) is created.
    Allowed {
        /// `--new-identity`: a new device even though `store.key` exists beside a missing or
        /// empty database.
        new_identity: bool,
    },
}

/// What the database file looks like before SQLite opens it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DatabaseFile {
    Missing,
    /// Zero bytes: created but never initialised (e.g. interrupted before SQLite wrote).
    Empty,
    Present,
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

/// The key given explicitly (`--store-key-file`, then the environment), if any.
fn explicit_key(args: &StoreArgs) -> Result<Option<StoreKey>, String> {
    if let Some(path) = &args.store_key_file {
        return read_key_file(path).map(Some);
    }
    match std::env::var(STORE_KEY_ENV) {
        Ok(text) => StoreKey::from_hex(&text)
            .map(Some)
            .ok_or_else(|| format!("${STORE_KEY_ENV} must hold 64 hex digits")),
        Err(_) => Ok(None),
    }
}

/// Creates `store.key` with a new random key, or returns the key another process's first run put
/// there at the same moment: the key is written to a private temporary file and linked into place,
/// so the file either does not exist or holds a whole key, and every concurrent first run ends up
/// with the same one.
fn write_new_key_file(path: &Path) -> Result<StoreKey, String> {
    let key = StoreKey::generate().map_err(|e| e.to_string())?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| e.to_string())?;
    let temporary = path.with_extension(format!("key.{:016x}.tmp", u64::from_ne_bytes(suffix)));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temporary).and_then(|mut file| {
        writeln!(file, "{}", key.to_hex())?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            eprintln!(
                "note: created a random store key in {} (it protects a copied database, not a stolen home folder; pass --store-key-file or ${STORE_KEY_ENV} to manage it yourself)",
                path.display()
            );
            Ok(key)
        }
        // Another first run won the race: its key is whole (linked after it was synced).
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(error) => Err(format!(
            "cannot create the store key file {}: {error}",
            path.display()
        )),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create the store directory {}: {e}", dir.display()))
}

/// Creates an empty file with mode 0600: the database, so that SQLite (which keeps an existing
/// file's mode and gives it to `-wal` and `-shm`) never creates it with the umask's mode.
fn create_private_file(path: &Path) -> Result<(), String> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        // Another first run created it a moment ago, with this same mode.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(format!(
            "cannot create the store file {}: {error}",
            path.display()
        )),
    }
}

/// Warns about a store made before its files were private (older versions took the umask).
#[cfg(unix)]
fn warn_if_shared(path: &Path, what: &str, fix: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {what} {} is accessible to other users (mode {mode:o}); run `{fix}`",
                path.display()
            );
        }
    }
}

fn missing_store(dir: &Path, why: &str) -> String {
    format!(
        "no store at {}: {why}. Only `to-device-crypto keys --store {}` (or --create) creates a \
         store and a new device; check the --store path",
        dir.display(),
        dir.display()
    )
}

/// Opens the device in `args.store`, creating it only when `creation` allows.
pub async fn open_machine(
    args: &StoreArgs,
    device: &DeviceArgs,
    creation: Creation,
) -> Result<OpenedMachine, String> {
    let dir = args.store.as_path();
    let db_path = dir.join(DB_FILE);
    let key_path = dir.join(KEY_FILE);
    let dir_exists = match std::fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => true,
        Ok(_) => return Err(format!("--store {} is not a directory", dir.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            return Err(format!(
                "cannot access the store {}: {error}",
                dir.display()
            ))
        }
    };
    let db_file = match std::fs::metadata(&db_path) {
        Ok(metadata) if metadata.len() == 0 => DatabaseFile::Empty,
        Ok(_) => DatabaseFile::Present,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => DatabaseFile::Missing,
        Err(error) => {
            return Err(format!(
                "cannot access the store database {}: {error}",
                db_path.display()
            ))
        }
    };
    let key_file_exists = key_path.exists();
    let new_identity = matches!(creation, Creation::Allowed { new_identity: true });
    if creation == Creation::Refused {
        match (dir_exists, db_file) {
            (false, _) => return Err(missing_store(dir, "the directory does not exist")),
            (true, DatabaseFile::Missing) => {
                return Err(missing_store(
                    dir,
                    &format!("the directory has no {DB_FILE}"),
                ))
            }
            (true, DatabaseFile::Empty) => {
                return Err(missing_store(dir, &format!("its {DB_FILE} is empty")))
            }
            (true, DatabaseFile::Present) => {}
        }
    }
    // A key file without its database: a deleted or moved database, or the wrong directory. A
    // new identity here would be a new device that no other device knows.
    if key_file_exists && db_file != DatabaseFile::Present && !new_identity {
        return Err(format!(
            "{} exists but {}: this looks like a store whose database was deleted or moved. \
             If the database is elsewhere, point --store at its directory; to start a new device \
             (a new identity other devices do not know yet) with this key, pass --new-identity",
            key_path.display(),
            match db_file {
                DatabaseFile::Missing => format!("{} does not", db_path.display()),
                _ => format!("{} is empty", db_path.display()),
            }
        ));
    }
    let key = match explicit_key(args)? {
        Some(key) => key,
        None if key_file_exists => read_key_file(&key_path)?,
        None if db_file != DatabaseFile::Missing => {
            return Err(format!(
                "{} exists but {} does not: the key that opens this database is missing (the \
                 file was deleted, or the store was made with --store-key-file or \
                 ${STORE_KEY_ENV}). Pass that key with --store-key-file FILE or ${STORE_KEY_ENV}, \
                 or restore the key file; a new random key could not open this database, so none \
                 is created",
                db_path.display(),
                key_path.display()
            ))
        }
        None => {
            create_private_dir(dir)?;
            write_new_key_file(&key_path)?
        }
    };
    if db_file == DatabaseFile::Missing {
        // Only reached when creating: refused above otherwise.
        create_private_dir(dir)?;
        create_private_file(&db_path)?;
        let lock_path = dir.join(LOCK_FILE);
        if !lock_path.exists() {
            create_private_file(&lock_path)?;
        }
    }
    #[cfg(unix)]
    if dir_exists {
        warn_if_shared(
            dir,
            "the store directory",
            &format!("chmod 700 {}", dir.display()),
        );
        warn_if_shared(
            &db_path,
            "the store database",
            &format!("chmod 600 {}*", db_path.display()),
        );
    }
    let store =
        SqliteStore::open(&db_path, key, Synchronous::Normal).map_err(|e| describe(dir, &e))?;
    let existing = store.load_account().await.map_err(|e| describe(dir, &e))?;
    let (user_id, device_id) = match existing {
        Some(account) => {
            if new_identity {
                return Err(format!(
                    "--new-identity: the store {} already holds device {} of {}; move the \
                     directory aside to start a new identity",
                    dir.display(),
                    account.device_id,
                    account.user_id
                ));
            }
            for (given, stored, what) in [
                (&device.user_id, &account.user_id, "user id"),
                (&device.device_id, &account.device_id, "device id"),
            ] {
                if given.as_ref().is_some_and(|given| given != stored) {
                    return Err(format!(
                        "the store in {} belongs to {what} {stored}, not {}",
                        dir.display(),
                        given.as_deref().unwrap_or_default()
                    ));
                }
            }
            (account.user_id, account.device_id)
        }
        None if creation == Creation::Refused => {
            return Err(missing_store(
                dir,
                &format!("its {DB_FILE} holds no device (new or wiped)"),
            ))
        }
        None if key_file_exists && db_file == DatabaseFile::Present && !new_identity => {
            return Err(format!(
                "{} holds no device (new or wiped) while {} exists: to start a new device \
                 (a new identity other devices do not know yet) with this key, pass --new-identity",
                db_path.display(),
                key_path.display()
            ))
        }
        None => (
            device
                .user_id
                .clone()
                .unwrap_or_else(|| DeviceArgs::DEFAULT_USER_ID.to_owned()),
            match &device.device_id {
                Some(device_id) => device_id.clone(),
                None => random_device_id()?,
            },
        ),
    };
    let store = Arc::new(store);
    let machine = OlmMachine::open(&user_id, &device_id, store.clone())
        .await
        .map_err(|e| describe(dir, &e))?;
    Ok(OpenedMachine { machine, store })
}

fn random_device_id() -> Result<String, String> {
    let mut bytes = [0u8; 10];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes.iter().map(|b| char::from(b'A' + b % 26)).collect())
}
