//! Command-line arguments: the same commands and flags as our `to-device-crypto` CLI where they
//! overlap, parsed by hand (three commands do not justify an argument-parser dependency in a build
//! that CI compiles from scratch).

use std::fmt;
use std::path::PathBuf;

/// What the user asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Create the device on first use, print its `/keys/upload` body, mark the keys published.
    Keys {
        store: StoreArgs,
        one_time_keys: Option<usize>,
    },
    /// Decrypt one `/sync` batch of to-device events.
    Decrypt {
        store: StoreArgs,
        device_keys: Option<PathBuf>,
        analytics_out: Option<PathBuf>,
        input: Option<PathBuf>,
    },
    /// Encrypt events for the device whose `/keys/upload` body is in `recipient_keys`.
    Encrypt {
        store: StoreArgs,
        recipient_keys: PathBuf,
        event_type: String,
        content: String,
        count: Option<usize>,
    },
    /// Print the usage.
    Help,
}

/// Where the device lives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StoreArgs {
    pub store: PathBuf,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
}

/// The arguments do not make a command.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n\n{USAGE}", self.0)
    }
}

pub const USAGE: &str = "\
usage: sdk-olm keys    --store DIR [--user-id U] [--device-id D] [--one-time-keys N]
       sdk-olm decrypt --store DIR [--device-keys KEYS_QUERY.json] [--analytics-out FILE] [INPUT]
       sdk-olm encrypt --store DIR --recipient-keys KEYS.json --type T --content JSON [--count N]

matrix-sdk-crypto 0.19.1 with the upstream patch series, on its SQLite store (DIR, created on
first use; the store passphrase is DIR/store.passphrase). INPUT is a JSON array of to-device
events, a /sync response or JSON lines (a file, or stdin when absent or `-`), decrypted as one
/sync batch. Output formats are those of `to-device-crypto`.";

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    let command = args
        .next()
        .ok_or_else(|| UsageError("no command given".to_owned()))?;
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        match arg.strip_prefix("--") {
            Some(name) => {
                let (name, value) = match name.split_once('=') {
                    Some((name, value)) => (name.to_owned(), value.to_owned()),
                    None => {
                        let value = args
                            .next()
                            .ok_or_else(|| UsageError(format!("--{name} needs a value")))?;
                        (name.to_owned(), value)
                    }
                };
                flags.push((name, value));
            }
            None => positional.push(arg),
        }
    }
    let mut flags = Flags(flags);
    let parsed = match command.as_str() {
        "keys" => Command::Keys {
            store: flags.store()?,
            one_time_keys: flags.number("one-time-keys")?,
        },
        "decrypt" => Command::Decrypt {
            store: flags.store()?,
            device_keys: flags.take("device-keys").map(PathBuf::from),
            analytics_out: flags.take("analytics-out").map(PathBuf::from),
            input: match positional.len() {
                0 => None,
                1 => positional.pop().map(PathBuf::from),
                _ => return Err(UsageError("decrypt takes at most one INPUT".to_owned())),
            },
        },
        "encrypt" => Command::Encrypt {
            store: flags.store()?,
            recipient_keys: flags.required("recipient-keys")?.into(),
            event_type: flags.required("type")?,
            content: flags.required("content")?,
            count: flags.number("count")?,
        },
        "help" => Command::Help,
        other => return Err(UsageError(format!("unknown command `{other}`"))),
    };
    if !matches!(parsed, Command::Decrypt { .. }) && !positional.is_empty() {
        return Err(UsageError(format!(
            "unexpected argument `{}`",
            positional[0]
        )));
    }
    if let Some((name, _)) = flags.0.first() {
        return Err(UsageError(format!(
            "unknown or repeated flag --{name} for {command}"
        )));
    }
    Ok(parsed)
}

struct Flags(Vec<(String, String)>);

impl Flags {
    fn take(&mut self, name: &str) -> Option<String> {
        let at = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(at).1)
    }

    fn required(&mut self, name: &str) -> Result<String, UsageError> {
        self.take(name)
            .ok_or_else(|| UsageError(format!("--{name} is required")))
    }

    fn number(&mut self, name: &str) -> Result<Option<usize>, UsageError> {
        self.take(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| UsageError(format!("--{name} must be a number, not `{v}`")))
            })
            .transpose()
    }

    fn store(&mut self) -> Result<StoreArgs, UsageError> {
        Ok(StoreArgs {
            store: self.required("store")?.into(),
            user_id: self.take("user-id"),
            device_id: self.take("device-id"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, UsageError> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn decrypt_takes_flags_in_any_order_and_one_input() {
        assert_eq!(
            parse_str("decrypt in.json --analytics-out a.jsonl --store s").unwrap(),
            Command::Decrypt {
                store: StoreArgs {
                    store: "s".into(),
                    ..Default::default()
                },
                device_keys: None,
                analytics_out: Some("a.jsonl".into()),
                input: Some("in.json".into()),
            }
        );
    }

    #[test]
    fn keys_reads_its_options() {
        assert_eq!(
            parse_str("keys --store=s --user-id @u:x --one-time-keys 3").unwrap(),
            Command::Keys {
                store: StoreArgs {
                    store: "s".into(),
                    user_id: Some("@u:x".into()),
                    device_id: None,
                },
                one_time_keys: Some(3),
            }
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (line, message) in [
            ("", "no command given"),
            ("frobnicate --store s", "unknown command `frobnicate`"),
            ("keys", "--store is required"),
            ("keys --store", "--store needs a value"),
            (
                "keys --store s --one-time-keys many",
                "--one-time-keys must be a number",
            ),
            (
                "keys --store s --bogus 1",
                "unknown or repeated flag --bogus",
            ),
            ("keys --store s extra", "unexpected argument `extra`"),
            ("decrypt --store s a b", "decrypt takes at most one INPUT"),
            (
                "encrypt --store s --type t --content {}",
                "--recipient-keys is required",
            ),
        ] {
            let error = parse_str(line).unwrap_err();
            assert!(error.0.starts_with(message), "{line:?}: {error:?}");
        }
    }
}
