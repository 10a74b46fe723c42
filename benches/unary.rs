#![allow(
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    reason = "a benchmark binary: it prints, and aborts on setup failure"
)]

//! Unary latency and throughput of a sidecar on the local keyring.
//!
//! `cargo bench --bench unary` prints, per transport (Unix socket, TCP):
//! p50/p99 latency of one caller doing 1 KiB Wrap, 1 KiB Unwrap and a
//! grpc.health.v1 Check (the cheapest RPC on the same channel, as a floor),
//! and Wrap ops/s with 64 calls in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_sidecar::config::{ListenAddr, ServiceConfig};
use kms_sidecar::keyring::{Keyring, LocalKeyring};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapRequest, WrapRequest};
use kms_sidecar::secret::WrappingKey;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const WARMUP: usize = 200;
const SAMPLES: usize = 3000;
const IN_FLIGHT: usize = 64;
const THROUGHPUT_CALLS: usize = 20_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

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

async fn wrap_throughput(channel: Channel) -> f64 {
    let payload = vec![7u8; 1024];
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let mut client = KeyServiceClient::new(channel.clone());
        let payload = payload.clone();
        tasks.spawn(async move {
            for _ in 0..THROUGHPUT_CALLS / IN_FLIGHT {
                let req = WrapRequest {
                    plaintext: payload.clone(),
                    ..Default::default()
                };
                if client.wrap(req).await.is_err() {
                    return Err(());
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        assert!(
            matches!(done, Ok(Ok(()))),
            "Wrap failed during the throughput run"
        );
    }
    (THROUGHPUT_CALLS / IN_FLIGHT * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64()
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("kms-sidecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let sock = dir.join("kms.sock");
    let key = WrappingKey::take_from(&mut [9u8; 32]).expect("key");
    let keyring = Keyring::Local(Box::new(
        LocalKeyring::new("kms-sidecar".into(), "local-key".into(), &key).expect("keyring"),
    ));
    let addrs = [
        ListenAddr::Unix(sock.clone()),
        ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")),
    ];
    let listeners = kms_sidecar::server::bind(&addrs, 0o600, None)
        .await
        .expect("bind");
    let targets: Vec<(String, String)> = listeners
        .iter()
        .map(|l| {
            let a = l.local_addr();
            let name = if a.starts_with("unix://") {
                "unix"
            } else {
                "tcp"
            };
            (name.to_owned(), a)
        })
        .collect();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kms_sidecar::server::serve(
        listeners,
        Arc::new(keyring),
        ServiceConfig::default(),
        kms_sidecar::config::ShutdownConfig {
            drain_window: Duration::ZERO,
            ..Default::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));

    println!("kms-sidecar unary benchmark: local keyring, 1 KiB payloads, one caller for latency");
    println!(
        "{:<6} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>16}",
        "path",
        "Wrap p50",
        "Wrap p99",
        "Unwrap p50",
        "Unwrap p99",
        "Health p50",
        "Health p99",
        "Wrap ops/s (64)"
    );
    for (name, target) in targets {
        let channel = kms_sidecar::client::connect(&target)
            .await
            .expect("connect");
        let mut client = KeyServiceClient::new(channel.clone());
        let payload = vec![7u8; 1024];
        let (wrap50, wrap99) = latency(|| {
            let mut c = client.clone();
            let p = payload.clone();
            async move {
                c.wrap(WrapRequest {
                    plaintext: p,
                    ..Default::default()
                })
                .await
                .expect("wrap");
            }
        })
        .await;
        let envelope = client
            .wrap(WrapRequest {
                plaintext: payload.clone(),
                ..Default::default()
            })
            .await
            .expect("wrap")
            .into_inner()
            .envelope;
        let (unwrap50, unwrap99) = latency(|| {
            let mut c = client.clone();
            let e = envelope.clone();
            async move {
                c.unwrap(UnwrapRequest {
                    envelope: e,
                    ..Default::default()
                })
                .await
                .expect("unwrap");
            }
        })
        .await;
        let health = HealthClient::new(channel.clone());
        let (h50, h99) = latency(|| {
            let mut h = health.clone();
            async move {
                h.check(HealthCheckRequest::default())
                    .await
                    .expect("health");
            }
        })
        .await;
        let ops = wrap_throughput(channel).await;
        println!(
            "{:<6} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>16.0}",
            name,
            us(wrap50),
            us(wrap99),
            us(unwrap50),
            us(unwrap99),
            us(h50),
            us(h99),
            ops
        );
    }
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
}
