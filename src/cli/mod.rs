//! Command-line interface: the arguments and the small commands (`keys`, `encrypt`, `requests`,
//! `schema`). `decrypt` lives in [`decrypt`], `info` in [`info`], `explain` in [`explain`], the
//! `demo` scenario in [`demo`]; the store directory's rules in [`store_dir`].

mod analytics_out;
mod decrypt;
mod demo;
mod explain;
mod info;
mod input;
mod store_dir;
mod store_errors;
// Shared with the library's `testing` feature (the fuzz target and the limit tests reach it there).
#[path = "../sync_input.rs"]
mod sync_input;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use to_device_crypto::keys::parse_keys_upload_body;
use to_device_crypto::{FailureReason, OlmMachine};

use input::ByteLimit;
use store_dir::{open_machine, Creation};
use store_errors::describe;

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
    /// Print the /keys/upload body with all unpublished keys (always with the device keys) and
    /// mark them published; creates the store and the device when --store holds none.
    Keys {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Start a new device even though <store>/store.key exists beside a missing or empty
        /// database (a deleted or moved database would otherwise be replaced silently).
        #[arg(long)]
        new_identity: bool,
        /// How many one-time keys to generate besides those not yet published (default: 0; a new
        /// device starts with 25 and a fallback key).
        #[arg(long)]
        one_time_keys: Option<usize>,
    },
    /// Decrypt to-device events: a JSON array, a /sync response or JSON lines (file or `-`).
    /// Prints one JSON line per event (see the README for the format).
    Decrypt(decrypt::DecryptArgs),
    /// List the unsent outgoing requests (JSON lines), or mark one as sent, feeding the server's
    /// response back.
    Requests {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Mark the request with this id as sent. A keys_claim request also needs
        /// --response FILE, the server's /keys/claim response body.
        #[arg(long, value_name = "REQUEST_ID")]
        mark_sent: Option<String>,
        /// The server's response body to the request given with --mark-sent (needed for
        /// keys_claim requests, ignored for to_device ones).
        #[arg(long, value_name = "FILE", requires = "mark_sent")]
        response: Option<PathBuf>,
    },
    /// Encrypt events for the device whose /keys/upload body is in KEYS.json; prints a JSON array
    /// of /sync-shaped to-device events.
    Encrypt {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        create: CreateArgs,
        /// The recipient's /keys/upload body (device keys and one-time keys).
        #[arg(long, value_name = "KEYS.json")]
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
    /// Show what a store holds: identity keys, known devices, sessions per sender, reporting
    /// counts, pending results and unsent requests. Creates and changes nothing.
    Info {
        #[command(flatten)]
        store: StoreArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Explain a failure name: when it is reported, its typical root cause and what to look at.
    /// Without NAME, list every name.
    Explain {
        /// A failure name: ToDeviceFailedToDecrypt_SessionWedged or SessionWedged.
        #[arg(value_parser = explain::parse_failure_name)]
        name: Option<FailureReason>,
    },
    /// Print the JSON Schema of the PostHog payload.
    Schema,
}

/// Where the device lives and how its store is unlocked.
#[derive(clap::Args)]
struct StoreArgs {
    /// The store directory (store.sqlite3, store.key). Only `keys` and --create make a new one.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    /// A file holding the 32-byte store key as 64 hex digits (else $TO_DEVICE_CRYPTO_STORE_KEY,
    /// else <store>/store.key, which a new store gets with random bytes).
    #[arg(long, value_name = "FILE")]
    store_key_file: Option<PathBuf>,
}

/// The device's ids: given to a new device, checked against an existing one.
#[derive(clap::Args, Default)]
struct DeviceArgs {
    /// The device's user id: given to a new device (default: @cli-user:localhost), checked
    /// against an existing store's.
    #[arg(long)]
    user_id: Option<String>,
    /// The device id: given to a new device (default: random), checked against an existing
    /// store's.
    #[arg(long)]
    device_id: Option<String>,
}

impl DeviceArgs {
    /// The user id of a new device made without --user-id.
    const DEFAULT_USER_ID: &'static str = "@cli-user:localhost";
}

/// Whether a command other than `keys` may create the store.
#[derive(clap::Args)]
struct CreateArgs {
    /// Create the store and a new device when --store holds none (without it, a missing store is
    /// an error, so that a mistyped path never becomes a new device).
    #[arg(long)]
    create: bool,
    /// With --create: start a new device even though <store>/store.key exists beside a missing
    /// or empty database.
    #[arg(long, requires = "create")]
    new_identity: bool,
}

impl CreateArgs {
    fn creation(&self) -> Creation {
        if self.create {
            Creation::Allowed {
                new_identity: self.new_identity,
            }
        } else {
            Creation::Refused
        }
    }
}

type CliResult = Result<(), String>;

/// Parses the arguments and runs the command; errors go to stderr with exit code 1 (usage errors:
/// exit code 2, from clap).
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
                device,
                new_identity,
                one_time_keys,
            } => keys(store, device, new_identity, one_time_keys).await,
            Command::Decrypt(args) => decrypt::run(args).await,
            Command::Requests {
                store,
                device,
                mark_sent,
                response,
            } => requests(store, device, mark_sent, response).await,
            Command::Encrypt {
                store,
                device,
                create,
                recipient_keys,
                event_type,
                content,
                count,
            } => {
                let contents = encrypt_contents(&content, count)?;
                encrypt(store, device, create, recipient_keys, event_type, contents).await
            }
            Command::Info { store, json } => info::run(store, json).await,
            Command::Explain { name } => explain::run(name),
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

