//! Field case B04: web-identity (IRSA) credentials in a long-running
//! sidecar. The real binary runs with `AWS_ROLE_ARN` and
//! `AWS_WEB_IDENTITY_TOKEN_FILE`, as in a pod; moto plays STS
//! (AssumeRoleWithWebIdentity) and KMS behind the test proxy, which
//! shortens the credentials' lifetime, refuses stale tokens, and refuses
//! KMS calls signed with expired credentials (accelerated mode).

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

use common::kms_proxy::{Fault, KmsProxy, StsPolicy};
use common::{create_key, ctx, kms_client, kms_server};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapRequest, WrapRequest};
use tokio::time::{Instant, sleep};
use tonic_health::pb::health_check_response::ServingStatus;

const LIFETIME: Duration = Duration::from_secs(15);
const MARGIN: Duration = Duration::from_secs(6);

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    result: Result<(), (tonic::Code, String, String)>,
}

/// 20 Wraps and 20 Unwraps a second, recording every result.
fn load(
    channel: tonic::transport::Channel,
    log: Arc<Mutex<Vec<Outcome>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = KeyServiceClient::new(channel);
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let result = async {
                let envelope = client
                    .wrap(WrapRequest {
                        plaintext: b"payload".to_vec(),
                        encryption_context: ctx(&[("b04", "yes")]),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .envelope;
                client
                    .unwrap(UnwrapRequest {
                        envelope,
                        encryption_context: ctx(&[("b04", "yes")]),
                    })
                    .await?;
                Ok::<_, tonic::Status>(())
            }
            .await
            .map_err(|s| (s.code(), common::reason(&s), s.message().to_owned()));
            log.lock().unwrap().push(Outcome {
                at: Instant::now(),
                result,
            });
        }
    })
}

fn failures_between(log: &Mutex<Vec<Outcome>>, from: Instant, to: Instant) -> Vec<Outcome> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|o| o.at >= from && o.at < to && o.result.is_err())
        .cloned()
        .collect()
}

async fn status(target: &str) -> ServingStatus {
    kms_sidecar::client::health(target, "kms_sidecar.v1.KeyService", Duration::from_secs(2))
        .await
        .unwrap_or(ServingStatus::Unknown)
}

/// Waits until the credentials in use were issued at least `age` ago
/// (the proxy records each issue), or `limit` passes.
fn last_sts_success(proxy: &KmsProxy) -> Option<Instant> {
    proxy
        .calls()
        .iter()
        .filter(|c| c.operation == "AssumeRoleWithWebIdentity" && c.status == 200)
        .map(|c| c.at.into())
        .next_back()
}

