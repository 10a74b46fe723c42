//! Property tests through the whole service path (request validation,
//! local keyring, envelope) without the network: round trips for arbitrary
//! sizes and contexts, and every single-bit flip, truncation or appended
//! byte of a real envelope rejected with no plaintext.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::HashMap;
use std::sync::Arc;

use kms_sidecar::api::KeyServiceImpl;
use kms_sidecar::cache::{Clock, Materials};
use kms_sidecar::config::ServiceConfig;
use kms_sidecar::keyring::{Keyring, LocalKeyring};
use kms_sidecar::proto::key_service_server::KeyService;
use kms_sidecar::proto::{UnwrapRequest, WrapRequest};
use kms_sidecar::secret::WrappingKey;
use proptest::prelude::*;
use tonic::{Code, Request};

fn service() -> KeyServiceImpl {
    let key = WrappingKey::take_from(&mut [0x5a; 32]).unwrap();
    let keyring = LocalKeyring::new("kms-sidecar".into(), "local-key".into(), &key).unwrap();
    let config = ServiceConfig {
        // Small frames so that short inputs span several frames.
        frame_length: 4096,
        ..ServiceConfig::default()
    };
    let materials = Materials::new(
        Arc::new(Keyring::Local(Box::new(keyring))),
        config.cache,
        Clock::system(),
    );
    KeyServiceImpl::new(Arc::new(materials), Arc::default(), config)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn wrap(
    svc: &KeyServiceImpl,
    rt: &tokio::runtime::Runtime,
    pt: &[u8],
    ctx: &HashMap<String, String>,
) -> Vec<u8> {
    rt.block_on(svc.wrap(Request::new(WrapRequest {
        key_id: String::new(),
        plaintext: pt.to_vec(),
        encryption_context: ctx.clone(),
    })))
    .unwrap()
    .into_inner()
    .envelope
}

fn unwrap(
    svc: &KeyServiceImpl,
    rt: &tokio::runtime::Runtime,
    envelope: Vec<u8>,
    ctx: &HashMap<String, String>,
) -> Result<Vec<u8>, tonic::Status> {
    rt.block_on(svc.unwrap(Request::new(UnwrapRequest {
        envelope,
        encryption_context: ctx.clone(),
    })))
    .map(|r| r.into_inner().plaintext)
}

fn contexts() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map("[a-z0-9_é]{1,10}", "\\PC{0,16}", 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn roundtrip_any_size_and_context(
        pt in proptest::collection::vec(any::<u8>(), 0..20_000),
        ctx in contexts(),
    ) {
        let (svc, rt) = (service(), runtime());
        let envelope = wrap(&svc, &rt, &pt, &ctx);
        prop_assert_eq!(unwrap(&svc, &rt, envelope, &ctx).unwrap(), pt);
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        pt in proptest::collection::vec(any::<u8>(), 0..9000),
        ctx in contexts(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (svc, rt) = (service(), runtime());
        let mut envelope = wrap(&svc, &rt, &pt, &ctx);
        let i = pos.index(envelope.len());
        envelope[i] ^= 1 << bit;
        let err = unwrap(&svc, &rt, envelope, &ctx).unwrap_err();
        prop_assert_eq!(err.code(), Code::InvalidArgument, "flip at {} gave {:?}", i, err);
    }

    #[test]
    fn any_truncation_or_appended_byte_is_rejected(
        pt in proptest::collection::vec(any::<u8>(), 0..9000),
        cut in any::<prop::sample::Index>(),
        extra in any::<u8>(),
    ) {
        let (svc, rt) = (service(), runtime());
        let ctx = HashMap::from([("k".to_owned(), "v".to_owned())]);
        let envelope = wrap(&svc, &rt, &pt, &ctx);
        let c = cut.index(envelope.len());
        let err = unwrap(&svc, &rt, envelope[..c].to_vec(), &ctx).unwrap_err();
        prop_assert_eq!(err.code(), Code::InvalidArgument);
        let mut longer = envelope;
        longer.push(extra);
        let err = unwrap(&svc, &rt, longer, &ctx).unwrap_err();
        prop_assert_eq!(err.code(), Code::InvalidArgument);
    }
}

/// Exhaustive over one small envelope: every bit of every byte.
#[test]
fn every_bit_of_a_small_envelope_matters() {
    let (svc, rt) = (service(), runtime());
    let ctx = HashMap::from([("tenant".to_owned(), "acme".to_owned())]);
    let envelope = wrap(&svc, &rt, b"exhaustive", &ctx);
    for i in 0..envelope.len() {
        for bit in 0..8 {
            let mut flipped = envelope.clone();
            flipped[i] ^= 1 << bit;
            let err = unwrap(&svc, &rt, flipped, &ctx).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "byte {i} bit {bit}");
        }
    }
}
