//! Interop with the reference implementation (matrix-sdk-crypto 0.18, in-memory store, public API
//! only): keys, traffic in both directions, adversarial inputs, session recovery and the CLI.
//!
//! One test binary (each links matrix-sdk-crypto, so one link instead of six); each scenario is a
//! module. Run with `cargo test` in `interop/` or `scripts/interop.sh`.

mod adversarial;
mod cli;
mod common;
mod keys;
mod recovery;
mod they_to_us;
mod us_to_them;
