//! Secret key material: the only types that hold plaintext keys.
//!
//! Every type here zeroizes its bytes on drop, has no `Clone`, `Display` or
//! serializer, and prints only its length through `Debug`. Secret bytes that
//! arrive in foreign types (an aws-sdk-kms `Blob`, a prost message) are moved
//! into these types at once and the foreign buffer is wiped.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of an AES-256 key, of the data keys used by suite 0x0478, and of
/// the local keyring's wrapping key.
pub const AES_256_KEY_LEN: usize = 32;

/// A plaintext 256-bit data key: the input of the message key derivation.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; AES_256_KEY_LEN]);

impl DataKey {
    /// Takes the key out of `bytes` and wipes `bytes`.
    ///
    /// Returns `None`, after wiping, when `bytes` is not exactly 32 bytes
    /// long.
    pub fn take_from(bytes: &mut [u8]) -> Option<Self> {
        let key = <[u8; AES_256_KEY_LEN]>::try_from(&*bytes).ok().map(Self);
        bytes.zeroize();
        key
    }

    /// Draws a fresh random key from the operating system.
    ///
    /// # Errors
    /// Fails only if the system random generator fails.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut key = Self([0; AES_256_KEY_LEN]);
        rng.fill(&mut key.0)?;
        Ok(key)
    }

    /// The key bytes, for key derivation and wrapping only.
    pub fn expose(&self) -> &[u8; AES_256_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted, 32 bytes>)")
    }
}

/// The local keyring's 256-bit AES wrapping key (ESDK raw AES keyring).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct WrappingKey([u8; AES_256_KEY_LEN]);

impl WrappingKey {
    /// Takes the key out of `bytes` and wipes `bytes`; `None` if the length
    /// is not 32.
    pub fn take_from(bytes: &mut [u8]) -> Option<Self> {
        let key = <[u8; AES_256_KEY_LEN]>::try_from(&*bytes).ok().map(Self);
        bytes.zeroize();
        key
    }

    /// The key bytes, for building the AES-GCM key only.
    pub fn expose(&self) -> &[u8; AES_256_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappingKey(<redacted, 32 bytes>)")
    }
}

/// Secret bytes of a length known only at run time: a GenerateDataKey
/// plaintext (1..=1024 bytes) on its way to the caller.
#[derive(Default, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes the bytes out of `bytes`, leaving it empty.
    pub fn take_from(bytes: &mut Vec<u8>) -> Self {
        Self(std::mem::take(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Moves the bytes out, for the one place that must hand them to a
    /// foreign type (the gRPC response being encoded). The caller is then
    /// responsible for them.
    pub fn into_exposed_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_bytes() {
        let mut raw = [0x41u8; 32];
        let key = DataKey::take_from(&mut raw).unwrap();
        assert_eq!(raw, [0u8; 32], "source buffer must be wiped");
        let shown = format!("{key:?}");
        assert!(!shown.contains("41") && !shown.contains("65") && shown.contains("redacted"));

        let mut v = vec![0x42u8; 7];
        let secret = SecretBytes::take_from(&mut v);
        assert!(v.is_empty());
        assert_eq!(format!("{secret:?}"), "SecretBytes(<redacted, 7 bytes>)");
    }

    #[test]
    fn wrong_length_is_refused_and_wiped() {
        let mut raw = [7u8; 31];
        assert!(DataKey::take_from(&mut raw).is_none());
        assert_eq!(raw, [0u8; 31]);
    }
}
