//! The AWS Encryption SDK message format, version 2, suite 0x0478: pure
//! parsing, serialization, sealing and opening. No I/O, no KMS, no gRPC:
//! this module is fuzzed and tested with vectors alone.
//!
//! Writing always produces framed content; reading accepts framed and
//! non-framed content from any conforming producer. Untrusted input is
//! bounded by [`EnvelopeLimits`] before large fields are read.

mod body;
mod context;
mod header;
mod suite;

pub use body::{
    FINAL_FRAME_OVERHEAD, FrameHead, MAX_FRAME_HEAD, Opener, REGULAR_FRAME_OVERHEAD, Sealer, Step,
    framed_message_len, open, seal,
};
pub use context::{EncryptionContext, RESERVED_PREFIX};
pub use header::{ContentType, EncryptedDataKey, Header, ParsedHeader, parse as parse_header};
pub use suite::{SUITE_ID, TAG_LEN};

/// Bounds on untrusted envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeLimits {
    /// Most encrypted data keys a header may hold.
    pub max_encrypted_data_keys: usize,
    /// Largest serialized encryption context, in bytes.
    pub max_context_bytes: usize,
}

impl Default for EnvelopeLimits {
    fn default() -> Self {
        Self {
            max_encrypted_data_keys: 4,
            max_context_bytes: 8192,
        }
    }
}

