//! Command-line interface: argument parsing and the `keys`, `decrypt`, `encrypt` and `schema`
//! commands. The `demo` scenario lives in [`demo`].

mod demo;
mod store_dir;
// Shared with the library's `testing` feature (the fuzz target and the limit tests reach it there).
#[path = "../sync_input.rs"]
mod sync_input;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use sync_input::split_events;
#[cfg(feature = "testing")]
use to_device_crypto::fail_point::Phase;
use to_device_crypto::keys::parse_keys_upload_body;
use to_device_crypto::{DecryptedToDeviceEvent, OlmMachine, ToDeviceOutcome};

/// Decrypt Matrix Olm to-device events and report every failure as a PostHog `Error` event.
#[derive(Parser)]
#[command(name = "to-device-crypto", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a realistic in-process scenario and print the PostHog events it produces (stdout),
    /// with a summary table on stderr.
    Demo,
    /// Create the device on first use, print the /keys/upload body with all unpublished keys,
    /// and mark them published.
    Keys {
        #[command(flatten)]
        store: StoreArgs,
        /// How many one-time keys to generate besides those not yet published (default: 0; a new
        /// device starts with 25 and a fallback key).
        #[arg(long)]
        one_time_keys: Option<usize>,
    },
    /// Decrypt to-device events: a JSON array, a /sync response or JSON lines (file or `-`).
    Decrypt {
        #[command(flatten)]
        store: StoreArgs,
        /// A /keys/query response body with the senders' device keys.
        #[arg(long)]
        device_keys: Option<PathBuf>,
        /// Append the PostHog events of failures (those that pass the reporting policy) to this
        /// file, one JSON object per line.
        #[arg(long)]
        analytics_out: Option<PathBuf>,
        /// Write every still-unsent outgoing request (e.g. session recovery) to this file, one
        /// JSON object per line.
        #[arg(long)]
        requests_out: Option<PathBuf>,
        /// The input file; `-` or nothing reads stdin.
        input: Option<PathBuf>,
    },
    /// List the unsent outgoing requests (JSON lines), or mark one as sent, feeding the server's
    /// response back.
    Requests {
        #[command(flatten)]
        store: StoreArgs,
        /// The request to mark as sent.
        #[arg(long)]
        mark_sent: Option<String>,
        /// The server's response body (required for keys_claim requests).
        #[arg(long, requires = "mark_sent")]
        response: Option<PathBuf>,
    },
    /// Encrypt events for the device whose /keys/upload body is in KEYS.json; prints a JSON array
    /// of /sync-shaped to-device events.
    Encrypt {
        #[command(flatten)]
        store: StoreArgs,
        /// The recipient's /keys/upload body (device keys and one-time keys).
        #[arg(long)]
        recipient_keys: PathBuf,
        /// The event type, e.g. m.room_key.
        #[arg(long = "type")]
        event_type: String,
        /// The event content, a JSON object.
        #[arg(long)]
        content: String,
        /// Encrypt N events whose content gets "seq": 0..N-1.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print the JSON Schema of the PostHog payload.
    Schema,
}

/// Where the device lives.
#[derive(clap::Args)]
struct StoreArgs {
    /// The store directory (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// The user id, required only when the store is new (default @cli-user:localhost).
    #[arg(long)]
    user_id: Option<String>,
    /// The device id, required only when the store is new (default: random).
    #[arg(long)]
    device_id: Option<String>,
    /// A file holding the 32-byte store key as 64 hex digits (else $TO_DEVICE_CRYPTO_STORE_KEY,
    /// else `<store>/store.key`, created on first use).
    #[arg(long)]
    store_key_file: Option<PathBuf>,
}

type CliResult = Result<(), String>;

