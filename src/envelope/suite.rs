//! Algorithm suite 0x0478 (framework/algorithm-suites.md): AES-256-GCM with
//! a 12-byte IV and 16-byte tag, key derivation with HKDF-SHA512 and key
//! commitment, no signature.
//!
//! [`MessageKey`] is the per-message AEAD key. Its nonces are derived from
//! frame sequence numbers inside this module, so callers never pick one;
//! uniqueness holds because every message has a fresh random message ID and
//! therefore its own derived key, and a message has at most 2^32 - 2 frames.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::error::Error;
use crate::secret::DataKey;

/// The suite ID, as serialized in the header.
pub const SUITE_ID: u16 = 0x0478;
/// Message ID length for message format version 2.
pub const MESSAGE_ID_LEN: usize = 32;
/// Length of the commitment value stored in the header (suite data).
pub const COMMITMENT_LEN: usize = 32;
/// AES-GCM IV length.
pub const IV_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// HKDF output length, for [`hkdf::Prk::expand`] into raw bytes.
struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// The AEAD key of one message, derived from the data key and message ID.
pub struct MessageKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(<redacted>)")
    }
}

/// Derives the message key and the commitment value
/// (algorithm-suites.md, "Key Derivation" and "Key Commitment"):
/// PRK = HKDF-Extract(salt = message ID, IKM = data key);
/// key = Expand(PRK, suite ID || "DERIVEKEY", 32);
/// commitment = Expand(PRK, "COMMITKEY", 32).
pub fn derive(
    data_key: &DataKey,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> Result<(MessageKey, [u8; COMMITMENT_LEN]), Error> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA512, message_id).extract(data_key.expose());
    let suite = SUITE_ID.to_be_bytes();
    let info: [&[u8]; 2] = [&suite, b"DERIVEKEY"];
    let unbound: UnboundKey = prk
        .expand(&info, &aead::AES_256_GCM)
        .map_err(|_| Error::Internal("HKDF expand for the message key failed"))?
        .into();
    let mut commitment = [0u8; COMMITMENT_LEN];
    prk.expand(&[b"COMMITKEY"], OkmLen(COMMITMENT_LEN))
        .and_then(|okm| okm.fill(&mut commitment))
        .map_err(|_| Error::Internal("HKDF expand for the commitment failed"))?;
    Ok((
        MessageKey {
            key: LessSafeKey::new(unbound),
        },
        commitment,
    ))
}

/// Compares two commitment values without data-dependent branches.
pub fn commitment_matches(a: &[u8; COMMITMENT_LEN], b: &[u8; COMMITMENT_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The IV of frame `seq`: eight zero bytes and the big-endian sequence
/// number, as the official SDKs produce (message-body.md, "IV"). The header
/// uses sequence 0, an all-zero IV (message-header.md, v2 "Header
/// Authentication").
#[allow(
    clippy::disallowed_methods,
    reason = "the one place frame nonces are made: unique per derived message key"
)]
fn nonce_for(seq: u32) -> Nonce {
    let mut iv = [0u8; IV_LEN];
    iv[IV_LEN - 4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(iv)
}

impl MessageKey {
    /// Seals `in_out` in place as frame `seq` and returns the tag.
    pub fn seal(&self, seq: u32, aad: &[u8], in_out: &mut [u8]) -> Result<[u8; TAG_LEN], Error> {
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce_for(seq), Aad::from(aad), in_out)
            .map_err(|_| Error::Internal("AES-GCM seal failed"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens `in_out` in place with the IV stored in the message. Opening
    /// never reuses a nonce for sealing, so any IV is safe here.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when the tag does not verify.
    #[allow(
        clippy::disallowed_methods,
        reason = "decryption takes the IV the producer chose; no sealing happens"
    )]
    pub fn open(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        tag: &[u8; TAG_LEN],
        in_out: &mut [u8],
    ) -> Result<(), Error> {
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*iv),
                Aad::from(aad),
                aead::Tag::from(*tag),
                in_out,
                0..,
            )
            .map(|_| ())
            .map_err(|_| Error::auth("frame tag did not verify"))
    }

    /// The header authentication tag: AES-GCM over an empty plaintext with
    /// the header body as AAD and an all-zero IV.
    pub fn header_tag(&self, header_body: &[u8]) -> Result<[u8; TAG_LEN], Error> {
        self.seal(0, header_body, &mut [])
    }

    /// Verifies the header authentication tag.
    pub fn verify_header(&self, header_body: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), Error> {
        self.open(&[0u8; IV_LEN], header_body, tag, &mut [])
            .map_err(|_| Error::auth("header tag did not verify"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_depends_on_key_and_message_id() {
        let mut a = [1u8; 32];
        let mut b = [2u8; 32];
        let (ka, ca) = derive(&DataKey::take_from(&mut a).unwrap(), &[0; 32]).unwrap();
        let (_kb, cb) = derive(&DataKey::take_from(&mut b).unwrap(), &[0; 32]).unwrap();
        let mut c = [1u8; 32];
        let (_kc, cc) = derive(&DataKey::take_from(&mut c).unwrap(), &[9; 32]).unwrap();
        assert_ne!(ca, cb);
        assert_ne!(ca, cc);
        assert!(commitment_matches(&ca, &ca));
        assert!(!commitment_matches(&ca, &cb));

        let tag = ka.header_tag(b"hdr").unwrap();
        ka.verify_header(b"hdr", &tag).unwrap();
        assert!(ka.verify_header(b"hdR", &tag).is_err());
    }

    #[test]
    fn hkdf_sha512_matches_rfc_style_vector() {
        // HKDF-SHA512 known answer, computed with Python's `cryptography`
        // (HKDF(SHA512(), 32, salt=bytes(range(32)), info=b"COMMITKEY")
        // over the key bytes(range(32, 64))).
        let mut ikm: [u8; 32] = core::array::from_fn(|i| (i + 32) as u8);
        let salt: [u8; 32] = core::array::from_fn(|i| i as u8);
        let (_k, commitment) = derive(&DataKey::take_from(&mut ikm).unwrap(), &salt).unwrap();
        assert_eq!(
            hex(&commitment),
            include_str!("../../tests/vectors/hkdf_commitkey.hex").trim()
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
