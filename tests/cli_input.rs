//! `decrypt` reads a bounded input (issue 16, item 6): a file's length is checked before it is
//! read, stdin and devices are read up to the limit and refused one byte past it, and the error
//! names the limit and `--max-input-bytes`. The input stays one batch in one transaction.

mod cli_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cli_common::*;

fn assert_names_the_limit(stderr: &str, limit: &str) {
    assert!(stderr.contains(limit), "{stderr}");
    assert!(stderr.contains("--max-input-bytes"), "{stderr}");
}

#[test]
fn a_file_over_the_limit_is_refused_before_the_store_is_opened_and_one_at_the_limit_is_decrypted() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(10, "limit");
    let input = dir.path().join("events.json");
    std::fs::write(&input, &events).unwrap();
    let size = events.len();
    let entries_before = entries(&cast.bob);

    let too_small = (size - 1).to_string();
    let stderr = fails(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--max-input-bytes",
            &too_small,
            path(&input),
        ],
        "",
    );
    assert_names_the_limit(&stderr, &format!("{too_small} bytes"));
    assert!(
        stderr.contains(&format!("({size} bytes)")),
        "the file's size: {stderr}"
    );
    assert!(stderr.contains(path(&input)), "{stderr}");
    assert_eq!(
        entries(&cast.bob),
        entries_before,
        "the store was not opened"
    );

    // Exactly at the limit: one batch, every event decrypted.
    let out = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--max-input-bytes",
            &size.to_string(),
            path(&input),
        ],
        "",
    ));
    assert_eq!(out.len(), 10);
    assert!(
        out.iter().all(|line| line["result"] == "decrypted"),
        "{out:?}"
    );
}

#[test]
fn stdin_is_read_up_to_the_limit_and_refused_one_byte_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(5, "stdin");
    let limit = events.len().to_string();
    let longer = format!("{events} ");
    let stderr = fails(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--max-input-bytes",
            &limit,
            "-",
        ],
        &longer,
    );
    assert_names_the_limit(&stderr, &format!("{limit} bytes"));
    assert!(stderr.contains("stdin"), "{stderr}");

    // Far more than the limit (the CLI stops reading; the writer sees a closed pipe).
    let flood = "[".to_owned() + &"{}, ".repeat(1 << 20);
    let stderr = fails(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--max-input-bytes",
            "64K",
        ],
        &flood,
    );
    assert_names_the_limit(&stderr, "64 KiB (65536 bytes)");

    let out = lines(&ok(
        &[
            "decrypt",
            "--store",
            path(&cast.bob),
            "--max-input-bytes",
            &limit,
        ],
        &events,
    ));
    assert_eq!(out.len(), 5);
}

/// Runs `decrypt` with `args` under a 1 GiB address-space limit, so that a regression fails here
/// instead of exhausting the machine's memory; fails the test if it runs for over two minutes.
#[cfg(target_os = "linux")]
fn decrypt_bounded_in_memory(args: &str) -> std::process::Output {
    let started = Instant::now();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v 1048576 && exec {BIN} decrypt {args}"))
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            child.kill().unwrap();
            panic!("decrypt {args} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `/dev/zero` never ends: with the default limit the CLI stops after 64 MiB and says so, fast
/// and without growing, whether it is the input file, stdin, or a JSON file given to an option.
#[cfg(target_os = "linux")]
#[test]
fn an_endless_input_fails_fast_at_the_default_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let output = decrypt_bounded_in_memory(&format!("--store {} /dev/zero", path(&cast.bob)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_names_the_limit(&stderr, "64 MiB (67108864 bytes)");
    assert!(stderr.contains("/dev/zero"), "{stderr}");
    assert!(output.stdout.is_empty());

    let output = decrypt_bounded_in_memory(&format!("--store {} - < /dev/zero", path(&cast.bob)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stdin is larger than the limit of 64 MiB"),
        "{stderr}"
    );

    let no_events = dir.path().join("no-events.json");
    std::fs::write(&no_events, "[]").unwrap();
    let output = decrypt_bounded_in_memory(&format!(
        "--store {} --device-keys /dev/zero {}",
        path(&cast.bob),
        path(&no_events)
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("64 MiB (67108864 bytes)") && stderr.contains("/dev/zero"),
        "{stderr}"
    );
}

#[test]
fn the_limit_flag_rejects_nonsense_as_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "12MB", "lots"] {
        let output = run(
            &[
                "decrypt",
                "--store",
                path(dir.path()),
                "--max-input-bytes",
                bad,
            ],
            "[]",
        );
        assert_eq!(output.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--max-input-bytes"), "{stderr}");
    }
}