/// Parses the arguments and runs the command; errors go to stderr with exit code 1.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo => demo::run().await,
            Command::Keys {
                store,
                one_time_keys,
            } => keys(store, one_time_keys).await,
            Command::Decrypt {
                store,
                device_keys,
                analytics_out,
                requests_out,
                input,
            } => decrypt(store, device_keys, analytics_out, requests_out, input).await,
            Command::Requests {
                store,
                mark_sent,
                response,
            } => requests(store, mark_sent, response).await,
            Command::Encrypt {
                store,
                recipient_keys,
                event_type,
                content,
                count,
            } => encrypt(store, recipient_keys, event_type, content, count).await,
            Command::Schema => {
                print!(
                    "{}",
                    to_device_crypto::analytics::schema::payload_json_schema_text()
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read_json_file(path: &PathBuf, what: &str) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{what} {} is not JSON: {e}", path.display()))
}

fn print_line(value: &Value) -> CliResult {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{value}").map_err(|e| format!("cannot write to stdout: {e}"))
}

async fn keys(args: StoreArgs, one_time_keys: Option<usize>) -> CliResult {
    // A new device already holds its first 25 one-time keys (`new_account`), as everywhere else.
    let machine = store_dir::open_machine(&args).await?.machine;
    let count = one_time_keys.unwrap_or(0);
    machine
        .generate_one_time_keys(count)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = machine.keys_for_upload().await.unwrap_or_else(|| json!({}));
    // The CLI's keys file is what another device's `encrypt` reads: always include the device
    // keys, even once they are published.
    if body.get("device_keys").is_none() {
        body["device_keys"] = machine.device_keys().await;
    }
    print_line(&body)?;
    machine
        .mark_keys_as_published()
        .await
        .map_err(|e| e.to_string())
}

async fn decrypt(
    args: StoreArgs,
    device_keys: Option<PathBuf>,
    analytics_out: Option<PathBuf>,
    requests_out: Option<PathBuf>,
    input: Option<PathBuf>,
) -> CliResult {
    let text = match input.as_ref().filter(|p| p.as_os_str() != "-") {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read input {}: {e}", path.display()))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            text
        }
    };
    let input = split_events(&text).map_err(|e| e.to_string())?;
    let machine = store_dir::open_machine(&args).await?.machine;
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Opened);
    if let Some(path) = device_keys {
        let body = read_json_file(&path, "device keys")?;
        let outcome = machine
            .receive_keys_query_response(&body)
            .await
            .map_err(|e| e.to_string())?;
        for rejected in outcome.rejected {
            eprintln!("warning: ignoring device keys {rejected}");
        }
    }
    // Results of earlier batches that were never acknowledged (the previous run was killed after
    // committing): print them first, marked as pending, with their original batch and index.
    let earlier = machine
        .pending_decrypted_events()
        .await
        .map_err(|e| e.to_string())?;
    let mut printed: Vec<String> = Vec::new();
    for pending in &earlier {
        let mut line = decrypted_line(pending.index, &pending.event);
        line["batch"] = json!(pending.batch);
        print_line(&line)?;
        printed.push(pending.event.id.clone());
    }
    let mut failures = machine.to_device_decryption_failure_stream();
    let outcomes = machine
        .receive_sync(&input.events, input.next_batch.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    for (index, outcome) in outcomes.iter().enumerate() {
        print_line(&outcome_line(index as u64, outcome))?;
        if let ToDeviceOutcome::Decrypted(event) = outcome {
            printed.push(event.id.clone());
        }
    }
    std::io::stdout()
        .flush()
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Printed);
    machine
        .acknowledge(&printed)
        .await
        .map_err(|e| e.to_string())?;
    #[cfg(feature = "testing")]
    to_device_crypto::fail_point::reached(Phase::Acknowledged);
    if let Some(path) = analytics_out {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        while let Some(Some(item)) = failures.next().now_or_never() {
            let item = item.map_err(|e| e.to_string())?;
            // Only what passes the reporting policy is an analytics event.
            if let Some(payload) = item.payload() {
                writeln!(file, "{}", payload.to_json())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
        }
    }
    if let Some(path) = requests_out {
        write_requests(
            &machine,
            &mut std::fs::File::create(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        )
        .await?;
    }
    Ok(())
}

async fn write_requests(machine: &OlmMachine, out: &mut impl Write) -> CliResult {
    for request in machine
        .outgoing_requests()
        .await
        .map_err(|e| e.to_string())?
    {
        let line = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        writeln!(out, "{line}").map_err(|e| format!("cannot write the requests: {e}"))?;
    }
    Ok(())
}

async fn requests(
    args: StoreArgs,
    mark_sent: Option<String>,
    response: Option<PathBuf>,
) -> CliResult {
    let machine = store_dir::open_machine(&args).await?.machine;
    match mark_sent {
        Some(request_id) => {
            let response = response
                .map(|path| read_json_file(&path, "response"))
                .transpose()?;
            machine
                .mark_request_as_sent(&request_id, response.as_ref())
                .await
                .map_err(|e| e.to_string())
        }
        None => write_requests(&machine, &mut std::io::stdout().lock()).await,
    }
}

fn decrypted_line(index: u64, event: &DecryptedToDeviceEvent) -> Value {
    let mut line = json!({
        "index": index,
        "result": "decrypted",
        "type": event.event_type,
        "sender": event.sender,
        "content": event.content,
        "sender_key": event.sender_curve25519_key,
        "sender_device_id": event.sender_device_id,
        "sender_device_verified": event.sender_device_verified,
    });
    if event.re_emitted {
        line["pending"] = json!(true);
    }
    line
}

fn outcome_line(index: u64, outcome: &ToDeviceOutcome) -> Value {
    match outcome {
        ToDeviceOutcome::Decrypted(event) => decrypted_line(index, event),
        ToDeviceOutcome::Plaintext(event) => json!({
            "index": index,
            "result": "plaintext",
            "type": event.get("type"),
            "sender": event.get("sender"),
            "content": event.get("content"),
        }),
        ToDeviceOutcome::Failed(failed) => json!({
            "index": index,
            "result": "failed",
            "name": failed.error.reason().analytics_name(),
            "error": failed.error.to_string(),
        }),
    }
}

async fn encrypt(
    args: StoreArgs,
    recipient_keys: PathBuf,
    event_type: String,
    content: String,
    count: Option<usize>,
) -> CliResult {
    let keys = read_json_file(&recipient_keys, "recipient keys")?;
    let recipient = parse_keys_upload_body(&keys)
        .map_err(|e| format!("invalid recipient keys {}: {e}", recipient_keys.display()))?;
    let content: Value =
        serde_json::from_str(&content).map_err(|e| format!("--content is not JSON: {e}"))?;
    let contents: Vec<Value> = match count {
        None => vec![content],
        Some(n) => (0..n)
            .map(|seq| {
                let mut content = content.clone();
                if let Some(object) = content.as_object_mut() {
                    object.insert("seq".to_owned(), json!(seq));
                }
                content
            })
            .collect(),
    };
    let machine: OlmMachine = store_dir::open_machine(&args).await?.machine;
    let events = machine
        .encrypt(&recipient, &event_type, &contents)
        .await
        .map_err(|e| e.to_string())?;
    print_line(&Value::Array(events))
}
