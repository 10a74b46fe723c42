//! Fuzzes the envelope parser and body opener with untrusted bytes.
//!
//! Two ways in: raw bytes as a message, and a valid message (sealed with a
//! fixed key) with the fuzzer's bytes spliced in, so the opener is reached
//! past the header. Any panic, hang or accepted forgery is a bug.
//! Run: cargo +nightly fuzz run envelope -- -max_total_time=60
#![no_main]

use kms_sidecar::envelope::{self, EncryptedDataKey, EncryptionContext, EnvelopeLimits};
use kms_sidecar::secret::DataKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = EnvelopeLimits::default();
    let key = DataKey::take_from(&mut [3u8; 32]).unwrap();
    if let Ok(Some(parsed)) = envelope::parse_header(data, &limits) {
        let _ = envelope::open(&parsed, &key, data);
    }

    // Splice the input into a real message after its first bytes.
    let edk = EncryptedDataKey {
        provider_id: "p".into(),
        provider_info: b"i".to_vec(),
        ciphertext: vec![1; 8],
    };
    let ctx = EncryptionContext::from_pairs([("k".to_owned(), "v".to_owned())]);
    let rng = ring::rand::SystemRandom::new();
    let msg = envelope::seal(&key, ctx, vec![edk], 16, b"fuzzing the opener!", &rng).unwrap();
    let at = data.first().map_or(0, |b| *b as usize % msg.len());
    let mut spliced = msg[..at].to_vec();
    spliced.extend_from_slice(data.get(1..).unwrap_or_default());
    if spliced != msg {
        if let Ok(Some(parsed)) = envelope::parse_header(&spliced, &limits) {
            assert!(
                envelope::open(&parsed, &key, &spliced).is_err(),
                "a modified message was accepted"
            );
        }
    }
});
