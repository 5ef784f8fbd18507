//! Other devices' keys, as [`OlmMachine::encrypt`](crate::OlmMachine::encrypt) needs them: a
//! device's signed keys and one-time keys, read from a `/keys/upload`-shaped body (what a
//! `/keys/query` plus `/keys/claim` round trip gives for one device) with every signature checked.

pub use crate::olm::device_keys::{
    parse_keys_upload_body, DeviceKeys, DeviceKeysError, PublishedKeys, SignedOneTimeKey,
};
