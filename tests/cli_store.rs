//! The CLI's store directory: only `keys` or `--create` makes a store (issue 20, item 7); no new
//! random key beside an existing database, no silent new identity beside an existing key file,
//! private modes whatever the umask (issue 16, item 7); store failures name the store, the cause
//! and what to do (issue 16, item 8).

mod cli_common;

use std::path::Path;

use cli_common::*;
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::StoreKey;

/// Runs the CLI under `umask 000`, so that any mode left to the umask shows up as 0666/0777.
#[cfg(unix)]
fn ok_with_open_umask(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY");
    for (name, value) in env {
        command.env(name, value);
    }
    output_of(command, b"")
}

#[cfg(unix)]
#[test]
fn a_new_store_is_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let bob = dir.path().join("nested/bob");
    let output = ok_with_open_umask(&["keys", "--store", path(&bob)], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bob_keys = dir.path().join("bob-keys.json");
    std::fs::write(&bob_keys, &output.stdout).unwrap();
    assert_eq!(mode(&bob), 0o700, "the store directory");
    assert_eq!(mode(&bob.join("store.sqlite3")), 0o600, "the database");
    assert_eq!(mode(&bob.join("store.key")), 0o600, "the key file");
    assert_eq!(
        mode(&bob.join("store.sqlite3.lock")),
        0o600,
        "the lock file"
    );

    // `encrypt --create` makes a store the same way.
    let alice = dir.path().join("alice");
    let output = ok_with_open_umask(
        &[
            "encrypt",
            "--create",
            "--store",
            path(&alice),
            "--recipient-keys",
            path(&bob_keys),
            "--type",
            "m.room_key",
            "--content",
            "{}",
            "--count",
            "3",
        ],
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(mode(&alice), 0o700);
    assert_eq!(mode(&alice.join("store.sqlite3")), 0o600);
    let events = dir.path().join("events.json");
    std::fs::write(&events, &output.stdout).unwrap();

    // A process killed right after its commit leaves SQLite's -wal and -shm files behind, as
    // SQLite created them: with the database's mode.
    let output = ok_with_open_umask(
        &["decrypt", "--store", path(&bob), path(&events)],
        &[("TDC_FAIL_POINT", "after_commit")],
    );
    assert!(!output.status.success(), "the fail point aborts");
    for file in ["store.sqlite3-wal", "store.sqlite3-shm"] {
        assert_eq!(mode(&bob.join(file)), 0o600, "{file}");
    }
    // And the store still works.
    let out = lines(&ok(&["decrypt", "--store", path(&bob), path(&events)], ""));
    assert!(out.iter().all(|l| l["result"] == "decrypted"), "{out:?}");
}

#[test]
fn a_missing_key_file_beside_a_database_is_refused_and_no_key_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(2, "key");
    let key_file = cast.bob.join("store.key");
    let saved_key = dir.path().join("saved.key");
    std::fs::rename(&key_file, &saved_key).unwrap();
    for args in [
        vec!["decrypt", "--store", path(&cast.bob), "-"],
        vec!["keys", "--store", path(&cast.bob)],
        vec!["info", "--store", path(&cast.bob)],
    ] {
        let stderr = fails(&args, &events);
        assert!(stderr.contains(path(&key_file)), "{args:?}: {stderr}");
        assert!(stderr.contains("--store-key-file"), "{stderr}");
        assert!(!key_file.exists(), "{args:?} left a new key behind");
    }
    // With the right key the store opens as before.
    let out = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--store-key-file",
            path(&saved_key),
            "-",
        ],
        &events,
    ));
    assert!(out.iter().all(|l| l["result"] == "decrypted"), "{out:?}");
    assert!(!key_file.exists());
}

fn curve25519_of(keys_output: &str) -> String {
    let body: serde_json::Value = serde_json::from_str(keys_output).unwrap();
    let keys = body["device_keys"]["keys"].as_object().unwrap();
    keys.iter()
        .find(|(id, _)| id.starts_with("curve25519:"))
        .unwrap()
        .1
        .as_str()
        .unwrap()
        .to_owned()
}

fn remove_database(store: &Path) {
    for file in ["store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm"] {
        let _ = std::fs::remove_file(store.join(file));
    }
}

