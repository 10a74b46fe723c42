//! gRPC behaviour that does not depend on KMS: the local keyring, size
//! limits, empty payloads, tampering, health, reflection, Unix sockets.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use common::{Sidecar, ctx, local_keyring, reason};
use kms_sidecar::config::{ListenAddr, ServiceConfig};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{GenerateDataKeyRequest, UnwrapRequest, WrapRequest};
use tonic::Code;

const MIB: usize = 1024 * 1024;

/// Field case B02 (unary): sizes around the 4 MiB limit of a stock client.
/// Nothing the server accepts produces a reply the client would reject.
#[tokio::test]
async fn b02_unary_size_limits() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let max = ServiceConfig::default().max_wrap_plaintext();
    assert_eq!(max, 4_128_768, "documented maximum");

    // The documented maximum round-trips with a stock client.
    let plaintext = vec![0xA5u8; max];
    let envelope = client
        .wrap(WrapRequest {
            plaintext: plaintext.clone(),
            encryption_context: ctx(&[("k", "v")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    assert!(envelope.len() <= 4 * MIB);
    let opened = client
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[("k", "v")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, plaintext);

    // P1 = 4 MiB - 1 KiB: the request fits, the reply would not: refused
    // up front with both sizes named.
    for size in [max + 1, 4 * MIB - 1024] {
        let err = client
            .wrap(WrapRequest {
                plaintext: vec![0; size],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{size}");
        assert_eq!(reason(&err), "PAYLOAD_TOO_LARGE");
        assert!(
            err.message().contains(&size.to_string()),
            "{}",
            err.message()
        );
        assert!(
            err.message().contains(&max.to_string()),
            "{}",
            err.message()
        );
    }

    // P2 = 4 MiB and P3 = 4 MiB + 1: the request itself is over the
    // server's limit. RESOURCE_EXHAUSTED naming both sizes, not
    // OUT_OF_RANGE and not a dropped connection.
    for size in [4 * MIB, 4 * MIB + 1] {
        let err = client
            .wrap(WrapRequest {
                plaintext: vec![0; size],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{size}: {err:?}");
        assert_eq!(reason(&err), "PAYLOAD_TOO_LARGE");
        assert!(
            err.message().contains(&(4 * MIB).to_string()),
            "{}",
            err.message()
        );
        let request_len = size + 5; // field tag and length prefix
        assert!(
            err.message().contains(&request_len.to_string()),
            "{}",
            err.message()
        );
    }
    // The connection is still usable.
    client
        .wrap(WrapRequest {
            plaintext: b"after".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    sidecar.stop().await;
}

/// Field case B07: empty plaintext round-trips, with and without context;
/// a flipped tag byte is an authentication failure.
#[tokio::test]
async fn b07_empty_plaintext() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    for context in [ctx(&[("k", "v")]), ctx(&[])] {
        let envelope = client
            .wrap(WrapRequest {
                plaintext: Vec::new(),
                encryption_context: context.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .envelope;
        let limits = kms_sidecar::envelope::EnvelopeLimits::default();
        let header_len = kms_sidecar::envelope::parse_header(&envelope, &limits)
            .unwrap()
            .unwrap()
            .len;
        assert_eq!(
            (envelope.len() - header_len) as u64,
            kms_sidecar::envelope::FINAL_FRAME_OVERHEAD,
            "only the fixed overhead"
        );
        let opened = client
            .unwrap(UnwrapRequest {
                envelope: envelope.clone(),
                encryption_context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(opened.plaintext.is_empty());

        let mut tampered = envelope;
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        let err = client
            .unwrap(UnwrapRequest {
                envelope: tampered,
                encryption_context: context,
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "DECRYPT_AUTH_FAILED");
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn wrong_local_key_and_garbage_fail_alike() {
    let a = Sidecar::start(local_keyring(1)).await;
    let b = Sidecar::start(local_keyring(2)).await;
    let envelope = a
        .client()
        .await
        .wrap(WrapRequest {
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let mut client = b.client().await;
    let wrong_key = client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap_err();
    let truncated = client
        .unwrap(UnwrapRequest {
            envelope: envelope[..envelope.len() / 2].to_vec(),
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_key.code(), truncated.code());
    assert_eq!(wrong_key.message(), truncated.message());
    assert_eq!(reason(&wrong_key), "DECRYPT_AUTH_FAILED");

    let not_esdk = client
        .unwrap(UnwrapRequest {
            envelope: b"hello, not an envelope".to_vec(),
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap_err();
    assert_eq!(not_esdk.code(), Code::InvalidArgument);
    assert_eq!(reason(&not_esdk), "UNSUPPORTED_ENVELOPE");
    let empty = client.unwrap(UnwrapRequest::default()).await.unwrap_err();
    assert_eq!(reason(&empty), "DECRYPT_AUTH_FAILED");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn local_generate_data_key_and_request_validation() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let out = client
        .generate_data_key(GenerateDataKeyRequest {
            number_of_bytes: 64,
            encryption_context: ctx(&[("a", "b")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.key_id, "local-key");
    assert_eq!(out.plaintext.len(), 64);
    // The blob is an ESDK encrypted-data-key structure of the raw AES keyring.
    let edk = kms_sidecar::envelope::EncryptedDataKey::parse_exact(&out.ciphertext_blob).unwrap();
    assert_eq!(edk.provider_id, "kms-sidecar");
    assert!(edk.provider_info.starts_with(b"local-key"));

    let err = client
        .wrap(WrapRequest {
            key_id: "some-other-key".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "KEY_NOT_CONFIGURED");
    assert!(err.message().contains("local-key"));

    for (bad, needle) in [
        (ctx(&[("aws-crypto-public-key", "x")]), "reserved"),
        (ctx(&[("", "x")]), "must not be empty"),
    ] {
        let err = client
            .wrap(WrapRequest {
                encryption_context: bad,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(reason(&err), "INVALID_REQUEST");
        assert!(err.message().contains(needle));
    }
    let big = "v".repeat(9000);
    let err = client
        .wrap(WrapRequest {
            encryption_context: ctx(&[("k", &big)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("8192"));
    sidecar.stop().await;
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut health = HealthClient::new(sidecar.channel().await);
    for service in ["", "kms_sidecar.v1.KeyService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    sidecar.stop().await;
}

/// Field case B09 (reflection part): both reflection versions list and
/// describe the service, so grpcurl needs no proto files.
#[tokio::test]
async fn b09_reflection_v1_and_v1alpha() {
    use tokio_stream::StreamExt;
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let channel = sidecar.channel().await;

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Req;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Resp;
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Req::ListServices(String::new())),
    };
    let mut stream = V1::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(V1Resp::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1: no service list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"kms_sidecar.v1.KeyService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1a;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as V1aReq;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as V1aResp;
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1aReq::FileContainingSymbol(
            "kms_sidecar.v1.KeyService".into(),
        )),
    };
    let mut stream = V1a::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(V1aResp::FileDescriptorResponse(files)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha: no file descriptor")
    };
    use prost::Message;
    let file =
        prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..]).unwrap();
    assert_eq!(file.package(), "kms_sidecar.v1");
    let wrap_req = file
        .message_type
        .iter()
        .find(|m| m.name() == "WrapRequest")
        .unwrap();
    let plaintext = wrap_req
        .field
        .iter()
        .find(|f| f.name() == "plaintext")
        .unwrap();
    assert_eq!(
        plaintext.r#type(),
        prost_types::field_descriptor_proto::Type::Bytes
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn unix_socket_serves_and_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.sock");
    let sidecar = Sidecar::start_with(
        local_keyring(3),
        ServiceConfig::default(),
        &[ListenAddr::Unix(path.clone())],
    )
    .await;
    let target = format!("unix://{}", path.display());
    let channel = kms_sidecar::client::connect(&target).await.unwrap();
    let mut client = KeyServiceClient::new(channel);
    let envelope = client
        .wrap(WrapRequest {
            plaintext: b"over a unix socket".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    // Wrapped over the socket, unwrapped over TCP: same service.
    let opened = sidecar
        .client()
        .await
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, b"over a unix socket");
    drop(client);
    sidecar.stop().await;
    assert!(!path.exists(), "socket file removed at shutdown");
}

#[tokio::test]
async fn live_unix_socket_is_not_stolen_and_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.sock");
    let first = Sidecar::start_with(
        local_keyring(3),
        ServiceConfig::default(),
        &[ListenAddr::Unix(path.clone())],
    )
    .await;
    let err = kms_sidecar::server::bind(&[ListenAddr::Unix(path.clone())], 0o600, None)
        .await
        .unwrap_err();
    assert!(err.contains("another process is serving"), "{err}");
    first.stop().await;

    // A stale socket file (its server is gone) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let listeners = kms_sidecar::server::bind(&[ListenAddr::Unix(path.clone())], 0o600, None)
        .await
        .unwrap();
    assert_eq!(listeners.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A regular file is never removed.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err = kms_sidecar::server::bind(&[ListenAddr::Unix(file.clone())], 0o600, None)
        .await
        .unwrap_err();
    assert!(err.contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[tokio::test]
async fn local_key_file_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys").join("local-key");
    let config = |path: &std::path::Path| {
        use clap::Parser;
        let cli = kms_sidecar::config::Cli::try_parse_from([
            "kms-sidecar",
            "--local-key-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        kms_sidecar::config::Config::try_from(cli.serve).unwrap()
    };
    let first = Sidecar::start(
        kms_sidecar::build_keyring(&config(&key_file))
            .await
            .unwrap(),
    )
    .await;
    let envelope = first
        .client()
        .await
        .wrap(WrapRequest {
            plaintext: b"kept across restarts".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    first.stop().await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let second = Sidecar::start(
        kms_sidecar::build_keyring(&config(&key_file))
            .await
            .unwrap(),
    )
    .await;
    let opened = second
        .client()
        .await
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, b"kept across restarts");
    second.stop().await;
}

/// Field case B12 (unary): concurrent large calls beyond the in-flight
/// byte budget are refused at once with RESOURCE_EXHAUSTED, never queued;
/// the others complete well within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_inflight_budget_refuses_fast() {
    let config = ServiceConfig {
        max_inflight_bytes: 8 * MIB,
        ..ServiceConfig::default()
    };
    let sidecar = Sidecar::start_with(local_keyring(1), config, &[]).await;
    let client = sidecar.client().await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut c = client.clone();
        calls.spawn(async move {
            let started = std::time::Instant::now();
            let mut req = tonic::Request::new(WrapRequest {
                plaintext: vec![3u8; 2 * MIB],
                ..Default::default()
            });
            req.set_timeout(std::time::Duration::from_secs(10));
            (c.wrap(req).await.map(|_| ()), started.elapsed())
        });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(done) = calls.join_next().await {
        let (result, elapsed) = done.unwrap();
        assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");
        match result {
            Ok(()) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "SIDECAR_BUSY");
                assert!(status.message().contains("--max-inflight-bytes"));
                busy += 1;
            }
        }
    }
    assert!(ok >= 1, "some calls are served");
    assert_eq!(ok + busy, 16);
    // Budget released: a call now succeeds.
    client
        .clone()
        .wrap(WrapRequest {
            plaintext: vec![1u8; 2 * MIB],
            ..Default::default()
        })
        .await
        .unwrap();
    sidecar.stop().await;
}

/// With small frames the documented unary maximum shrinks so that the
/// reply still fits: the largest accepted plaintext round-trips.
#[tokio::test]
async fn small_frames_keep_unary_replies_within_the_limit() {
    let config = ServiceConfig {
        frame_length: 1024,
        ..ServiceConfig::default()
    };
    let max = config.max_wrap_plaintext();
    assert!(max < 4_128_768);
    let sidecar = Sidecar::start_with(local_keyring(1), config, &[]).await;
    let mut client = sidecar.client().await;
    let envelope = client
        .wrap(WrapRequest {
            plaintext: vec![9u8; max],
            encryption_context: ctx(&[("k", &"v".repeat(8000))]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    assert!(envelope.len() <= 4 * MIB);
    let err = client
        .wrap(WrapRequest {
            plaintext: vec![9u8; max + 1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "PAYLOAD_TOO_LARGE");
    assert!(err.message().contains("WrapStream"));
    sidecar.stop().await;
}

/// `--max-connections`: connections beyond the limit are closed as soon as
/// they are accepted (the client fails fast, it does not hang), and a slot
/// frees when a connection closes.
#[tokio::test]
async fn connections_over_the_limit_are_refused_at_once() {
    use std::time::{Duration, Instant};
    let config = ServiceConfig {
        max_connections: 2,
        ..ServiceConfig::default()
    };
    let sidecar = Sidecar::start_with(local_keyring(1), config, &[]).await;
    let wrap = |channel: tonic::transport::Channel| async move {
        KeyServiceClient::new(channel)
            .wrap(WrapRequest {
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
    };
    let first = sidecar.channel().await;
    let second = sidecar.channel().await;
    wrap(first.clone()).await.unwrap();
    wrap(second.clone()).await.unwrap();

    let third = async {
        let channel = tonic::transport::Endpoint::from_shared(sidecar.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        wrap(channel).await
    };
    let started = Instant::now();
    let status = third
        .await
        .expect_err("a third connection is over the limit");
    // tonic reports a connection closed under it as CANCELLED or
    // UNAVAILABLE, depending on when it sees the close.
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once, not after a timeout: {:?}",
        started.elapsed()
    );

    // Closing one connection frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(sidecar.url())
            .unwrap()
            .connect()
            .await
            && wrap(channel).await.is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wrap(second).await.unwrap();
    sidecar.stop().await;
}

/// Health (open to every caller) refuses large requests instead of
/// buffering them outside the unary budget.
#[tokio::test]
async fn health_requests_are_small() {
    let sidecar = Sidecar::start_with(local_keyring(1), ServiceConfig::default(), &[]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(100 * 1024),
        })
        .await
        .expect_err("100 KiB is over the 16 KiB limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let ok = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status, 1, "SERVING");
    sidecar.stop().await;
}
