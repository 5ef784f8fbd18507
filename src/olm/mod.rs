//! The Olm side of the crate: our account, other devices' keys, to-device envelopes, decrypted
//! plaintexts and the sessions between them.

pub mod account;
pub mod device_keys;
pub mod envelope;
pub mod plaintext;
pub mod sessions;
