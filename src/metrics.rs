//! Prometheus metrics, served as text on the optional admin listener
//! (`--metrics-listen`, `GET /metrics`).
//!
//! Names and labels are stable and documented in the README; every label
//! takes values from a fixed set (RPC names, gRPC codes, KMS operations,
//! result classes, cache sides and causes), never from requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::cache::Materials;
use crate::error::{Error, ErrorClass};

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, slot) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *slot += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// The process's metrics.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    request_seconds: Mutex<BTreeMap<&'static str, Histogram>>,
    kms_calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    kms_seconds: Mutex<BTreeMap<&'static str, Histogram>>,
    streams_in_flight: AtomicI64,
    bytes_sealed: AtomicU64,
    bytes_opened: AtomicU64,
    cache: Mutex<Option<Weak<Materials>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// The stable name of a gRPC code, as in the gRPC specification.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The result class of a KMS call, as the `result` label names it.
pub fn kms_result(result: Result<(), &Error>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(e) => match e {
            Error::KmsThrottled { .. } => "throttled",
            Error::KmsAccessDenied { .. } => "access_denied",
            Error::KmsKeyDisabled { .. } => "key_disabled",
            Error::KmsKeyNotFound { .. } => "not_found",
            Error::DecryptAuthFailed { .. } => "invalid_ciphertext",
            Error::CredentialsUnavailable(_) => "credentials_unavailable",
            Error::KmsUnavailable { .. } => "unavailable",
            _ if e.class() == ErrorClass::BackendUnavailable => "unavailable",
            _ => "unexpected",
        },
    }
}