/// Reads a JSON file of at most the default input limit.
fn read_json_file(path: &Path, what: &str) -> Result<Value, String> {
    let text = input::read_text(Some(path), ByteLimit::DEFAULT_INPUT)
        .map_err(|e| format!("cannot use {what}: {}", e.message(None)))?;
    serde_json::from_str(&text).map_err(|e| format!("{what} {} is not JSON: {e}", path.display()))
}

fn print_line(value: &Value) -> CliResult {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{value}").map_err(|e| format!("cannot write to stdout: {e}"))
}

async fn keys(
    store: StoreArgs,
    device: DeviceArgs,
    new_identity: bool,
    one_time_keys: Option<usize>,
) -> CliResult {
    let opened = open_machine(&store, &device, Creation::Allowed { new_identity }).await?;
    let machine = opened.machine;
    let failed = |e: to_device_crypto::StoreError| describe(&store.store, &e);
    // A new device already holds its first 25 one-time keys (`new_account`), as everywhere else.
    let count = one_time_keys.unwrap_or(0);
    machine
        .generate_one_time_keys(count)
        .await
        .map_err(failed)?;
    let mut body = machine.keys_for_upload().await.unwrap_or_else(|| json!({}));
    // The CLI's keys file is what another device's `encrypt` reads: always include the device
    // keys, even once they are published.
    if body.get("device_keys").is_none() {
        body["device_keys"] = machine.device_keys().await;
    }
    print_line(&body)?;
    machine.mark_keys_as_published().await.map_err(failed)
}

async fn write_requests(
    machine: &OlmMachine,
    store_dir: &Path,
    out: &mut impl Write,
) -> Result<usize, String> {
    let requests = machine
        .outgoing_requests()
        .await
        .map_err(|e| describe(store_dir, &e))?;
    for request in &requests {
        let line = serde_json::to_string(request).map_err(|e| e.to_string())?;
        writeln!(out, "{line}").map_err(|e| format!("cannot write the requests: {e}"))?;
    }
    Ok(requests.len())
}

async fn requests(
    store: StoreArgs,
    device: DeviceArgs,
    mark_sent: Option<String>,
    response: Option<PathBuf>,
) -> CliResult {
    let machine = open_machine(&store, &device, Creation::Refused)
        .await?
        .machine;
    match mark_sent {
        Some(request_id) => {
            let response = response
                .map(|path| read_json_file(&path, "the response"))
                .transpose()?;
            machine
                .mark_request_as_sent(&request_id, response.as_ref())
                .await
                .map_err(|e| describe(&store.store, &e))
        }
        None => {
            let listed =
                write_requests(&machine, &store.store, &mut std::io::stdout().lock()).await?;
            if listed == 0 {
                // On stderr: stdout stays JSON lines only.
                eprintln!(
                    "no unsent requests (a failure that needs a new session queues one only when \
                     the sending device is known: see the hints of `decrypt`)"
                );
            }
            Ok(())
        }
    }
}

fn encrypt_contents(content: &str, count: Option<usize>) -> Result<Vec<Value>, String> {
    let content: Value =
        serde_json::from_str(content).map_err(|e| format!("--content is not JSON: {e}"))?;
    Ok(match count {
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
    })
}

async fn encrypt(
    store: StoreArgs,
    device: DeviceArgs,
    create: CreateArgs,
    recipient_keys: PathBuf,
    event_type: String,
    contents: Vec<Value>,
) -> CliResult {
    let keys = read_json_file(&recipient_keys, "the recipient keys")?;
    let recipient = parse_keys_upload_body(&keys)
        .map_err(|e| format!("invalid recipient keys {}: {e}", recipient_keys.display()))?;
    let machine = open_machine(&store, &device, create.creation())
        .await?
        .machine;
    let events = machine
        .encrypt(&recipient, &event_type, &contents)
        .await
        .map_err(|e| describe(&store.store, &e))?;
    print_line(&Value::Array(events))
}