#[tokio::test]
async fn b04_web_identity_credentials_refresh_before_expiry_and_recover() {
    let arn = create_key(&kms_client()).await;
    let proxy = KmsProxy::start(&kms_server().endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token0").unwrap();
    proxy.sts(StsPolicy {
        lifetime: LIFETIME,
        token_file: token_file.clone(),
    });
    let socket = dir.path().join("kms.sock");
    // The sidecar's log, kept after the test for a failure's diagnosis.
    let log_path = std::env::temp_dir().join("kms-sidecar-b04.log");
    eprintln!("B04 sidecar log: {}", log_path.display());
    let target = format!("unix://{}", socket.display());
    let child = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
        .env_clear()
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/kms-sidecar")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file)
        .env("AWS_ROLE_SESSION_NAME", "b04")
        .env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .env("AWS_REGION", common::REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", dir.path())
        .env("RUST_LOG", "kms_sidecar=info")
        .args([
            "--keyring",
            "aws-kms",
            "--key-id",
            &arn,
            "--listen",
            &target,
        ])
        .args(["--cache-max-age", "0", "--health-probe-interval", "1s"])
        // The default KMS timeout (5 s): a slow moto answer under CI load is
        // not what this test is about.
        .args(["--credentials-refresh-margin", "6s"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let started = Instant::now();
    while status(&target).await != ServingStatus::Serving {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sidecar not ready"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let channel = kms_sidecar::client::connect(&target).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let loader = load(channel, Arc::clone(&log));

    // Normal cycles: the token file is rewritten every 5 s (old tokens are
    // refused), over two lifetimes: three refreshes (one every 9 s).
    let normal_start = Instant::now();
    let mut generation = 0;
    while normal_start.elapsed() < LIFETIME * 2 {
        sleep(Duration::from_secs(5)).await;
        generation += 1;
        std::fs::write(&token_file, format!("token{generation}")).unwrap();
    }
    let normal_end = Instant::now();
    let failed = failures_between(&log, normal_start, normal_end);
    assert!(
        failed.is_empty(),
        "failed RPCs in normal cycles: {:?}",
        &failed[..failed.len().min(3)]
    );
    let calls = proxy.calls();
    let sts: Vec<_> = calls
        .iter()
        .filter(|c| c.operation == "AssumeRoleWithWebIdentity")
        .collect();
    assert!(
        sts.iter().all(|c| c.status == 200),
        "an STS call used a stale token: {:?}",
        sts.iter().map(|c| (&c.token, c.status)).collect::<Vec<_>>()
    );
    assert!(sts.len() >= 4, "{} STS calls in two lifetimes", sts.len());
    // Refresh happens before expiry: no KMS request inside the margin.
    for call in calls
        .iter()
        .filter(|c| c.operation != "AssumeRoleWithWebIdentity")
    {
        let expiry = proxy
            .expiry_of(&call.access_key)
            .expect("signed with issued credentials");
        let left = expiry.duration_since(call.wall).unwrap_or_default();
        assert!(
            left + Duration::from_millis(500) >= MARGIN,
            "a KMS call was signed {left:?} before expiry, inside the {MARGIN:?} margin"
        );
    }

    // STS down while the credentials are still valid: serving continues,
    // refreshes are retried with backoff, and succeed once STS is back.
    let fresh = last_sts_success(&proxy).unwrap();
    let outage_start = Instant::now();
    proxy.reset_calls();
    proxy.inject(
        Some("AssumeRoleWithWebIdentity"),
        Fault::ServerError(503),
        None,
    );
    // STS comes back 4 s before the credentials in use expire (2 s before
    // they count as expired).
    let back = fresh + LIFETIME - Duration::from_secs(4);
    tokio::time::sleep_until(back).await;
    proxy.clear();
    sleep(Duration::from_secs(4)).await;
    let outage_end = Instant::now();
    let failed = failures_between(&log, outage_start, outage_end);
    assert!(
        failed.is_empty(),
        "failed RPCs while credentials were valid: {:?}",
        &failed[..failed.len().min(3)]
    );
    let sts = proxy
        .calls()
        .into_iter()
        .filter(|c| c.operation == "AssumeRoleWithWebIdentity")
        .collect::<Vec<_>>();
    let refused = sts.iter().filter(|c| c.status == 503).count();
    assert!(
        (1..=8).contains(&refused),
        "{refused} refresh attempts during a ~{:?} outage: want a few, with backoff",
        MARGIN
    );
    assert!(
        sts.iter().any(|c| c.status == 200),
        "refreshed once STS returned"
    );

    // STS down past expiry: UNAVAILABLE / AWS_CREDENTIALS_UNAVAILABLE with
    // the STS error code; readiness NOT_SERVING; then automatic recovery.
    let fresh = last_sts_success(&proxy).unwrap();
    proxy.inject(
        Some("AssumeRoleWithWebIdentity"),
        Fault::ServerError(503),
        None,
    );
    tokio::time::sleep_until(fresh + LIFETIME + Duration::from_secs(3)).await;
    assert_eq!(status(&target).await, ServingStatus::NotServing);
    let expired = failures_between(&log, fresh + LIFETIME, Instant::now());
    assert!(
        !expired.is_empty(),
        "calls must fail once the credentials expired"
    );
    for o in &expired {
        let (code, reason, message) = o.result.clone().unwrap_err();
        assert_eq!(code, tonic::Code::Unavailable, "{message}");
        assert_eq!(reason, "AWS_CREDENTIALS_UNAVAILABLE", "{message}");
        assert!(
            message.contains("ServiceUnavailable"),
            "names the STS error: {message}"
        );
    }
    proxy.clear();
    let recovering = Instant::now();
    loop {
        sleep(Duration::from_millis(200)).await;
        let ok = log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take(5)
            .all(|o| o.at > recovering && o.result.is_ok());
        if ok && status(&target).await == ServingStatus::Serving {
            break;
        }
        assert!(
            recovering.elapsed() < Duration::from_secs(8),
            "no recovery after STS returned"
        );
    }
    loader.abort();
}