impl Metrics {
    /// Counts a finished RPC.
    pub fn request(&self, method: &'static str, code: tonic::Code, took: Duration) {
        let code = code_name(code);
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method, code)).or_default() += 1;
        }
        if let Ok(mut m) = self.request_seconds.lock() {
            m.entry(method).or_default().observe(took.as_secs_f64());
        }
        if let Some(otel) = OTEL.get() {
            otel.requests.record(
                took.as_secs_f64(),
                &[KeyValue::new("method", method), KeyValue::new("code", code)],
            );
        }
    }

    /// Counts a finished KMS call.
    pub fn kms_call(&self, operation: &'static str, result: &'static str, took: Duration) {
        if let Ok(mut m) = self.kms_calls.lock() {
            *m.entry((operation, result)).or_default() += 1;
        }
        if let Ok(mut m) = self.kms_seconds.lock() {
            m.entry(operation).or_default().observe(took.as_secs_f64());
        }
        if let Some(otel) = OTEL.get() {
            otel.kms.record(
                took.as_secs_f64(),
                &[
                    KeyValue::new("operation", operation),
                    KeyValue::new("result", result),
                ],
            );
        }
    }

    fn snapshot(
        map: &Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    ) -> Vec<((&'static str, &'static str), u64)> {
        map.lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    fn cache_stats(&self) -> Option<crate::cache::CacheStats> {
        let materials = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().and_then(Weak::upgrade))?;
        materials.cache().map(crate::cache::DataKeyCache::stats)
    }

    /// A streaming call started (+1) or ended (-1).
    pub fn streams(&self, delta: i64) {
        self.streams_in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// Plaintext bytes sealed into envelopes.
    pub fn sealed(&self, bytes: u64) {
        self.bytes_sealed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Plaintext bytes opened from envelopes.
    pub fn opened(&self, bytes: u64) {
        self.bytes_opened.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Reports the cache counters of `materials` (the serving sidecar's).
    pub fn watch_cache(&self, materials: &Arc<Materials>) {
        if let Ok(mut c) = self.cache.lock() {
            *c = Some(Arc::downgrade(materials));
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        counter_family(
            &mut out,
            "kms_sidecar_requests_total",
            "RPCs finished, by method and gRPC status code.",
            ("method", "code"),
            &self.requests,
        );
        histogram_family(
            &mut out,
            "kms_sidecar_request_duration_seconds",
            "RPC latency, from the request to the status, by method.",
            "method",
            &self.request_seconds,
        );
        counter_family(
            &mut out,
            "kms_sidecar_kms_calls_total",
            "KMS calls made, by operation and result class.",
            ("operation", "result"),
            &self.kms_calls,
        );
        histogram_family(
            &mut out,
            "kms_sidecar_kms_call_duration_seconds",
            "KMS call latency, retries included, by operation.",
            "operation",
            &self.kms_seconds,
        );
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_streams_in_flight WrapStream and UnwrapStream calls in progress.\n\
             # TYPE kms_sidecar_streams_in_flight gauge\n\
             kms_sidecar_streams_in_flight {}",
            self.streams_in_flight.load(Ordering::Relaxed)
        );
        for (name, help, value) in [
            (
                "kms_sidecar_plaintext_sealed_bytes_total",
                "Plaintext bytes sealed into envelopes (Wrap, WrapStream).",
                &self.bytes_sealed,
            ),
            (
                "kms_sidecar_plaintext_opened_bytes_total",
                "Plaintext bytes opened from envelopes (Unwrap, UnwrapStream).",
                &self.bytes_opened,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.render_cache(&mut out);
        out
    }

    fn render_cache(&self, out: &mut String) {
        let stats = self.cache_stats();
        let enabled = u8::from(stats.is_some());
        let s = stats.unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_cache_enabled 1 when the data-key cache is in use.\n\
             # TYPE kms_sidecar_cache_enabled gauge\nkms_sidecar_cache_enabled {enabled}"
        );
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_cache_hits_total Data keys served by the cache, by side.\n\
             # TYPE kms_sidecar_cache_hits_total counter\n\
             kms_sidecar_cache_hits_total{{side=\"encrypt\"}} {}\n\
             kms_sidecar_cache_hits_total{{side=\"decrypt\"}} {}",
            s.encrypt_hits, s.decrypt_hits
        );
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_cache_misses_total Cache lookups that asked KMS, by side.\n\
             # TYPE kms_sidecar_cache_misses_total counter\n\
             kms_sidecar_cache_misses_total{{side=\"encrypt\"}} {}\n\
             kms_sidecar_cache_misses_total{{side=\"decrypt\"}} {}",
            s.encrypt_misses, s.decrypt_misses
        );
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_cache_evictions_total Entries removed, by cause.\n\
             # TYPE kms_sidecar_cache_evictions_total counter"
        );
        for (cause, n) in [
            ("age", s.evicted_age),
            ("messages", s.evicted_messages),
            ("bytes", s.evicted_bytes),
            ("capacity", s.evicted_capacity),
            ("flush", s.evicted_flush),
        ] {
            let _ = writeln!(
                out,
                "kms_sidecar_cache_evictions_total{{cause=\"{cause}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kms_sidecar_cache_entries Entries in the cache, by side.\n\
             # TYPE kms_sidecar_cache_entries gauge\n\
             kms_sidecar_cache_entries{{side=\"encrypt\"}} {}\n\
             kms_sidecar_cache_entries{{side=\"decrypt\"}} {}",
            s.encrypt_entries, s.decrypt_entries
        );
    }
}

/// The OpenTelemetry histograms, once OTLP export is on.
struct OtelInstruments {
    requests: opentelemetry::metrics::Histogram<f64>,
    kms: opentelemetry::metrics::Histogram<f64>,
    /// Observable instruments stay registered while held.
    _observers: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

static OTEL: OnceLock<OtelInstruments> = OnceLock::new();

use opentelemetry::KeyValue;

/// Observes a cache figure per side (`side` = `encrypt`, `decrypt`), when
/// the cache is on.
fn observe_sides(
    observer: &dyn opentelemetry::metrics::AsyncInstrument<u64>,
    pick: impl Fn(&crate::cache::CacheStats) -> (u64, u64),
) {
    if let Some(stats) = global().cache_stats() {
        let (encrypt, decrypt) = pick(&stats);
        observer.observe(encrypt, &[KeyValue::new("side", "encrypt")]);
        observer.observe(decrypt, &[KeyValue::new("side", "decrypt")]);
    }
}

/// Registers the metrics with an OpenTelemetry meter (OTLP export): the
/// counters and gauges of [`Metrics::render`] as observable instruments,
/// read at each export, and the two latency histograms.
pub fn register_otel(meter: &opentelemetry::metrics::Meter) {
    let requests = meter
        .f64_histogram("kms_sidecar.request.duration")
        .with_unit("s")
        .with_description("RPC latency, by method and gRPC code.")
        .with_boundaries(BUCKETS.to_vec())
        .build();
    let kms = meter
        .f64_histogram("kms_sidecar.kms.call.duration")
        .with_unit("s")
        .with_description("KMS call latency, retries included, by operation and result.")
        .with_boundaries(BUCKETS.to_vec())
        .build();
    let mut observers: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.requests")
            .with_description("RPCs finished, by method and gRPC code.")
            .with_callback(|o| {
                for ((method, code), n) in Metrics::snapshot(&global().requests) {
                    o.observe(
                        n,
                        &[KeyValue::new("method", method), KeyValue::new("code", code)],
                    );
                }
            })
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.kms.calls")
            .with_description("KMS calls, by operation and result class.")
            .with_callback(|o| {
                for ((operation, result), n) in Metrics::snapshot(&global().kms_calls) {
                    o.observe(
                        n,
                        &[
                            KeyValue::new("operation", operation),
                            KeyValue::new("result", result),
                        ],
                    );
                }
            })
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.cache.hits")
            .with_description("Data keys served by the cache, by side.")
            .with_callback(|o| observe_sides(o, |s| (s.encrypt_hits, s.decrypt_hits)))
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.cache.misses")
            .with_description("Cache lookups that asked KMS, by side.")
            .with_callback(|o| observe_sides(o, |s| (s.encrypt_misses, s.decrypt_misses)))
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.cache.evictions")
            .with_description("Cache entries removed, by cause.")
            .with_callback(|o| {
                if let Some(s) = global().cache_stats() {
                    for (cause, n) in [
                        ("age", s.evicted_age),
                        ("messages", s.evicted_messages),
                        ("bytes", s.evicted_bytes),
                        ("capacity", s.evicted_capacity),
                        ("flush", s.evicted_flush),
                    ] {
                        o.observe(n, &[KeyValue::new("cause", cause)]);
                    }
                }
            })
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_gauge("kms_sidecar.cache.entries")
            .with_description("Cache entries now, by side.")
            .with_callback(|o| observe_sides(o, |s| (s.encrypt_entries, s.decrypt_entries)))
            .build(),
    ));
    observers.push(Box::new(
        meter
            .i64_observable_gauge("kms_sidecar.streams.in_flight")
            .with_description("Streaming calls in progress.")
            .with_callback(|o| o.observe(global().streams_in_flight.load(Ordering::Relaxed), &[]))
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.plaintext.sealed")
            .with_unit("By")
            .with_description("Plaintext bytes sealed into envelopes.")
            .with_callback(|o| o.observe(global().bytes_sealed.load(Ordering::Relaxed), &[]))
            .build(),
    ));
    observers.push(Box::new(
        meter
            .u64_observable_counter("kms_sidecar.plaintext.opened")
            .with_unit("By")
            .with_description("Plaintext bytes opened from envelopes.")
            .with_callback(|o| o.observe(global().bytes_opened.load(Ordering::Relaxed), &[]))
            .build(),
    ));
    let _ = OTEL.set(OtelInstruments {
        requests,
        kms,
        _observers: observers,
    });
}

fn counter_family(
    out: &mut String,
    name: &str,
    help: &str,
    (l1, l2): (&str, &str),
    values: &Mutex<BTreeMap<(&'static str, &'static str), u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let Ok(values) = values.lock() else { return };
    for ((a, b), n) in values.iter() {
        let _ = writeln!(out, "{name}{{{l1}=\"{a}\",{l2}=\"{b}\"}} {n}");
    }
}

fn histogram_family(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &Mutex<BTreeMap<&'static str, Histogram>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let Ok(values) = values.lock() else { return };
    for (value, h) in values.iter() {
        for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}\n\
             {name}_sum{{{label}=\"{value}\"}} {}\n\
             {name}_count{{{label}=\"{value}\"}} {}",
            h.count, h.sum, h.count
        );
    }
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    use hyper::service::service_fn;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let (status, body) =
                    if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                        (200, global().render())
                    } else {
                        (404, "not found: GET /metrics\n".to_owned())
                    };
                hyper::Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
