//! End-to-end gRPC tests on the AWS KMS keyring against moto's KMS server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use common::{Sidecar, create_key, ctx, kms_client, kms_keyring, reason};
use kms_sidecar::proto::{GenerateDataKeyRequest, UnwrapRequest, WrapRequest};
use tonic::Code;

/// Harness prerequisite: the KMS server must bind the encryption context
/// to its ciphertexts, or every context test below would prove nothing.
#[tokio::test]
async fn kms_server_binds_encryption_context() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let out = kms
        .encrypt()
        .key_id(&arn)
        .plaintext(aws_sdk_kms::primitives::Blob::new(b"x".to_vec()))
        .set_encryption_context(Some(ctx(&[("tenant", "acme")])))
        .send()
        .await
        .unwrap();
    let blob = out.ciphertext_blob.unwrap();
    let wrong = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .set_encryption_context(Some(ctx(&[("tenant", "other")])))
        .send()
        .await;
    assert!(wrong.is_err(), "moto decrypted with the wrong context");
    let right = kms
        .decrypt()
        .ciphertext_blob(blob)
        .set_encryption_context(Some(ctx(&[("tenant", "acme")])))
        .send()
        .await
        .unwrap();
    assert_eq!(right.plaintext.unwrap().into_inner(), b"x");
}