/// Largest header a message written by this sidecar can have with one
/// encrypted data key whose fields are at most `edk_bytes` long together.
pub fn max_header_len(limits: &EnvelopeLimits, edk_bytes: usize) -> usize {
    // version, suite, message ID, AAD length, AAD, EDK count, EDK with its
    // three length fields, content type, frame length, commitment, tag.
    1 + 2 + 32 + 2 + limits.max_context_bytes + 2 + 6 + edk_bytes + 1 + 4 + 32 + 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::secret::DataKey;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    fn key(byte: u8) -> DataKey {
        DataKey::take_from(&mut [byte; 32]).unwrap()
    }

    fn edk() -> EncryptedDataKey {
        EncryptedDataKey {
            provider_id: "test".into(),
            provider_info: b"info".to_vec(),
            ciphertext: vec![7; 40],
        }
    }

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_pairs(pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())))
    }

    fn roundtrip(plaintext: &[u8], frame: u32, c: EncryptionContext) -> Result<Vec<u8>, Error> {
        let msg = seal(
            &key(1),
            c,
            vec![edk()],
            frame,
            plaintext,
            &SystemRandom::new(),
        )?;
        assert_eq!(
            msg.len() as u64,
            framed_message_len(
                parse_header(&msg, &EnvelopeLimits::default())?.unwrap().len as u64,
                plaintext.len() as u64,
                frame
            )
        );
        open_all(&msg, &key(1))
    }

    fn open_all(msg: &[u8], k: &DataKey) -> Result<Vec<u8>, Error> {
        let parsed = parse_header(msg, &EnvelopeLimits::default())?
            .ok_or(Error::auth("truncated header"))?;
        open(&parsed, k, msg)
    }

    #[test]
    fn frame_boundaries_roundtrip() {
        for frame in [1u32, 7, 128, 4096] {
            let f = frame as usize;
            for len in [0, 1, f.saturating_sub(1), f, f + 1, 3 * f, 3 * f + 2] {
                let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
                assert_eq!(roundtrip(&pt, frame, ctx(&[("a", "b")])).unwrap(), pt);
            }
        }
    }

    #[test]
    fn exact_multiple_writes_full_final_frame() {
        let msg = seal(
            &key(1),
            ctx(&[]),
            vec![edk()],
            4,
            b"12345678",
            &SystemRandom::new(),
        )
        .unwrap();
        let h = parse_header(&msg, &EnvelopeLimits::default())
            .unwrap()
            .unwrap();
        // one regular frame (4+12+4+16) and a final frame of 4 (4+4+12+4+4+16)
        assert_eq!(msg.len() - h.len, 36 + 44);
    }

    #[test]
    fn wrong_key_and_tampering_fail_authentication() {
        let msg = seal(
            &key(1),
            ctx(&[("k", "v")]),
            vec![edk()],
            16,
            b"hello world, hi!!",
            &SystemRandom::new(),
        )
        .unwrap();
        assert!(matches!(
            open_all(&msg, &key(2)),
            Err(Error::DecryptAuthFailed { .. })
        ));
        let mut appended = msg.clone();
        appended.push(0);
        assert!(matches!(
            open_all(&appended, &key(1)),
            Err(Error::DecryptAuthFailed { .. })
        ));
        assert!(matches!(
            open_all(&msg[..msg.len() - 1], &key(1)),
            Err(Error::DecryptAuthFailed { .. })
        ));
    }

    #[test]
    fn unsupported_versions_and_suites_are_named() {
        let msg = seal(
            &key(1),
            ctx(&[]),
            vec![edk()],
            16,
            b"x",
            &SystemRandom::new(),
        )
        .unwrap();
        let mut v1 = msg.clone();
        v1[0] = 1;
        let err = open_all(&v1, &key(1)).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedEnvelope(m) if m.contains("version 1")));
        let mut signed = msg.clone();
        signed[1..3].copy_from_slice(&0x0578u16.to_be_bytes());
        let err = open_all(&signed, &key(1)).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedEnvelope(m) if m.contains("0x0578")));
    }

    #[test]
    fn limits_are_enforced_before_reading() {
        let msg = seal(
            &key(1),
            ctx(&[("k", "v")]),
            vec![edk(); 3],
            16,
            b"x",
            &SystemRandom::new(),
        )
        .unwrap();
        let tight = EnvelopeLimits {
            max_encrypted_data_keys: 2,
            max_context_bytes: 100,
        };
        assert!(matches!(
            parse_header(&msg, &tight),
            Err(Error::TooManyEncryptedDataKeys { count: 3, limit: 2 })
        ));
        let tight = EnvelopeLimits {
            max_encrypted_data_keys: 4,
            max_context_bytes: 5,
        };
        assert!(matches!(
            parse_header(&msg, &tight),
            Err(Error::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn every_header_prefix_asks_for_more() {
        let msg = seal(
            &key(1),
            ctx(&[("k", "v")]),
            vec![edk()],
            16,
            b"x",
            &SystemRandom::new(),
        )
        .unwrap();
        let len = parse_header(&msg, &EnvelopeLimits::default())
            .unwrap()
            .unwrap()
            .len;
        for cut in 1..len {
            assert!(
                parse_header(&msg[..cut], &EnvelopeLimits::default())
                    .unwrap()
                    .is_none()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_roundtrip(
            pt in proptest::collection::vec(any::<u8>(), 0..3000),
            frame in 1u32..600,
            pairs in proptest::collection::btree_map("[a-zA-Z0-9é漢]{1,8}", ".{0,12}", 0..5),
        ) {
            let c = EncryptionContext::from_pairs(pairs.clone());
            let msg = seal(&key(3), c, vec![edk()], frame, &pt, &SystemRandom::new()).unwrap();
            let parsed = parse_header(&msg, &EnvelopeLimits::default()).unwrap().unwrap();
            prop_assert_eq!(&parsed.header.context, &EncryptionContext::from_pairs(pairs));
            prop_assert_eq!(open(&parsed, &key(3), &msg).unwrap(), pt);
        }

        #[test]
        fn prop_any_flipped_bit_truncation_or_append_is_rejected(
            pt in proptest::collection::vec(any::<u8>(), 0..300),
            frame in 1u32..64,
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
            extra in any::<u8>(),
        ) {
            let msg = seal(&key(4), ctx(&[("tenant", "acme")]), vec![edk()], frame, &pt, &SystemRandom::new()).unwrap();
            let mut flipped = msg.clone();
            let i = pos.index(msg.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(open_all(&flipped, &key(4)).is_err(), "flip at byte {} accepted", i);
            let c = cut.index(msg.len());
            prop_assert!(open_all(&msg[..c], &key(4)).is_err(), "truncation to {} accepted", c);
            let mut longer = msg.clone();
            longer.push(extra);
            prop_assert!(open_all(&longer, &key(4)).is_err());
        }
    }
}
