//! The Prometheus endpoint of the real binary (`--metrics-listen`): its
//! output is parsed and checked against the calls made, with the AWS KMS
//! keyring against moto behind the fault-injecting proxy. One test, so no
//! other test in this binary moves the process-wide counters.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::kms_proxy::{Fault, KmsProxy};
use common::{create_key, ctx, kms_client, kms_server};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapRequest, WrapRequest, WrapStreamRequest};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET /metrics over plain HTTP/1.1; returns (status line, body).
fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Parses the exposition format: series → value; checks that every series
/// belongs to a family declared with # TYPE.
fn parse(body: &str) -> BTreeMap<String, f64> {
    let mut families = Vec::new();
    let mut series = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap();
        let family = name.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| family == f
                || family
                    .strip_prefix(f.as_str())
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
            "series {name} has no # TYPE"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(
            series.insert(name.to_owned(), value).is_none(),
            "duplicate {name}"
        );
    }
    series
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

#[tokio::test]
async fn metrics_endpoint_reports_requests_kms_calls_cache_and_bytes() {
    let arn = create_key(&kms_client()).await;
    let proxy = KmsProxy::start(&kms_server().endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let target = format!("unix://{}", sock.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
        .env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .env("AWS_REGION", common::REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args([
            "--keyring",
            "aws-kms",
            "--key-id",
            &arn,
            "--listen",
            &target,
        ])
        .args(["--metrics-listen", &metrics, "--health-probe-interval", "0"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    for _ in 0..200 {
        if sock.exists() && std::net::TcpStream::connect(&metrics).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = KeyServiceClient::new(kms_sidecar::client::connect(&target).await.unwrap());

    // Two Wraps of one context: one KMS call, one cache hit.
    let mut envelope = Vec::new();
    for _ in 0..2 {
        envelope = client
            .wrap(WrapRequest {
                plaintext: vec![1; 100],
                encryption_context: ctx(&[("m", "1")]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .envelope;
    }
    // One Unwrap with the wrong context, one that KMS denies.
    let bad = client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("m", "2")]),
        })
        .await;
    assert!(bad.is_err());
    proxy.inject(Some("Decrypt"), Fault::AccessDenied, Some(1));
    let denied = client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("m", "1")]),
        })
        .await;
    assert!(denied.is_err());
    // A WrapStream of 1000 bytes.
    let mut out = client
        .wrap_stream(tokio_stream::iter(vec![WrapStreamRequest {
            chunk: vec![2; 1000],
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    while out.message().await.unwrap().is_some() {}

    let (status, body) = scrape(&metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let m = parse(&body);
    assert_eq!(
        get(&m, r#"kms_sidecar_requests_total{method="Wrap",code="OK"}"#),
        2.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_requests_total{method="Unwrap",code="INVALID_ARGUMENT"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_requests_total{method="Unwrap",code="FAILED_PRECONDITION"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_requests_total{method="WrapStream",code="OK"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_request_duration_seconds_count{method="Wrap"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_request_duration_seconds_bucket{method="Wrap",le="+Inf"}"#
        ),
        2.0
    );
    // Buckets are cumulative.
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with(r#"kms_sidecar_request_duration_seconds_bucket{method="Wrap""#)
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.iter().all(|v| *v <= 2.0) && buckets.len() == 15);
    // KMS: one GenerateDataKey for the two Wraps, one for the stream (no
    // declared length: never cached); the wrong-context Unwrap is refused
    // before KMS; the denied Decrypt is classified.
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_kms_calls_total{operation="kms:GenerateDataKey",result="ok"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            r#"kms_sidecar_kms_calls_total{operation="kms:Decrypt",result="access_denied"}"#
        ),
        1.0
    );
    assert!(
        get(
            &m,
            r#"kms_sidecar_kms_call_duration_seconds_count{operation="kms:Decrypt"}"#
        ) >= 1.0
    );
    assert_eq!(get(&m, "kms_sidecar_cache_enabled"), 1.0);
    assert_eq!(
        get(&m, r#"kms_sidecar_cache_hits_total{side="encrypt"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"kms_sidecar_cache_misses_total{side="encrypt"}"#),
        1.0
    );
    assert_eq!(get(&m, r#"kms_sidecar_cache_entries{side="encrypt"}"#), 1.0);
    assert_eq!(
        get(&m, "kms_sidecar_plaintext_sealed_bytes_total"),
        200.0 + 1000.0
    );
    assert_eq!(get(&m, "kms_sidecar_plaintext_opened_bytes_total"), 0.0);
    assert_eq!(get(&m, "kms_sidecar_streams_in_flight"), 0.0);
    // Only fixed label values: no context, key material or peer in labels.
    assert!(!body.contains("\"m\"") && !body.contains("127.0.0.1"));

    let (status, _) = scrape(&metrics, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}
