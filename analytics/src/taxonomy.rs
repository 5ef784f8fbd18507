//! The failure taxonomy: one reason per way a to-device event can fail to decrypt.
//!
//! [`FailureReason`] is the single source of truth. The analytics names, the JSON Schema and the
//! failure table ([`crate::schema`]) are generated from it; the project that publishes this crate
//! commits copies of them and a test fails when those are stale.
//!
//! This module knows nothing about Olm machines or stores, so that another SDK can adopt the same
//! taxonomy by mapping its own errors onto these reasons.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The prefix shared by every analytics name: the public schema's existing
/// `ToDeviceFailedToDecrypt` name, refined with one suffix per reason.
pub const ANALYTICS_NAME_PREFIX: &str = "ToDeviceFailedToDecrypt";

/// Defines [`FailureReason`] and derives [`FailureReason::ALL`] from the same list, so a new
/// variant cannot be left out of the schema, the README table, the tests or the bindings' checks.
macro_rules! failure_reasons {
    (
        $(#[$enum_meta:meta])*
        pub enum FailureReason {
            $($(#[$variant_meta:meta])* $variant:ident,)*
        }
    ) => {
        $(#[$enum_meta])*
        pub enum FailureReason {
            $($(#[$variant_meta])* $variant,)*
        }

        impl FailureReason {
            /// Every reason, in check order (derived from the enum's own list).
            pub const ALL: [FailureReason; [$(stringify!($variant)),*].len()] =
                [$(Self::$variant),*];
        }
    };
}

failure_reasons! {
    /// Why a to-device event could not be decrypted and accepted.
    ///
    /// Every failure maps to exactly one reason. The reasons are listed in the order in which the
    /// checks run, so the first failing check names the failure.
    ///
    /// ```
    /// use to_device_analytics::FailureReason;
    ///
    /// let reason = FailureReason::SessionWedged;
    /// assert_eq!(reason.analytics_name(), "ToDeviceFailedToDecrypt_SessionWedged");
    /// assert_eq!(FailureReason::from_analytics_name(reason.analytics_name()), Some(reason));
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    pub enum FailureReason {
        /// The envelope is not a valid to-device event.
        MalformedEvent,
        /// `content.algorithm` is missing or not Olm v1.
        UnsupportedAlgorithm,
        /// `content.sender_key` is missing or not a Curve25519 key.
        MissingSenderKey,
        /// The `ciphertext` map has no entry for our Curve25519 key.
        MissingCiphertext,
        /// Our ciphertext entry is unusable: bad type, body not base64, undecodable Olm message.
        MalformedCiphertext,
        /// A normal (type 1) message from a sender key we have no session with.
        MissingSession,
        /// We have sessions with the sender key, but none of them decrypts the message.
        SessionWedged,
        /// A pre-key message for a one-time key we do not hold.
        UnknownOneTimeKey,
        /// Creating an inbound session from a pre-key message failed for another reason.
        SessionCreation,
        /// This exact message was already decrypted.
        ReplayedMessage,
        /// The plaintext is not JSON or lacks required fields.
        JsonError,
        /// The plaintext `sender` differs from the envelope `sender`.
        MismatchedSender,
        /// The plaintext `recipient` is not our user id.
        MismatchedRecipient,
        /// `recipient_keys.ed25519` is not ours, or `keys.ed25519` is not the sending device's.
        MismatchedKeys,
        /// The sending device is unknown and the event carries no `sender_device_keys`.
        MissingSigningKey,
        /// `sender_device_keys` is present but invalid.
        InvalidSenderDeviceKeys,
        /// The crypto store failed; nothing of the batch was committed.
        Store,
    }
}

/// Documentation of one [`FailureReason`], as shown in the README table and the JSON Schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonInfo {
    /// The short reason name, e.g. `SessionWedged`.
    pub reason: &'static str,
    /// The PostHog `Error` event `name`, e.g. `ToDeviceFailedToDecrypt_SessionWedged`.
    pub analytics_name: &'static str,
    /// When this reason is reported (the check that failed).
    pub when: &'static str,
    /// The most likely root cause in the field.
    pub typical_root_cause: &'static str,
    /// What an app engineer should look at first.
    pub what_to_check: &'static str,
}

macro_rules! reason_info {
    ($reason:literal, $when:literal, $cause:literal, $check:literal $(,)?) => {
        ReasonInfo {
            reason: $reason,
            analytics_name: concat!("ToDeviceFailedToDecrypt_", $reason),
            when: $when,
            typical_root_cause: $cause,
            what_to_check: $check,
        }
    };
}

impl FailureReason {
    /// The documentation of this reason.
    pub const fn info(self) -> ReasonInfo {
        match self {
            Self::MalformedEvent => reason_info!(
                "MalformedEvent",
                "The envelope is not a valid to-device event: not a JSON object, over the size or nesting limit, or `type`/`sender`/`content` missing or of the wrong JSON type.",
                "A buggy or hostile sending client, or a server/proxy that mangled the `/sync` response.",
                "The raw `/sync` `to_device.events` entry; whether the app passes events through unchanged.",
            ),
            Self::UnsupportedAlgorithm => reason_info!(
                "UnsupportedAlgorithm",
                "`content.algorithm` is missing or is not `m.olm.v1.curve25519-aes-sha2`.",
                "A client sending a Megolm or future algorithm as a to-device event, or an event routed to the Olm decryptor by mistake.",
                "The event type and algorithm the sending client used; whether the app only hands `m.room.encrypted` events to the decryptor.",
            ),
            Self::MissingSenderKey => reason_info!(
                "MissingSenderKey",
                "`content.sender_key` is missing or is not an unpadded base64 Curve25519 key.",
                "An outdated or broken sending client.",
                "The sending client and version (from logs), not our store.",
            ),
            Self::MissingCiphertext => reason_info!(
                "MissingCiphertext",
                "The `ciphertext` map has no entry for this device's Curve25519 key.",
                "The sender encrypted for stale device keys: this device was reset, re-created or its keys changed after the sender's last `/keys/query`.",
                "Whether this device's identity keys changed (logout/login, store reset) and whether other devices still cache the old keys.",
            ),
            Self::MalformedCiphertext => reason_info!(
                "MalformedCiphertext",
                "The `ciphertext` field is not an object, or our entry has a bad `type` or `body`: body not base64, message type not 0/1, or an undecodable Olm message.",
                "Corruption in transit or a buggy sending client.",
                "The sending client; any proxy or storage layer that re-encodes events.",
            ),
            Self::MissingSession => reason_info!(
                "MissingSession",
                "A normal (type 1) Olm message arrived from a sender key with which this device has no Olm session at all.",
                "This device lost its Olm sessions (store reset, restored backup, crash before commit) or never received the pre-key message that created the session.",
                "Store resets and restores on this device; whether an earlier pre-key message from the sender was dropped. Recovery creates a new session.",
            ),
            Self::SessionWedged => reason_info!(
                "SessionWedged",
                "Olm sessions with the sender key exist, but none of them decrypts the message (MAC mismatch, missing message key or too big a gap).",
                "The two sides' ratchets diverged: one side restored an older store, lost a ratchet step in a crash, or over 2000 messages were skipped.",
                "Store durability on both devices (crashes between decrypt and commit), backups being restored. Recovery creates a new session.",
            ),
            Self::UnknownOneTimeKey => reason_info!(
                "UnknownOneTimeKey",
                "A pre-key message was built on a one-time key this device does not hold (already used, never uploaded by this device, or lost).",
                "The server handed out the same one-time key twice, keys were lost in a store reset, or the sender used keys of an older incarnation of this device.",
                "One-time key upload and mark-as-published bookkeeping; store resets; server-side key handling.",
            ),
            Self::SessionCreation => reason_info!(
                "SessionCreation",
                "Creating an inbound Olm session from a pre-key message failed for a reason other than an unknown one-time key (identity key mismatch, session config mismatch, non-contributory key, first message undecryptable).",
                "A pre-key message re-wrapped under another sender key, a corrupted message, or an incompatible sending client.",
                "The envelope `sender_key` versus the key in the pre-key message; the sending client.",
            ),
            Self::ReplayedMessage => reason_info!(
                "ReplayedMessage",
                "This exact message (same sender key, message type and ciphertext) was already decrypted by this device.",
                "The server or the app delivered the same to-device event twice (sync token not persisted, retried batch), or an attacker replayed a message on a fallback key.",
                "Whether the app persists the `/sync` `next_batch` token together with the decryption results.",
            ),
            Self::JsonError => reason_info!(
                "JsonError",
                "The decrypted plaintext is not a JSON object or lacks a required field (`type`, `content`, `sender`, `recipient`, `recipient_keys.ed25519`, `keys.ed25519`).",
                "A buggy sending client.",
                "The sending client and version.",
            ),
            Self::MismatchedSender => reason_info!(
                "MismatchedSender",
                "The plaintext `sender` differs from the envelope `sender`.",
                "A forged envelope: someone relayed another user's message, or a server rewrote the sender.",
                "The homeserver of the envelope sender; treat as a possible attack.",
            ),
            Self::MismatchedRecipient => reason_info!(
                "MismatchedRecipient",
                "The plaintext `recipient` is not this device's user id.",
                "A message for another user was forwarded to this device.",
                "Treat as a possible attack; check which server delivered it.",
            ),
            Self::MismatchedKeys => reason_info!(
                "MismatchedKeys",
                "`recipient_keys.ed25519` is not this device's Ed25519 key, or `keys.ed25519` is not the Ed25519 key of the sending device.",
                "A message encrypted for another device of ours and forwarded, or a sender claiming another device's signing key.",
                "Treat as a possible attack; compare the device keys from `/keys/query` with the ones in the event.",
            ),
            Self::MissingSigningKey => reason_info!(
                "MissingSigningKey",
                "The sending device is unknown (no `/keys/query` result and no `sender_device_keys`) and the event is not an `m.room_key`, so its Ed25519 key cannot be checked.",
                "The app did not run `/keys/query` for the sender before decrypting, and the sender's client does not send `sender_device_keys` (MSC4147).",
                "Whether the app tracks the sender's devices and feeds `/keys/query` responses to the machine.",
            ),
            Self::InvalidSenderDeviceKeys => reason_info!(
                "InvalidSenderDeviceKeys",
                "`sender_device_keys` is present but invalid: bad signature, wrong user, keys that differ from the envelope or the plaintext, or keys that contradict the ones known from `/keys/query`.",
                "A buggy or hostile sending client, or a device whose keys changed since the last `/keys/query`.",
                "The sender's device list; treat repeated failures from one sender as a possible attack.",
            ),
            Self::Store => reason_info!(
                "Store",
                "The crypto store failed while loading or committing; nothing of the batch was committed and the app should retry it.",
                "Disk full, a locked or corrupted database, or a wrong store key.",
                "Free disk space, file protection (iOS), the store key, and store errors in the logs.",
            ),
        }
    }

    /// The short reason name, e.g. `SessionWedged`.
    pub const fn as_str(self) -> &'static str {
        self.info().reason
    }

    /// The PostHog `Error` event `name`, e.g. `ToDeviceFailedToDecrypt_SessionWedged`.
    pub const fn analytics_name(self) -> &'static str {
        self.info().analytics_name
    }

    /// The reason whose analytics name is `name`, if any.
    pub fn from_analytics_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.analytics_name() == name)
    }

    /// The reason whose short name is `name`, if any.
    pub fn from_reason_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }

    /// Whether a new Olm session with the sender would fix the problem: the reasons for which the
    /// spec's "recovering from undecryptable messages" applies.
    pub const fn needs_new_session(self) -> bool {
        matches!(
            self,
            Self::MissingSession | Self::SessionWedged | Self::UnknownOneTimeKey
        )
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analytics_names_are_prefixed_and_unique() {
        let mut names: Vec<_> = FailureReason::ALL
            .iter()
            .map(|r| r.analytics_name())
            .collect();
        for name in &names {
            assert!(name.starts_with(&format!("{ANALYTICS_NAME_PREFIX}_")));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FailureReason::ALL.len());
    }

    #[test]
    fn names_round_trip() {
        for reason in FailureReason::ALL {
            assert_eq!(
                FailureReason::from_analytics_name(reason.analytics_name()),
                Some(reason)
            );
            assert_eq!(
                FailureReason::from_reason_name(reason.as_str()),
                Some(reason)
            );
            assert_eq!(format!("{reason:?}"), reason.as_str());
        }
        assert_eq!(
            FailureReason::from_analytics_name("ToDeviceFailedToDecrypt"),
            None
        );
    }
}
