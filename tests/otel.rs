//! OpenTelemetry export (`--otel`): the real binary sends its traces and
//! metrics over OTLP/gRPC to a real OTLP receiver run by this test (a tonic
//! server built from the OpenTelemetry proto definitions), and flushes them
//! when it shuts down on SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kms_proxy::KmsProxy;
use common::{create_key, ctx, kms_client, kms_server};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapRequest, WrapRequest};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;

const MARKER: &[u8] = b"OTEL-PLAINTEXT-MARKER-5b1e";
const CONTEXT_VALUE: &str = "OTEL-CONTEXT-VALUE-77aa";

#[derive(Default, Clone)]
struct Collector {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(attrs: &'a [KeyValue], key: &str) -> &'a str {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("attribute {key}: {other:?}"),
    }
}

fn int(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(n)) => *n,
        other => panic!("attribute {key}: {other:?}"),
    }
}

fn boolean(attrs: &[KeyValue], key: &str) -> bool {
    match attr(attrs, key) {
        Some(any_value::Value::BoolValue(b)) => *b,
        other => panic!("attribute {key}: {other:?}"),
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn otlp_export_of_spans_and_metrics_flushed_at_shutdown() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let arn = create_key(&kms_client()).await;
    let proxy = KmsProxy::start(&kms_server().endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let target = format!("unix://{}", sock.display());
    let child = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
        .env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .env("AWS_REGION", common::REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("KMS_SIDECAR_OTEL", "true")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "kms-sidecar-otel-test")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "60000")
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .args([
            "--keyring",
            "aws-kms",
            "--key-id",
            &arn,
            "--listen",
            &target,
        ])
        .args(["--health-probe-interval", "0", "--drain-window", "0s"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = KeyServiceClient::new(kms_sidecar::client::connect(&target).await.unwrap());
    // Two Wraps of one context (a cache miss, then a hit), an Unwrap, and
    // an Unwrap with the wrong context.
    let mut envelope = Vec::new();
    for _ in 0..2 {
        envelope = client
            .wrap(WrapRequest {
                plaintext: MARKER.to_vec(),
                encryption_context: ctx(&[("tenant", CONTEXT_VALUE)]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .envelope;
    }
    client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("tenant", CONTEXT_VALUE)]),
        })
        .await
        .unwrap();
    let wrong = client
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[("tenant", "another")]),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    drop(client);

    // Export intervals are a minute: what arrives was flushed at shutdown.
    assert!(collector.traces.lock().unwrap().is_empty());
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut exited = None;
    for _ in 0..300 {
        if let Some(code) = child.0.try_wait().unwrap() {
            exited = Some(code);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exited.expect("exits within 15 s").success());

    let traces = collector.traces.lock().unwrap().clone();
    let resource = traces[0].resource_spans[0].resource.as_ref().unwrap();
    assert_eq!(
        text(&resource.attributes, "service.name"),
        "kms-sidecar-otel-test"
    );
    let spans: Vec<Span> = traces
        .iter()
        .flat_map(|t| &t.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| s.spans.clone())
        .collect();
    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let wraps = named("Wrap");
    assert_eq!(wraps.len(), 2, "two Wrap spans");
    for wrap in &wraps {
        assert_eq!(text(&wrap.attributes, "key_id"), arn);
        assert_eq!(
            int(&wrap.attributes, "plaintext_bytes"),
            MARKER.len() as i64
        );
        assert!(text(&wrap.attributes, "caller").starts_with("uid:"));
        assert_eq!(text(&wrap.attributes, "result"), "ok");
        assert_eq!(text(&wrap.attributes, "code"), "OK");
    }
    // The first Wrap asked KMS; the second was served by the cache.
    let mut hits: Vec<bool> = wraps
        .iter()
        .map(|w| boolean(&w.attributes, "cache_hit"))
        .collect();
    hits.sort_unstable();
    assert_eq!(hits, [false, true]);
    let wrap = wraps
        .iter()
        .find(|w| !boolean(&w.attributes, "cache_hit"))
        .unwrap();
    let unwraps = named("Unwrap");
    assert_eq!(unwraps.len(), 2, "two Unwrap spans");
    let ok = unwraps
        .iter()
        .find(|u| text(&u.attributes, "result") == "ok")
        .expect("the good Unwrap");
    assert_eq!(text(&ok.attributes, "key_id"), arn);
    assert_eq!(text(&ok.attributes, "code"), "OK");
    assert!(!boolean(&ok.attributes, "cache_hit"), "decrypt side cold");
    let failed = unwraps
        .iter()
        .find(|u| text(&u.attributes, "result") != "ok")
        .unwrap();
    assert_eq!(text(&failed.attributes, "result"), "data_corrupt");
    assert_eq!(text(&failed.attributes, "code"), "INVALID_ARGUMENT");
    // The KMS call is a child span of the Wrap that made it.
    let kms = spans
        .iter()
        .find(|s| s.name == "kms" && text(&s.attributes, "operation") == "kms:GenerateDataKey")
        .expect("a kms span for GenerateDataKey");
    assert_eq!(text(&kms.attributes, "result"), "ok");
    assert_eq!(text(&kms.attributes, "key_id"), arn);
    assert_eq!(kms.trace_id, wrap.trace_id);
    assert_eq!(kms.parent_span_id, wrap.span_id);
    // Only the sidecar's spans: no HTTP/2 or SDK internals.
    assert!(
        spans
            .iter()
            .all(|s| ["Wrap", "Unwrap", "kms"].contains(&s.name.as_str())),
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    let metrics = collector.metrics.lock().unwrap().clone();
    let all: Vec<_> = metrics
        .iter()
        .flat_map(|m| &m.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| s.metrics.clone())
        .collect();
    let requests = all
        .iter()
        .find(|m| m.name == "kms_sidecar.requests")
        .expect("kms_sidecar.requests exported");
    let Some(metric::Data::Sum(sum)) = &requests.data else {
        panic!("requests is a sum: {requests:?}")
    };
    let wrap_points = sum
        .data_points
        .iter()
        .find(|p| text(&p.attributes, "method") == "Wrap" && text(&p.attributes, "code") == "OK")
        .expect("Wrap OK data point");
    assert_eq!(wrap_points.value, Some(number_data_point::Value::AsInt(2)));
    let duration = all
        .iter()
        .find(|m| m.name == "kms_sidecar.request.duration")
        .expect("latency histogram exported");
    let Some(metric::Data::Histogram(h)) = &duration.data else {
        panic!("a histogram: {duration:?}")
    };
    assert_eq!(h.data_points.iter().map(|p| p.count).sum::<u64>(), 4);
    assert!(all.iter().any(|m| m.name == "kms_sidecar.kms.calls"));

    // No plaintext or context value in anything exported.
    let exported = format!("{traces:?}{metrics:?}");
    assert!(!exported.contains(CONTEXT_VALUE));
    let marker = String::from_utf8_lossy(MARKER);
    assert!(!exported.contains(marker.as_ref()));
}
