//! Store failures as the CLI reports them: which store, what happened, what to do. SQLite's own
//! words ("attempt to write a readonly database", "database disk image is malformed") are kept in
//! the message, after an explanation an engineer can act on.

use std::fmt::Display;
use std::path::Path;

use rusqlite::ErrorCode;
use to_device_crypto::requests::RequestError;
use to_device_crypto::{EncryptionError, KeysError, OpenError, StoreError};

use super::store_dir::{DB_FILE, KEY_FILE, STORE_KEY_ENV};

/// An error that may wrap a [`StoreError`], which then gets the store's context.
pub trait MaybeStoreError: Display {
    /// The store failure inside, if this is one.
    fn store_error(&self) -> Option<&StoreError>;
}

impl MaybeStoreError for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

impl MaybeStoreError for OpenError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            OpenError::Store(error) => Some(error),
            _ => None,
        }
    }
}

impl MaybeStoreError for KeysError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            KeysError::Store(error) => Some(error),
            _ => None,
        }
    }
}

impl MaybeStoreError for EncryptionError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            EncryptionError::Store(error) => Some(error),
            _ => None,
        }
    }
}

impl MaybeStoreError for RequestError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            RequestError::Store(error) => Some(error),
            _ => None,
        }
    }
}

/// `error` as a message: store failures name the store in `store_dir`, say what happened and
/// what to do; other errors keep their own message.
pub fn describe(store_dir: &Path, error: &impl MaybeStoreError) -> String {
    match error.store_error() {
        Some(store_error) => describe_store_error(store_dir, store_error),
        None => error.to_string(),
    }
}

/// The message for one store failure.
pub fn describe_store_error(store_dir: &Path, error: &StoreError) -> String {
    let db = store_dir.join(DB_FILE);
    let db = db.display();
    let dir = store_dir.display();
    match error {
        StoreError::Sqlite(sqlite) => match sqlite.sqlite_error_code() {
            Some(ErrorCode::ReadOnly) => format!(
                "the store database {db} is read-only for this process (SQLite: {sqlite}); nothing \
                 was changed. Give the user running to-device-crypto write access to the database, \
                 its -wal and -shm files and the directory {dir} (check with `ls -la {dir}`), and \
                 make sure the file system is not mounted read-only"
            ),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => format!(
                "the store database {db} is busy: another process kept it locked for longer than \
                 SQLite waits (SQLite: {sqlite}); nothing of this operation was committed. Wait for \
                 the other process using this store (another to-device-crypto, or the app) to \
                 finish, then run the command again"
            ),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => damaged(
                store_dir,
                &format!("the store database {db} is damaged (SQLite: {sqlite})"),
            ),
            Some(ErrorCode::DiskFull) => format!(
                "the disk holding the store {dir} is full (SQLite: {sqlite}); nothing of this \
                 operation was committed. Free some space (check with `df -h {dir}`), then run the \
                 same command with the same input again"
            ),
            Some(ErrorCode::CannotOpen) => format!(
                "cannot open the store database {db} (SQLite: {sqlite}). Check that {dir} is a \
                 directory this user can read, write and enter, and that {db} is a file"
            ),
            Some(ErrorCode::PermissionDenied) => format!(
                "access to the store database {db} was denied (SQLite: {sqlite}). Check the \
                 permissions of {dir} and its files"
            ),
            Some(ErrorCode::SystemIoFailure) => format!(
                "an I/O error occurred on the store database {db} (SQLite: {sqlite}); nothing of \
                 this operation was committed. Check the disk and the file system (kernel log, \
                 `df -h {dir}`), then run the command again"
            ),
            Some(ErrorCode::OutOfMemory) => format!(
                "SQLite ran out of memory on the store {db} (SQLite: {sqlite}); nothing of this \
                 operation was committed. Free memory or pass a smaller input"
            ),
            _ => format!("SQLite failed on the store database {db}: {sqlite}"),
        },
        StoreError::Corrupted { .. } => damaged(
            store_dir,
            &format!("the store {dir} is damaged: {error}"),
        ),
        StoreError::Io(io) => match io.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot create or lock the store's files in {dir} ({io}): give the user running \
                 to-device-crypto write access to {dir}"
            ),
            std::io::ErrorKind::TimedOut => format!(
                "the store {dir} is in use: {io}. Wait for the other process using this store \
                 (another to-device-crypto, or the app) to finish, then run the command again"
            ),
            std::io::ErrorKind::StorageFull => format!(
                "the disk holding the store {dir} is full ({io}); nothing of this operation was \
                 committed. Free some space, then run the command again"
            ),
            _ => format!("I/O error on the store {dir}: {io}"),
        },
        StoreError::WrongStoreKey => format!(
            "{error} (store {dir}). Pass the key it was created with: --store-key-file FILE, \
             ${STORE_KEY_ENV}, or {}",
            store_dir.join(KEY_FILE).display()
        ),
        StoreError::NewerSchema { .. } => format!(
            "cannot open the store {dir}: {error} (this is to-device-crypto {})",
            env!("CARGO_PKG_VERSION")
        ),
        _ => format!("the store {dir} failed: {error}"),
    }
}

