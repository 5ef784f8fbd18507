//! Command-line interface: argument parsing and the `keys`, `decrypt`, `encrypt` and `schema`
//! commands. The `demo` scenario lives in [`demo`].

mod demo;
mod store_dir;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use to_device_crypto::olm::device_keys::parse_keys_upload_body;
use to_device_crypto::sync_input::split_events;
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
    // Analytics first: payloads earlier runs left undelivered (killed after their commit), then
    // this batch's, each written and flushed before it is acknowledged (see `AnalyticsOut`). The
    // leftovers go out before the batch, so that however long the batch takes, no claim of this
    // run outlives its lease before its payloads are on disk.
    let mut analytics = analytics_out.map(AnalyticsOut::open).transpose()?;
    if let Some(out) = &mut analytics {
        machine.set_analytics_lease(cli_analytics_lease());
        let leftovers = machine
            .flush_pending_analytics()
            .await
            .map_err(|e| e.to_string())?;
        out.append(&leftovers)?;
        out.deliver(&machine).await?;
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
    let outcomes = machine
        .receive_sync(&input.events, input.next_batch.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(out) = &mut analytics {
        // This batch's payloads, claimed by this run when they were committed (and any that
        // another process abandoned meanwhile). Read from the store, not from the failure stream,
        // so a batch of any size writes every payload the policy allowed.
        let batch_payloads = machine
            .flush_pending_analytics()
            .await
            .map_err(|e| e.to_string())?;
        out.append(&batch_payloads)?;
        out.deliver(&machine).await?;
    }
    for (index, outcome) in outcomes.iter().enumerate() {
        print_line(&outcome_line(index as u64, outcome))?;
        if let ToDeviceOutcome::Decrypted(event) = outcome {
            printed.push(event.id.clone());
        }
    }
    std::io::stdout()
        .flush()
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    to_device_crypto::fail_point::hit("after_print");
    machine
        .acknowledge(&printed)
        .await
        .map_err(|e| e.to_string())?;
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

/// The environment variable that sets how long (ms) a `decrypt` run's claim on the payloads it
/// writes holds; for tests that must see a killed run's payloads again without waiting.
const ANALYTICS_LEASE_ENV: &str = "TO_DEVICE_CRYPTO_ANALYTICS_LEASE_MS";

/// A `decrypt` run writes its payloads within moments of committing them, so its claim needs far
/// less than the library's default lease: a run killed before writing leaves them to the runs
/// that start 10 s later.
fn cli_analytics_lease() -> std::time::Duration {
    let millis = std::env::var(ANALYTICS_LEASE_ENV)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(10_000);
    std::time::Duration::from_millis(millis)
}

/// `--analytics-out`: payloads are appended as they are claimed, and [`AnalyticsOut::deliver`]
/// flushes the file to disk and only then acknowledges them, so a kill at any point loses none
/// (at worst, a kill between the flush and the acknowledgement writes a payload twice).
struct AnalyticsOut {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// Appended, not yet acknowledged.
    written: Vec<to_device_crypto::AnalyticsPayloadId>,
    /// Everything appended by this run (a second claim returns this run's own claims again).
    appended: std::collections::HashSet<to_device_crypto::AnalyticsPayloadId>,
}

impl AnalyticsOut {
    fn open(path: PathBuf) -> Result<Self, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Self {
            path,
            file: std::io::BufWriter::new(file),
            written: Vec::new(),
            appended: std::collections::HashSet::new(),
        })
    }

    fn append(&mut self, payloads: &[to_device_crypto::PendingAnalyticsEvent]) -> CliResult {
        for payload in payloads {
            if !self.appended.insert(payload.id) {
                continue; // claimed again by the second flush of this run
            }
            writeln!(self.file, "{}", payload.event.to_json())
                .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
            self.written.push(payload.id);
        }
        Ok(())
    }

    async fn deliver(&mut self, machine: &OlmMachine) -> CliResult {
        if self.written.is_empty() {
            return Ok(());
        }
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        to_device_crypto::fail_point::hit("analytics_written");
        machine
            .acknowledge_analytics(&self.written)
            .await
            .map_err(|e| e.to_string())?;
        self.written.clear();
        Ok(())
    }
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