#[tokio::test]
async fn wrap_unwrap_roundtrip_reports_key_arn() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&arn)).await).await;
    let mut client = sidecar.client().await;
    for size in [0usize, 1, 65535, 65536, 65537, 300_000] {
        let plaintext: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        let context = ctx(&[("tenant", "acme"), ("purpose", "invoice"), ("ünï", "cödé")]);
        let wrapped = client
            .wrap(WrapRequest {
                key_id: String::new(),
                plaintext: plaintext.clone(),
                encryption_context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(wrapped.key_id, arn);
        assert_eq!(
            &wrapped.envelope[..3],
            &[0x02, 0x04, 0x78],
            "ESDK v2, suite 0x0478"
        );
        let opened = client
            .unwrap(UnwrapRequest {
                envelope: wrapped.envelope,
                encryption_context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, plaintext, "size {size}");
        assert_eq!(opened.key_id, arn);
        assert_eq!(opened.encryption_context, context);
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn keys_are_selected_by_arn_id_or_alias_and_others_refused() {
    let kms = kms_client();
    let first = create_key(&kms).await;
    let second = create_key(&kms).await;
    let alias = format!("alias/test-{}", &second[second.len() - 8..]);
    kms.create_alias()
        .alias_name(&alias)
        .target_key_id(&second)
        .send()
        .await
        .unwrap();
    let sidecar = Sidecar::start(kms_keyring(&[first.clone(), alias.clone()]).await).await;
    let mut client = sidecar.client().await;
    let second_id = second.rsplit_once("key/").unwrap().1.to_owned();
    for (requested, expected) in [
        ("", &first),
        (first.as_str(), &first),
        (alias.as_str(), &second),
        (second.as_str(), &second),
        (second_id.as_str(), &second),
    ] {
        let out = client
            .wrap(WrapRequest {
                key_id: requested.into(),
                plaintext: b"x".to_vec(),
                encryption_context: ctx(&[]),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&out.key_id, expected, "requested {requested:?}");
        // The envelope stores the ARN, never the alias.
        let text = String::from_utf8_lossy(&out.envelope);
        assert!(text.contains(expected.as_str()) && !text.contains("alias/"));
    }
    let unconfigured = create_key(&kms).await;
    let err = client
        .wrap(WrapRequest {
            key_id: unconfigured.clone(),
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "KEY_NOT_CONFIGURED");
    assert!(err.message().contains(&unconfigured) && err.message().contains(&first));
    sidecar.stop().await;
}

#[tokio::test]
async fn generate_data_key_proxies_kms() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&arn)).await).await;
    let mut client = sidecar.client().await;
    let context = ctx(&[("app", "billing")]);
    let out = client
        .generate_data_key(GenerateDataKeyRequest {
            key_id: String::new(),
            encryption_context: context.clone(),
            number_of_bytes: 0,
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.key_id, arn);
    assert_eq!(out.plaintext.len(), 32);
    // The blob is a plain KMS ciphertext: kms:Decrypt with the context opens it.
    let decrypted = kms
        .decrypt()
        .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(
            out.ciphertext_blob.clone(),
        ))
        .set_encryption_context(Some(context.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(decrypted.plaintext.unwrap().into_inner(), out.plaintext);

    let without = client
        .generate_data_key(GenerateDataKeyRequest {
            key_id: arn.clone(),
            encryption_context: context.clone(),
            number_of_bytes: 16,
            without_plaintext: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(without.plaintext.is_empty());
    let decrypted = kms
        .decrypt()
        .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(without.ciphertext_blob))
        .set_encryption_context(Some(context))
        .send()
        .await
        .unwrap();
    assert_eq!(decrypted.plaintext.unwrap().into_inner().len(), 16);

    for bad in [1025u32, u32::MAX] {
        let err = client
            .generate_data_key(GenerateDataKeyRequest {
                number_of_bytes: bad,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(reason(&err), "INVALID_REQUEST");
        assert!(err.message().contains("1 to 1024"));
    }
    sidecar.stop().await;
}

/// Field case B01: a context mismatch is an authentication failure with a
/// message that names the supplied keys (never values); order is ignored.
#[tokio::test]
async fn b01_context_mismatch() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&arn)).await).await;
    let mut client = sidecar.client().await;
    let original = [("tenant", "acme"), ("purpose", "invoice")];
    let envelope = client
        .wrap(WrapRequest {
            key_id: String::new(),
            plaintext: b"B01-probe".to_vec(),
            encryption_context: ctx(&original),
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let cases: [&[(&str, &str)]; 4] = [
        &[("tenant", "acme"), ("purpose", "Invoice")],
        &[("tenant", "acme")],
        &[("tenant", "acme"), ("purpose", "invoice"), ("extra", "1")],
        &[],
    ];
    let mut messages = Vec::new();
    for supplied in cases {
        let err = client
            .unwrap(UnwrapRequest {
                envelope: envelope.clone(),
                encryption_context: ctx(supplied),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{supplied:?}");
        assert_eq!(reason(&err), "DECRYPT_AUTH_FAILED");
        assert!(err.message().contains("encryption context"));
        for (k, v) in supplied {
            assert!(err.message().contains(k), "key names are listed");
            assert!(!err.message().contains(v), "values are never listed");
        }
        messages.push(err.message().split(" (supplied").next().unwrap().to_owned());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "every mismatch reads the same");
    let reversed: Vec<_> = original.iter().rev().copied().collect();
    let ok = client
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&reversed),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.plaintext, b"B01-probe");
    sidecar.stop().await;
}

/// A KMS-level context failure (the header is re-signed for another
/// context, so only KMS can tell) maps to the same status.
#[tokio::test]
async fn kms_invalid_ciphertext_is_an_authentication_failure() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&arn)).await).await;
    let mut client = sidecar.client().await;
    // Wrap with one context, then graft its encrypted data key into an
    // envelope whose header says another context.
    let a = client
        .wrap(WrapRequest {
            key_id: String::new(),
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[("k", "a")]),
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let limits = kms_sidecar::envelope::EnvelopeLimits::default();
    let parsed_a = kms_sidecar::envelope::parse_header(&a, &limits)
        .unwrap()
        .unwrap();
    let data_key = kms_sidecar::secret::DataKey::take_from(&mut [5u8; 32]).unwrap();
    let forged = kms_sidecar::envelope::seal(
        &data_key,
        kms_sidecar::envelope::EncryptionContext::from_pairs(ctx(&[("k", "b")])),
        parsed_a.header.encrypted_data_keys.clone(),
        4096,
        b"y",
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let err = client
        .unwrap(UnwrapRequest {
            envelope: forged,
            encryption_context: ctx(&[("k", "b")]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "DECRYPT_AUTH_FAILED");
    sidecar.stop().await;
}

/// Strict mode: an envelope wrapped under a key this sidecar is not
/// configured for fails like any authentication failure.
#[tokio::test]
async fn envelope_of_an_unconfigured_key_fails_authentication() {
    let kms = kms_client();
    let a = create_key(&kms).await;
    let b = create_key(&kms).await;
    let wrapper = Sidecar::start(kms_keyring(std::slice::from_ref(&a)).await).await;
    let other = Sidecar::start(kms_keyring(std::slice::from_ref(&b)).await).await;
    let envelope = wrapper
        .client()
        .await
        .wrap(WrapRequest {
            plaintext: b"secret".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let err = other
        .client()
        .await
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DECRYPT_AUTH_FAILED");
    wrapper.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn missing_key_and_unreachable_kms_are_distinct_and_actionable() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    // A well-formed ARN that moto has never seen.
    let ghost =
        arn.rsplit_once("key/").unwrap().0.to_owned() + "key/00000000-0000-0000-0000-000000000000";
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&ghost)).await).await;
    let err = sidecar
        .client()
        .await
        .wrap(WrapRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "KMS_KEY_NOT_FOUND");
    assert!(err.message().contains(&ghost));
    sidecar.stop().await;

    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let keyring = kms_sidecar::keyring::Keyring::AwsKms(
        kms_sidecar::keyring::AwsKmsKeyring::resolve(
            common::kms_client_for(&dead),
            std::slice::from_ref(&arn),
        )
        .await
        .unwrap(),
    );
    let sidecar = Sidecar::start(keyring).await;
    let err = sidecar
        .client()
        .await
        .wrap(WrapRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "KMS_UNAVAILABLE");
    sidecar.stop().await;
}

#[tokio::test]
async fn unresolvable_alias_fails_at_start() {
    let err = kms_sidecar::keyring::AwsKmsKeyring::resolve(
        kms_client(),
        &["alias/does-not-exist".into()],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, kms_sidecar::error::Error::KmsKeyNotFound { .. }),
        "{err:?}"
    );
}

/// moto's KMS treats `{"ab":"c"}` and `{"a":"bc"}` as the same context; the
/// envelope's length-prefixed context must not inherit that ambiguity.
#[tokio::test]
async fn ambiguous_contexts_are_distinct() {
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let sidecar = Sidecar::start(kms_keyring(std::slice::from_ref(&arn)).await).await;
    let mut client = sidecar.client().await;
    let envelope = client
        .wrap(WrapRequest {
            plaintext: b"bound".to_vec(),
            encryption_context: ctx(&[("ab", "c")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let err = client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("a", "bc")]),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DECRYPT_AUTH_FAILED");
    let ok = client
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[("ab", "c")]),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().plaintext, b"bound");
    sidecar.stop().await;
}

/// Field case B11 (the parts moto can play): the deep probe turns the
/// KeyService status NOT_SERVING when the key cannot be used or KMS cannot
/// be reached, while the overall status used for liveness stays SERVING;
/// it comes back once a probe succeeds.
#[tokio::test]
async fn b11_deep_probe_drives_readiness_not_liveness() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let config = kms_sidecar::config::ServiceConfig {
        health_probe_interval: Some(std::time::Duration::from_millis(200)),
        ..Default::default()
    };
    let kms = kms_client();
    let arn = create_key(&kms).await;
    let ghost =
        arn.rsplit_once("key/").unwrap().0.to_owned() + "key/11111111-2222-3333-4444-555555555555";
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let broken = [
        kms_keyring(std::slice::from_ref(&ghost)).await,
        kms_sidecar::keyring::Keyring::AwsKms(
            kms_sidecar::keyring::AwsKmsKeyring::resolve(
                common::kms_client_for(&dead),
                std::slice::from_ref(&arn),
            )
            .await
            .unwrap(),
        ),
    ];
    for keyring in broken {
        let sidecar = Sidecar::start_with(keyring, config, &[]).await;
        let mut health = HealthClient::new(sidecar.channel().await);
        let mut watch = health
            .watch(HealthCheckRequest {
                service: "kms_sidecar.v1.KeyService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let next = tokio::time::timeout_at(deadline, watch.next()).await;
            let status = next
                .expect("NOT_SERVING within 10 s")
                .unwrap()
                .unwrap()
                .status;
            if status == ServingStatus::NotServing as i32 {
                break;
            }
        }
        let overall = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            overall,
            ServingStatus::Serving as i32,
            "liveness unaffected"
        );
        drop((watch, health)); // an open Watch would hold the shutdown to its bound
        sidecar.stop().await;
    }

    // A working key: SERVING, and it stays so.
    let sidecar =
        Sidecar::start_with(kms_keyring(std::slice::from_ref(&arn)).await, config, &[]).await;
    let mut health = HealthClient::new(sidecar.channel().await);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await; // three probe periods
    let status = health
        .check(HealthCheckRequest {
            service: "kms_sidecar.v1.KeyService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    sidecar.stop().await;
}
