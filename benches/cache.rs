#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "a benchmark binary: it prints, and aborts on setup failure"
)]

//! The data-key cache, in one run on one machine, against moto's KMS
//! server behind the test proxy (which counts the KMS calls moto received
//! and injects latency):
//!
//! 1. KMS calls per 10,000 unary 1 KiB Wraps with the default cache;
//! 2. Wrap ops/s (64 in flight) with the cache on and off, with 5 ms added
//!    to every KMS call;
//! 3. with a warm cache, 1 KiB Wrap p50/p99 (one caller) and ops/s (64 in
//!    flight) over a Unix socket, beside a bare tonic echo of 1 KiB over a
//!    Unix socket, served by the same process, in interleaved rounds;
//! 4. the official Python AWS Encryption SDK doing the same Wraps against
//!    the same 5 ms KMS, without and with its caching materials manager.
//!
//! Run: `cargo bench --bench cache` (needs the test venv that
//! `tests/run.sh` creates, for moto and the Python SDK).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/echo.rs"]
mod echo_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kms_proxy::{Fault, KmsProxy};
use echo_support::echo;
use kms_sidecar::cache::CacheConfig;
use kms_sidecar::config::{ListenAddr, ServiceConfig};
use kms_sidecar::keyring::kms_client::KmsSettings;
use kms_sidecar::proto::WrapRequest;
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

const IN_FLIGHT: usize = 64;
const WARMUP: usize = 500;
const SAMPLES: usize = 5000;
const KMS_LATENCY: Duration = Duration::from_millis(5);
const ROUNDS: usize = 5;

/// One round of section 3: (p50, p99, ops/s) of the echo and of Wrap.
struct Round {
    echo: (Duration, Duration, f64),
    wrap: (Duration, Duration, f64),
}