/// A damaged store: what happened, and what to do without losing evidence.
fn damaged(store_dir: &Path, what: &str) -> String {
    let dir = store_dir.display();
    format!(
        "{what}; nothing was written. Keep a copy of {dir} for investigation (`sqlite3 {} \
         'PRAGMA integrity_check'` shows the damage), then restore {dir} from a backup, or move it \
         aside and create a new device with `to-device-crypto keys --store {dir}` (its Olm \
         sessions are lost: senders need new sessions with the new device)",
        store_dir.join(DB_FILE).display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure as rusqlite reports it: the code and SQLite's own message for it.
    fn sqlite(code: i32) -> StoreError {
        // SAFETY: sqlite3_errstr returns a static, NUL-terminated English string for any code.
        let message = unsafe { std::ffi::CStr::from_ptr(rusqlite::ffi::sqlite3_errstr(code)) };
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some(message.to_string_lossy().into_owned()),
        ))
    }

    /// Every mapped failure names the store, keeps SQLite's words and says what to do.
    #[test]
    fn sqlite_failures_name_the_store_the_cause_and_what_to_do() {
        let dir = Path::new("/data/bob-store");
        let cases = [
            (
                sqlite(rusqlite::ffi::SQLITE_READONLY),
                "attempt to write a readonly database",
                "write access",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_BUSY),
                "database is locked",
                "run the command again",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_CORRUPT),
                "database disk image is malformed",
                "restore /data/bob-store from a backup",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_NOTADB),
                "file is not a database",
                "restore /data/bob-store from a backup",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_FULL),
                "database or disk is full",
                "Free some space",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_CANTOPEN),
                "unable to open database file",
                "can read, write and enter",
            ),
            (
                sqlite(rusqlite::ffi::SQLITE_IOERR),
                "disk I/O error",
                "Check the disk",
            ),
            (
                StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "another process held the store's write lock for over 30 s",
                )),
                "write lock for over 30 s",
                "Wait for the other process",
            ),
            (
                StoreError::Corrupted {
                    what: "session pickle",
                    detail: "bad".to_owned(),
                },
                "session pickle",
                "restore /data/bob-store from a backup",
            ),
            (
                StoreError::WrongStoreKey,
                "store key does not match",
                "--store-key-file",
            ),
        ];
        for (error, cause, advice) in cases {
            let message = describe_store_error(dir, &error);
            assert!(message.contains("/data/bob-store"), "{message}");
            assert!(message.contains(cause), "{message}");
            assert!(message.contains(advice), "{message}");
        }
        let message = describe_store_error(dir, &sqlite(rusqlite::ffi::SQLITE_READONLY));
        assert!(
            message.contains("/data/bob-store/store.sqlite3"),
            "{message}"
        );
    }

    #[test]
    fn other_errors_keep_their_message() {
        let error = KeysError::InvalidBody {
            what: "keys query",
            detail: "oops".to_owned(),
        };
        assert_eq!(describe(Path::new("/x"), &error), error.to_string());
        let wrapped = KeysError::Store(sqlite(rusqlite::ffi::SQLITE_FULL));
        assert!(describe(Path::new("/x"), &wrapped).contains("Free some space"));
    }
}
