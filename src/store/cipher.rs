//! Encryption at rest for the SQLite store: XChaCha20-Poly1305 with a 32-byte store key, and the
//! key's life in memory — overwritten with zeros when dropped, never printed.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::StoreError;

const NONCE_LEN: usize = 24;

/// PBKDF2-HMAC-SHA256 iterations for passphrase-derived keys (OWASP's 2023 recommendation).
pub const PASSPHRASE_ITERATIONS: u32 = 600_000;

/// The 32-byte key that encrypts a store's secrets and authenticates its rows (pickles, decrypted
/// results, other devices' keys, outgoing requests).
///
/// Apps keep it in the iOS Keychain or Android Keystore. `Debug` never prints it, and its bytes
/// are overwritten with zeros when it is dropped (so are keys derived from a passphrase, and the
/// cipher's copy). A store keeps one copy while it is open and lends it out by reference; clone
/// a key only to open a store again — each clone is zeroized on drop too. There is no `==`:
/// comparing secrets byte by byte leaks timing, compare [`to_hex`](Self::to_hex) in tests.
pub struct StoreKey([u8; 32]);

impl Drop for StoreKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for StoreKey {}

impl Clone for StoreKey {
    fn clone(&self) -> Self {
        Self(self.0)
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

// Compile-time proof that every key this module holds is zeroized on drop: the bound fails to
// compile if `StoreKey` loses its `Drop`, or if the AEAD is built without its `zeroize` feature.
const _: () = {
    const fn zeroized_on_drop<T: ZeroizeOnDrop>() {}
    zeroized_on_drop::<StoreKey>();
    zeroized_on_drop::<XChaCha20Poly1305>();
    zeroized_on_drop::<Zeroizing<Vec<u8>>>();
};

impl StoreKey {
    /// Wraps 32 key bytes. The array passed in is a copy the caller still owns: zeroize it
    /// (`zeroize::Zeroize`) if it lives on.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Derives a key from a passphrase with PBKDF2-HMAC-SHA256 ([`PASSPHRASE_ITERATIONS`]) and a
    /// random per-store `salt` (stored beside the data, it is not secret). The key is derived in
    /// place, so no other copy of it is left behind.
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Self {
        let mut key = Self([0; 32]);
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(
            passphrase.as_bytes(),
            salt,
            PASSPHRASE_ITERATIONS,
            &mut key.0,
        );
        key
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self, StoreError> {
        let mut key = Self([0; 32]);
        getrandom::fill(&mut key.0)
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        Ok(key)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        // Parsed in place: on a bad digit the partial key is dropped, hence zeroized.
        let mut key = Self([0; 32]);
        for (i, byte) in key.0.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(key)
    }

    /// The key as 64 lower-case hex digits: a copy of the secret the caller must protect (and
    /// may zeroize with `zeroize::Zeroize`).
    pub fn to_hex(&self) -> String {
        crate::encoding::to_hex(&self.0)
    }

    /// Encrypts `plaintext`; `context` (the row a value belongs to) is authenticated, so a value
    /// copied into another row does not decrypt.
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
    /// or context is wrong or the data was tampered with. The plaintext is zeroized on drop.
    pub fn decrypt(&self, data: &[u8], context: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
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
            .map(Zeroizing::new)
    }

    /// The AEAD keyed with this key; it holds its own copy of the key, zeroized when it drops.
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
        assert_eq!(
            key.decrypt(&data, b"session:1").unwrap().as_slice(),
            b"secret pickle"
        );
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
        assert_eq!(
            StoreKey::from_hex(&key.to_hex()).map(|k| k.to_hex()),
            Some(key.to_hex())
        );
        assert!(StoreKey::from_hex("zz").is_none());
        assert!(StoreKey::from_hex(&"g".repeat(64)).is_none());
        assert_eq!(format!("{key:?}"), "StoreKey(..)");
    }

    /// Derived in place, the passphrase key is still PBKDF2-HMAC-SHA256 with our iteration count:
    /// stores made with a passphrase by earlier versions open with the same key.
    #[test]
    fn the_passphrase_key_is_pbkdf2_of_the_passphrase_and_salt() {
        let expected = pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(
            b"correct horse",
            b"0123456789abcdef",
            PASSPHRASE_ITERATIONS,
        );
        let key = StoreKey::from_passphrase("correct horse", b"0123456789abcdef");
        assert_eq!(key.to_hex(), crate::encoding::to_hex(&expected));
    }
}