impl Round {
    /// Wrap over echo: p50, p99, ops/s.
    fn ratios(&self) -> (f64, f64, f64) {
        (
            self.wrap.0.as_secs_f64() / self.echo.0.as_secs_f64(),
            self.wrap.1.as_secs_f64() / self.echo.1.as_secs_f64(),
            self.wrap.2 / self.echo.2,
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn wrap_request() -> WrapRequest {
    WrapRequest {
        plaintext: vec![7u8; 1024],
        encryption_context: common::ctx(&[("tenant", "bench")]),
        ..Default::default()
    }
}

/// p50 and p99 of `call`, one at a time.
async fn latency<F, Fut>(mut call: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP {
        call().await;
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        call().await;
        samples.push(start.elapsed());
    }
    samples.sort();
    (percentile(&samples, 0.50), percentile(&samples, 0.99))
}

/// Calls per second of `make()`: `total` calls by IN_FLIGHT callers.
async fn throughput<F, Fut>(total: usize, make: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let make = Arc::new(make);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..IN_FLIGHT {
        let make = Arc::clone(&make);
        let calls = total / IN_FLIGHT + usize::from(caller < total % IN_FLIGHT);
        tasks.spawn(async move {
            for _ in 0..calls {
                make().await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("caller task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn wraps_per_second(channel: &Channel, total: usize) -> f64 {
    let client = KeyServiceClient::new(channel.clone());
    throughput(total, move || {
        let mut c = client.clone();
        async move {
            c.wrap(wrap_request()).await.expect("wrap");
        }
    })
    .await
}

/// A sidecar on a Unix socket in `dir`, over the proxy.
async fn sidecar(
    proxy: &KmsProxy,
    arn: &str,
    cache: CacheConfig,
    sock: std::path::PathBuf,
) -> Channel {
    let keyring =
        common::production_keyring(&proxy.endpoint, &KmsSettings::default(), &[arn.to_owned()])
            .await;
    let config = ServiceConfig {
        cache,
        health_probe_interval: None,
        ..ServiceConfig::default()
    };
    let listeners = kms_sidecar::server::bind(&[ListenAddr::Unix(sock.clone())], 0o600, None)
        .await
        .expect("bind");
    tokio::spawn(kms_sidecar::server::serve(
        listeners,
        Arc::new(keyring),
        config,
        kms_sidecar::config::ShutdownConfig::default(),
        std::future::pending(),
    ));
    kms_sidecar::client::connect(&format!("unix://{}", sock.display()))
        .await
        .expect("connect")
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let arn = common::create_key(&common::kms_client()).await;
    let proxy = KmsProxy::start(&common::kms_server().endpoint).await;
    let cached = sidecar(
        &proxy,
        &arn,
        CacheConfig::default(),
        dir.path().join("c.sock"),
    )
    .await;
    let uncached_config = CacheConfig {
        max_age: Duration::ZERO,
        ..CacheConfig::default()
    };
    let uncached = sidecar(&proxy, &arn, uncached_config, dir.path().join("u.sock")).await;
    println!(
        "kms-sidecar data-key cache benchmark: 1 KiB Wraps, one context, moto KMS behind the test proxy"
    );

    // 1. KMS calls per 10,000 Wraps, default cache.
    proxy.reset_calls();
    let start = Instant::now();
    wraps_per_second(&cached, 10_000).await;
    let calls = proxy.count("GenerateDataKey");
    println!(
        "\n1. KMS GenerateDataKey calls for 10,000 Wraps (default cache): {calls} \
         ({:.2} per 1,000; goal <= 1) in {:.1} s",
        calls as f64 / 10.0,
        start.elapsed().as_secs_f64()
    );

    // 2. Cache on and off with 5 ms added to every KMS call.
    proxy.inject(None, Fault::Delay(KMS_LATENCY), None);
    let on = wraps_per_second(&cached, 20_000).await;
    proxy.reset_calls();
    let off = wraps_per_second(&uncached, 2_000).await;
    let off_calls = proxy.count("GenerateDataKey");
    proxy.clear();
    println!(
        "\n2. Wrap ops/s, 64 in flight, KMS +{} ms:",
        KMS_LATENCY.as_millis()
    );
    println!("   cache on   {on:>10.0}");
    println!("   cache off  {off:>10.0}   ({off_calls} KMS calls for 2,000 Wraps)");
    println!("   ratio      {:>10.1}x", on / off);

    // 3. Warm cache vs a bare echo, Unix sockets, same process.
    let echo_sock = dir.path().join("echo.sock");
    let uds = tokio::net::UnixListener::bind(&echo_sock).expect("bind echo");
    tokio::spawn(echo_support::serve(uds, None));
    let echo_channel = kms_sidecar::client::connect(&format!("unix://{}", echo_sock.display()))
        .await
        .expect("connect echo");
    let echo_client = echo::echo_client::EchoClient::new(echo_channel.clone());
    let wrap_client = KeyServiceClient::new(cached.clone());
    // Interleaved rounds, each comparing Wrap with the echo measured just
    // before it; the machine is shared, so the median round is reported.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let (e50, e99) = latency(|| {
            let mut c = echo_client.clone();
            async move {
                c.unary(echo::Chunk {
                    data: vec![7u8; 1024],
                })
                .await
                .expect("echo");
            }
        })
        .await;
        let (w50, w99) = latency(|| {
            let mut c = wrap_client.clone();
            async move {
                c.wrap(wrap_request()).await.expect("wrap");
            }
        })
        .await;
        let client = echo_client.clone();
        let eops = throughput(40_000, move || {
            let mut c = client.clone();
            async move {
                c.unary(echo::Chunk {
                    data: vec![7u8; 1024],
                })
                .await
                .expect("echo");
            }
        })
        .await;
        let wops = wraps_per_second(&cached, 40_000).await;
        rounds.push(Round {
            echo: (e50, e99, eops),
            wrap: (w50, w99, wops),
        });
    }
    println!("\n3. Warm cache vs bare echo, 1 KiB, Unix socket ({ROUNDS} interleaved rounds):");
    println!(
        "   {:<6} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "round",
        "echo p50",
        "echo p99",
        "echo op/s",
        "Wrap p50",
        "Wrap p99",
        "Wrap op/s",
        "p50 x",
        "p99 x",
        "op/s x"
    );
    let mut ratios = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        let ratio = r.ratios();
        println!(
            "   {:<6} {:>9} {:>9} {:>10.0} {:>9} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2}",
            i + 1,
            us(r.echo.0),
            us(r.echo.1),
            r.echo.2,
            us(r.wrap.0),
            us(r.wrap.1),
            r.wrap.2,
            ratio.0,
            ratio.1,
            ratio.2
        );
        ratios.push(ratio);
    }
    let median = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = ratios.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r50, r99, rops) = (median(|r| r.0), median(|r| r.1), median(|r| r.2));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "   median Wrap/echo: p50 {r50:.2}x (goal <= 1.25, {}), p99 {r99:.2}x (goal <= 1.5, {}), \
         ops/s {rops:.2}x (goal >= 0.8, {})",
        verdict(r50 <= 1.25),
        verdict(r99 <= 1.5),
        verdict(rops >= 0.8)
    );
    let wops = {
        let mut v: Vec<f64> = rounds.iter().map(|r| r.wrap.2).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    // 4. The official Python SDK, same KMS (+5 ms), one thread.
    proxy.inject(None, Fault::Delay(KMS_LATENCY), None);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/compare_python_cache.py"
    );
    let out = Command::new(common::python())
        .args([script, &proxy.endpoint, &arn, "5"])
        .env("AWS_REGION", common::REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .expect("run the Python SDK comparison");
    assert!(
        out.status.success(),
        "Python SDK comparison failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} line in {text}"))
    };
    let (py_off, py_on) = (value("no-cache "), value("cache "));
    println!("\n4. Official Python AWS Encryption SDK, 1 KiB encrypt, one thread, KMS +5 ms:");
    println!("   without caching CMM  {py_off:>10.0} ops/s");
    println!("   with caching CMM     {py_on:>10.0} ops/s");
    println!(
        "   sidecar warm Wrap (64 in flight, median round) / SDK cached: {:.1}x",
        wops / py_on
    );
}
