//! Two processes, one store: the app and the iOS notification extension decrypt interleaved
//! batches for the same device. The cross-process lock and the generation counter make each
//! process reload state another process wrote, so no ratchet step is lost and no session breaks.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{json, Value};
use to_device_crypto::simulator::{publish_machine_keys, recipient_of, Recipient, SimulatedDevice};
use to_device_crypto::store::{SqliteStore, Synchronous};
use to_device_crypto::{OlmMachine, StoreKey, ToDeviceOutcome};

const BIN: &str = env!("CARGO_BIN_EXE_to-device-crypto");

fn batch(
    senders: &mut [SimulatedDevice],
    to: &Recipient,
    first_seq: u64,
    size: usize,
) -> Vec<String> {
    (0..size)
        .map(|i| {
            let n = senders.len();
            senders[i % n]
                .encrypt(to, "m.room_key", json!({"seq": first_seq + i as u64}))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn two_long_lived_machines_on_one_store_never_use_a_stale_ratchet() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let open = || async {
        let store = SqliteStore::open(
            dir.path().join("shared.sqlite3"),
            key.clone(),
            Synchronous::Normal,
        )
        .unwrap();
        OlmMachine::open("@bob:example.org", "BOBPHONE", Arc::new(store))
            .await
            .unwrap()
    };
    let app = open().await;
    let extension = open().await;
    let keys = publish_machine_keys(&app, 3).await.unwrap();
    let to_bob = recipient_of(&app);
    let mut senders: Vec<SimulatedDevice> = (0..3)
        .map(|i| {
            let mut sender = SimulatedDevice::new(&format!("@s{i}:example.org"), "DEV");
            sender.create_session(&keys, Some(keys.one_time_keys[i].key));
            sender
        })
        .collect();
    let mut seq = 0;
    for round in 0..20 {
        // Alternate: each machine's cached sessions are stale after the other one's batch.
        let machine = if round % 2 == 0 { &app } else { &extension };
        let events = batch(&mut senders, &to_bob, seq, 15);
        seq += 15;
        for outcome in machine.receive_to_device_events(&events).await.unwrap() {
            assert!(
                matches!(outcome, ToDeviceOutcome::Decrypted(_)),
                "round {round}: {outcome:?}"
            );
        }
        if round == 5 {
            // The extension replies: that advances the ratchets, and the senders' next messages
            // need the extension's new ratchet keys, which the app's cache does not have.
            for sender in &mut senders {
                let reply = machine
                    .encrypt(&sender.published_keys(), "m.dummy", &[json!({})])
                    .await
                    .unwrap();
                sender
                    .decrypt(&reply[0])
                    .expect("the sender decrypts the reply");
            }
        }
    }
}

fn decrypt_process(store: &Path, input: &Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "decrypt",
            "--store",
            store.to_str().unwrap(),
            input.to_str().unwrap(),
        ])
        .env_remove("TO_DEVICE_CRYPTO_STORE_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_real_processes_decrypt_interleaved_batches_for_the_same_device() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob");
    let (to_bob, mut senders) = common::cli_bob_with_senders(BIN, &store, 4);
    let mut delivered = std::collections::BTreeSet::new();
    let mut seq = 0;
    for round in 0..10 {
        // Two batches from the same senders (same sessions), decrypted at the same time by two
        // processes: the app and the notification extension.
        let inputs: Vec<_> = (0..2)
            .map(|half| {
                let events = batch(&mut senders, &to_bob, seq, 40);
                seq += 40;
                let path = dir.path().join(format!("round-{round}-{half}.json"));
                std::fs::write(&path, format!("[{}]", events.join(","))).unwrap();
                path
            })
            .collect();
        let children: Vec<_> = inputs
            .iter()
            .map(|input| decrypt_process(&store, input))
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            for line in String::from_utf8(output.stdout).unwrap().lines() {
                let line: Value = serde_json::from_str(line).unwrap();
                assert_eq!(line["result"], "decrypted", "round {round}: {line}");
                delivered.insert(line["content"]["seq"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(delivered.len() as u64, seq, "every message delivered");
}
