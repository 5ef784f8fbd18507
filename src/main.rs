//! `to-device-crypto`: the command-line face of the crate (see `to-device-crypto --help`).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::run()
}
