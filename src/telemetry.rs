//! Logs, and OpenTelemetry export of traces and metrics over OTLP/gRPC.
//!
//! Logs always go to stderr (`RUST_LOG`). With `--otel`, the sidecar's own
//! spans (one per RPC, one per KMS call; safe fields only) and its metrics
//! (the same counters as `/metrics`, plus latency histograms) are also
//! exported over OTLP. The endpoint, headers, sampling, export interval and
//! service name come from the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (default `http://localhost:4317`), `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_METRIC_EXPORT_INTERVAL`,
//! `OTEL_SERVICE_NAME` (default `kms-sidecar`). Buffered data is flushed at
//! shutdown.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The exporters to flush at shutdown.
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

/// Installs the log subscriber, and the OTLP exporters when `otel` is set.
/// Must run inside the Tokio runtime (the OTLP client is tonic).
///
/// # Errors
/// A one-line message when an exporter cannot be built (bad endpoint).
pub fn init(otel: bool) -> Result<Telemetry, String> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    if !otel {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry::default());
    }
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kms-sidecar".to_owned());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let span_exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("cannot set up OTLP trace export: {e}"))?;
    let traces = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(span_exporter)
        .build();
    let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("cannot set up OTLP metric export: {e}"))?;
    let metrics = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_periodic_exporter(metric_exporter)
        .build();
    crate::metrics::register_otel(&opentelemetry::metrics::MeterProvider::meter(
        &metrics,
        "kms-sidecar",
    ));
    // Only the sidecar's own spans: not those of the HTTP/2 and AWS stacks.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(traces.tracer("kms-sidecar"))
        .with_filter(Targets::new().with_target("kms_sidecar", tracing::Level::INFO));
    tracing_subscriber::registry().with(logs).with(spans).init();
    tracing::info!("exporting traces and metrics over OTLP");
    Ok(Telemetry {
        traces: Some(traces),
        metrics: Some(metrics),
    })
}

impl Telemetry {
    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(e) = traces.shutdown()
        {
            eprintln!("kms-sidecar: flushing OTLP traces failed: {e}");
        }
        if let Some(metrics) = self.metrics
            && let Err(e) = metrics.shutdown()
        {
            eprintln!("kms-sidecar: flushing OTLP metrics failed: {e}");
        }
    }
}
