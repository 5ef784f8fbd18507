//! `decrypt` prints results with their outbox id, every input gets exactly one line, and the
//! block of earlier pending results leaves out those an input of this run prints again (issue 16,
//! item 9: a batch re-fed after a failed acknowledgement printed 800 lines for 400 events).

mod cli_common;

use std::collections::HashSet;

use cli_common::*;
use serde_json::Value;

/// Bob decrypts `input` and is killed after printing, before acknowledging: what it printed.
fn decrypt_without_acknowledging(cast: &Cast, input: &str) -> Vec<Value> {
    let mut command = command(&["decrypt", "--store", path(&cast.bob), "-"]);
    command.env("TDC_FAIL_POINT", "after_print");
    let output = output_of(command, input.as_bytes());
    assert!(!output.status.success(), "the fail point aborts");
    lines(&String::from_utf8(output.stdout).unwrap())
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            line["id"]
                .as_str()
                .expect("every decrypted line has an id")
                .to_owned()
        })
        .collect()
}

#[test]
fn a_batch_refed_after_a_failed_acknowledgement_prints_one_line_per_event_with_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let events = cast.alice_to_bob(40, "refed");

    let first = decrypt_without_acknowledging(&cast, &events);
    assert_eq!(first.len(), 40);
    assert!(
        first
            .iter()
            .all(|l| l["result"] == "decrypted" && l["pending"] == false),
        "{first:?}"
    );
    let first_ids = ids(&first);
    assert_eq!(
        first_ids.iter().collect::<HashSet<_>>().len(),
        40,
        "ids are distinct"
    );

    // The same batch again: one line per input, each the pending result with its id.
    let again = cast.bob_decrypts(&events, &[]);
    assert_eq!(again.len(), 40, "{again:?}");
    assert_eq!(ids(&again), first_ids);
    for (index, line) in again.iter().enumerate() {
        assert_eq!(line["index"], index);
        assert_eq!(line["pending"], true);
        assert!(line.get("batch").is_none(), "an input of this run: {line}");
        assert_eq!(line["content"], first[index]["content"]);
    }

    // Acknowledged by that run: a third delivery is a replay.
    let third = cast.bob_decrypts(&events, &[]);
    assert_eq!(third.len(), 40);
    assert!(third
        .iter()
        .all(|l| l["name"] == "ToDeviceFailedToDecrypt_ReplayedMessage"));
}

#[test]
fn earlier_pending_results_are_printed_first_unless_an_input_of_this_run_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let cast = Cast::new(dir.path());
    let batch_a: Vec<Value> = serde_json::from_str(&cast.alice_to_bob(10, "a")).unwrap();
    let printed_a =
        decrypt_without_acknowledging(&cast, &Value::Array(batch_a.clone()).to_string());
    let ids_a = ids(&printed_a);

    // The next run gets half of batch A again and five new events.
    let new_events: Vec<Value> = serde_json::from_str(&cast.alice_to_bob(5, "c")).unwrap();
    let mut batch_b = batch_a[..5].to_vec();
    batch_b.extend(new_events);
    let out = cast.bob_decrypts(&Value::Array(batch_b).to_string(), &[]);
    assert_eq!(out.len(), 5 + 10, "{out:#?}");

    // First the pending results no input of this run matches (A's second half), with their
    // original batch and index...
    for (line, original) in out[..5].iter().zip(&printed_a[5..]) {
        assert_eq!(line["pending"], true);
        assert_eq!(line["id"], original["id"]);
        assert_eq!(line["index"], original["index"]);
        assert!(line["batch"].is_u64(), "{line}");
    }
    // ...then one line per input: A's first half re-emitted with their ids, then the new ones.
    let inputs = &out[5..];
    for (index, line) in inputs.iter().enumerate() {
        assert_eq!(line["index"], index);
        assert!(line.get("batch").is_none());
    }
    assert_eq!(ids(&inputs[..5]), ids_a[..5]);
    assert!(inputs[..5].iter().all(|l| l["pending"] == true));
    assert!(inputs[5..]
        .iter()
        .all(|l| l["pending"] == false && l["content"]["tag"] == "c"));

    // Everything printed was acknowledged: nothing is pending any more.
    let info: Value =
        serde_json::from_str(&ok(&["info", "--json", "--store", path(&cast.bob)], "")).unwrap();
    assert_eq!(info["pending_results"], serde_json::json!([]));
    let empty = cast.bob_decrypts("[]", &[]);
    assert!(empty.is_empty(), "{empty:?}");
}
