//! Fuzzes the reader of a client certificate's subject alternative names
//! (mTLS caller identity). Any panic or hang is a bug; malformed DER must
//! yield no names. The input is also wrapped in an outer SEQUENCE so the
//! fuzzer reaches the inner structures without guessing the first bytes.
//! Run: cargo +nightly fuzz run peer_names -- -max_total_time=60
#![no_main]

use kms_sidecar::tls::peer_names;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peer_names(data);
    if let Ok(len) = u16::try_from(data.len()) {
        let mut wrapped = vec![0x30, 0x82];
        wrapped.extend_from_slice(&len.to_be_bytes());
        wrapped.extend_from_slice(data);
        let _ = peer_names(&wrapped);
    }
});
