//! Encryption at rest for the SQLite store: XChaCha20-Poly1305 with a 32-byte store key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::error::StoreError;

const NONCE_LEN: usize = 24;

/// PBKDF2-HMAC-SHA256 iterations for passphrase-derived keys (OWASP's 2023 recommendation).
pub const PASSPHRASE_ITERATIONS: u32 = 600_000;

/// The 32-byte key that encrypts a store's secrets (pickles, and in time decrypted results).
///
/// Apps keep it in the iOS Keychain or Android Keystore. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey([u8; 32]);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// Wraps 32 key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Derives a key from a passphrase with PBKDF2-HMAC-SHA256 ([`PASSPHRASE_ITERATIONS`]) and a
    /// random per-store `salt` (stored beside the data, it is not secret).
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Self {
        Self(pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(
            passphrase.as_bytes(),
            salt,
            PASSPHRASE_ITERATIONS,
        ))
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self, StoreError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Self(bytes))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }

    /// The key as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        crate::encoding::to_hex(&self.0)
    }

    /// Encrypts `plaintext`; `context` (e.g. the row a value belongs to) is authenticated, so a
    /// value copied into another row does not decrypt.
    pub fn encrypt(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        let ciphertext = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .map_err(|_| StoreError::Corrupted {
                what: "encryption",
                detail: "the AEAD refused the input".to_owned(),
            })?;
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Decrypts what [`StoreKey::encrypt`] produced with the same `context`; `None` when the key
    /// or context is wrong or the data was tampered with.
    pub fn decrypt(&self, data: &[u8], context: &[u8]) -> Option<Vec<u8>> {
        if data.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = data.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .ok()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_wrong_key_or_context() {
        let key = StoreKey::generate().unwrap();
        let data = key.encrypt(b"secret pickle", b"session:1").unwrap();
        assert_eq!(key.decrypt(&data, b"session:1").unwrap(), b"secret pickle");
        assert!(key.decrypt(&data, b"session:2").is_none());
        assert!(StoreKey::generate()
            .unwrap()
            .decrypt(&data, b"session:1")
            .is_none());
        assert!(!data.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn hex_round_trips() {
        let key = StoreKey::generate().unwrap();
        assert_eq!(StoreKey::from_hex(&key.to_hex()), Some(key.clone()));
        assert_eq!(StoreKey::from_hex("zz"), None);
        assert_eq!(format!("{key:?}"), "StoreKey(..)");
    }
}