#[test]
fn a_key_file_without_its_database_does_not_start_a_new_identity_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let first = curve25519_of(&ok(&["keys", "--store", path(&store)], ""));
    let db = store.join("store.sqlite3");

    // The database is gone: refused, and nothing is created.
    remove_database(&store);
    let stderr = fails(&["keys", "--store", path(&store)], "");
    assert!(
        stderr.contains("--new-identity") && stderr.contains(path(&db)),
        "{stderr}"
    );
    assert!(!db.exists());
    let stderr = fails(&["decrypt", "--create", "--store", path(&store)], "[]");
    assert!(stderr.contains("--new-identity"), "{stderr}");
    assert!(!db.exists());

    // An empty (zero-byte) database: the same.
    std::fs::write(&db, b"").unwrap();
    let stderr = fails(&["keys", "--store", path(&store)], "");
    assert!(
        stderr.contains("--new-identity") && stderr.contains("is empty"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

    // Asked for: a new identity with the existing key.
    let key = std::fs::read_to_string(store.join("store.key")).unwrap();
    let second = curve25519_of(&ok(
        &["keys", "--store", path(&store), "--new-identity"],
        "",
    ));
    assert_ne!(first, second, "a new device");
    assert_eq!(
        std::fs::read_to_string(store.join("store.key")).unwrap(),
        key
    );
    // --new-identity never replaces an existing device.
    let stderr = fails(&["keys", "--store", path(&store), "--new-identity"], "");
    assert!(stderr.contains("already holds device"), "{stderr}");

    // A wiped store (logout): the database exists, with no device in it.
    let store_key = StoreKey::from_hex(&key).unwrap();
    SqliteStore::open(&db, store_key, Synchronous::Normal)
        .unwrap()
        .wipe()
        .unwrap();
    let stderr = fails(&["keys", "--store", path(&store)], "");
    assert!(
        stderr.contains("holds no device") && stderr.contains("--new-identity"),
        "{stderr}"
    );
    let stderr = fails(&["decrypt", "--store", path(&store)], "[]");
    assert!(stderr.contains("holds no device"), "{stderr}");
    let third = curve25519_of(&ok(
        &["keys", "--store", path(&store), "--new-identity"],
        "",
    ));
    assert_ne!(third, second);
}

#[test]
fn only_keys_or_create_makes_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(2, "typo");
    let typo = dir.path().join("bbo");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for store in [&typo, &empty] {
        for args in [
            vec!["decrypt", "--store", path(store), "-"],
            vec![
                "encrypt",
                "--store",
                path(store),
                "--recipient-keys",
                path(&cast.bob_keys),
                "--type",
                "m.dummy",
                "--content",
                "{}",
            ],
            vec!["requests", "--store", path(store)],
            vec!["info", "--store", path(store)],
        ] {
            let stderr = fails(&args, &events);
            assert!(
                stderr.contains(&format!("no store at {}", path(store))),
                "{args:?}: {stderr}"
            );
            assert!(stderr.contains("keys --store"), "{stderr}");
            assert!(stderr.contains("--create"), "{stderr}");
        }
    }
    assert!(!typo.exists(), "nothing was created");
    assert!(entries(&empty).is_empty(), "nothing was created");

    // --create on the decrypt side: a new device, which the events were not encrypted for.
    let out = lines(&ok(
        &["decrypt", "--create", "--store", path(&typo), "-"],
        &events,
    ));
    assert!(
        out.iter()
            .all(|l| l["name"] == "ToDeviceFailedToDecrypt_MissingCiphertext"),
        "{out:?}"
    );
    // --new-identity without --create is a usage error.
    let output = run(&["decrypt", "--new-identity", "--store", path(&typo)], "[]");
    assert_eq!(output.status.code(), Some(2));
}

/// Runs the CLI as `nobody` when the tests run as root (root ignores file permissions).
#[cfg(unix)]
fn as_unprivileged(args: &[&str], owned: &Path) -> std::process::Output {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let mut command = command(args);
    if std::fs::metadata(owned).unwrap().uid() == 0 {
        // The binary may sit under a directory nobody cannot enter (/root): run a link (or a copy)
        // of it from the test's directory.
        let bin = owned.parent().unwrap().join("to-device-crypto");
        if std::fs::hard_link(BIN, &bin).is_err() {
            std::fs::copy(BIN, &bin).unwrap();
        }
        command = std::process::Command::new(&bin);
        command.args(args).env_remove("TO_DEVICE_CRYPTO_STORE_KEY");
        const NOBODY: u32 = 65534;
        let mut stack = vec![owned.to_path_buf()];
        while let Some(path) = stack.pop() {
            std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
            if path.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
        }
        // The temporary directory's parents must let nobody through.
        let mut parent = owned.parent();
        while let Some(dir) = parent {
            if dir.starts_with(std::env::temp_dir()) && dir != std::env::temp_dir() {
                use std::os::unix::fs::PermissionsExt;
                let mut permissions = std::fs::metadata(dir).unwrap().permissions();
                permissions.set_mode(permissions.mode() | 0o011);
                std::fs::set_permissions(dir, permissions).unwrap();
            }
            parent = dir.parent();
        }
        command.uid(NOBODY).gid(NOBODY);
    }
    output_of(command, b"")
}

#[cfg(unix)]
#[test]
fn a_read_only_store_is_named_with_the_cause_and_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = dir.path().join("events.json");
    std::fs::write(&events, cast.alice_to_bob(2, "ro")).unwrap();
    let db = cast.bob.join("store.sqlite3");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::fs::set_permissions(&events, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = as_unprivileged(
        &["decrypt", "--store", path(&cast.bob), path(&events)],
        &cast.bob,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(path(&db)), "names the store: {stderr}");
    assert!(
        stderr.contains("attempt to write a readonly database"),
        "the cause: {stderr}"
    );
    assert!(
        stderr.contains("read-only") && stderr.contains("write access"),
        "what to do: {stderr}"
    );
}

#[test]
fn a_damaged_database_is_named_with_the_cause_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(2, "damaged");
    let db = cast.bob.join("store.sqlite3");
    let pristine = std::fs::read(&db).unwrap();

    // Pages after the first overwritten: SQLite's "database disk image is malformed".
    let mut damaged = pristine.clone();
    damaged[4096..4096 * 4].fill(0xff);
    std::fs::write(&db, &damaged).unwrap();
    let stderr = fails(&["decrypt", "--store", path(&cast.bob), "-"], &events);
    assert!(stderr.contains(path(&db)), "{stderr}");
    assert!(
        stderr.contains("database disk image is malformed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("damaged") && stderr.contains("from a backup"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), damaged, "nothing was written");

    // A header that is not SQLite's.
    let mut not_sqlite = pristine;
    not_sqlite[..100].fill(0x17);
    std::fs::write(&db, &not_sqlite).unwrap();
    let stderr = fails(&["info", "--store", path(&cast.bob)], "");
    assert!(stderr.contains(path(&cast.bob)), "{stderr}");
    assert!(stderr.contains("not a SQLite database"), "{stderr}");
    assert!(
        stderr.contains("damaged") && stderr.contains("from a backup"),
        "{stderr}"
    );
}
