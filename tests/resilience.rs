//! KMS faults (field cases B05 and B11) through the fault-injecting proxy in
//! front of moto, with the KMS client built as the sidecar builds it: the
//! SDK's retries and retry budget, the KMS timeout, the deep health probe.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::time::Duration;

use common::kms_proxy::{Fault, KmsProxy};
use common::{Sidecar, create_key, ctx, kms_client, kms_server, production_keyring, reason};
use kms_sidecar::cache::CacheConfig;
use kms_sidecar::config::ServiceConfig;
use kms_sidecar::keyring::kms_client::KmsSettings;
use kms_sidecar::proto::{GenerateDataKeyRequest, UnwrapRequest, WrapRequest};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

const SERVICE: &str = "kms_sidecar.v1.KeyService";

struct Rig {
    proxy: KmsProxy,
    arn: String,
    sidecar: Sidecar,
}

async fn rig(settings: KmsSettings, config: ServiceConfig) -> Rig {
    let arn = create_key(&kms_client()).await;
    let proxy = KmsProxy::start(&kms_server().endpoint).await;
    let keyring = production_keyring(&proxy.endpoint, &settings, std::slice::from_ref(&arn)).await;
    let sidecar = Sidecar::start_with(keyring, config, &[]).await;
    proxy.reset_calls();
    Rig {
        proxy,
        arn,
        sidecar,
    }
}

fn no_cache() -> ServiceConfig {
    ServiceConfig {
        health_probe_interval: None,
        cache: CacheConfig {
            max_age: Duration::ZERO,
            ..CacheConfig::default()
        },
        ..ServiceConfig::default()
    }
}

async fn health_status(sidecar: &Sidecar, service: &str) -> i32 {
    HealthClient::new(sidecar.channel().await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_for_status(sidecar: &Sidecar, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    while health_status(sidecar, SERVICE).await != want as i32 {
        assert!(Instant::now() < deadline, "not {want:?} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// B05 S1: three throttled answers, then success. The RPC succeeds after
/// four attempts, and the retries are spaced by growing, jittered delays
/// (the SDK's exponential backoff), not fired at once.
#[tokio::test]
async fn b05_throttled_three_times_then_succeeds_after_backoff() {
    let settings = KmsSettings::default();
    let r = rig(settings, no_cache()).await;
    r.proxy
        .inject(Some("GenerateDataKey"), Fault::Throttle, Some(3));
    let reply = r
        .sidecar
        .client()
        .await
        .generate_data_key(GenerateDataKeyRequest {
            key_id: r.arn.clone(),
            ..Default::default()
        })
        .await
        .expect("succeeds after the SDK's retries")
        .into_inner();
    assert_eq!(reply.plaintext.len(), 32);
    let times: Vec<Instant> = r
        .proxy
        .calls()
        .iter()
        .filter(|c| c.operation == "GenerateDataKey")
        .map(|c| c.at.into())
        .collect();
    assert_eq!(times.len(), 4, "three throttled attempts and one success");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Full jitter: retry i waits a random part of initial × 2^i.
    for (i, gap) in gaps.iter().enumerate() {
        let cap = settings.initial_backoff * 2u32.pow(i as u32) + Duration::from_millis(100);
        assert!(
            *gap <= cap,
            "retry {i} waited {gap:?}, over its cap {cap:?}"
        );
    }
    let total: Duration = gaps.iter().sum();
    assert!(
        total >= Duration::from_millis(20),
        "retries were not spaced: {gaps:?}"
    );
}

/// B05 S2: KMS throttles everything. Each RPC ends within its deadline
/// with UNAVAILABLE / KMS_THROTTLED and a RetryInfo delay; the retry budget
/// keeps the KMS call rate bounded; Wraps served from a warm cache keep
/// working; the readiness status stays SERVING.
#[tokio::test]
async fn b05_sustained_throttling_is_classified_bounded_and_cache_keeps_serving() {
    let config = ServiceConfig {
        health_probe_interval: Some(Duration::from_millis(200)),
        ..ServiceConfig::default()
    };
    let r = rig(KmsSettings::default(), config).await;
    let mut client = r.sidecar.client().await;
    let warm = ctx(&[("tenant", "warm")]);
    client
        .wrap(WrapRequest {
            plaintext: b"before".to_vec(),
            encryption_context: warm.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    r.proxy.inject(None, Fault::Throttle, None);
    r.proxy.reset_calls();
    // A cold context: throttled, classified, with a retry delay.
    let started = Instant::now();
    let mut req = tonic::Request::new(WrapRequest {
        plaintext: b"cold".to_vec(),
        encryption_context: ctx(&[("tenant", "cold")]),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(10));
    let err = client.wrap(req).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "KMS_THROTTLED");
    assert!(err.message().contains("throttling"), "{}", err.message());
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()));

    // The warm entry keeps serving without KMS.
    let before = r.proxy.count("GenerateDataKey");
    for _ in 0..20 {
        client
            .wrap(WrapRequest {
                plaintext: b"still works".to_vec(),
                encryption_context: warm.clone(),
                ..Default::default()
            })
            .await
            .expect("warm cache serves while KMS throttles");
    }
    assert_eq!(r.proxy.count("GenerateDataKey"), before);

    // 200 throttled Wraps of distinct contexts: without a retry budget the
    // SDK would make 4 attempts each (800 calls); the budget (500 tokens,
    // 5 per retry) allows at most 100 retries beyond the first attempts.
    r.proxy.reset_calls();
    let mut wraps = tokio::task::JoinSet::new();
    for i in 0..200 {
        let mut client = client.clone();
        wraps.spawn(async move {
            client
                .wrap(WrapRequest {
                    plaintext: b"x".to_vec(),
                    encryption_context: ctx(&[("n", &i.to_string())]),
                    ..Default::default()
                })
                .await
        });
    }
    let results = wraps.join_all().await;
    for res in &results {
        let err = res.as_ref().unwrap_err();
        assert_eq!(reason(err), "KMS_THROTTLED");
    }
    // Health probes during the test also draw on the budget.
    let calls = r.proxy.count("GenerateDataKey");
    assert!(
        calls <= 200 + 100 + 40,
        "{calls} KMS calls for 200 throttled Wraps: the retry budget did not hold"
    );
    assert_eq!(
        health_status(&r.sidecar, SERVICE).await,
        ServingStatus::Serving as i32,
        "throttling alone does not flip readiness"
    );
}

/// Server errors (5xx) are retried by the SDK; a lasting one is
/// UNAVAILABLE / KMS_UNAVAILABLE.
#[tokio::test]
async fn server_errors_are_retried_then_reported_unavailable() {
    let r = rig(KmsSettings::default(), no_cache()).await;
    let mut client = r.sidecar.client().await;
    r.proxy
        .inject(Some("GenerateDataKey"), Fault::ServerError(500), Some(2));
    client
        .wrap(WrapRequest {
            plaintext: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("two 500s, then success");
    assert_eq!(r.proxy.count("GenerateDataKey"), 3);

    r.proxy
        .inject(Some("GenerateDataKey"), Fault::ServerError(503), None);
    let err = client
        .wrap(WrapRequest {
            plaintext: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "KMS_UNAVAILABLE");
    assert_eq!(r.proxy.count("GenerateDataKey"), 3 + 4, "max attempts 4");
}

/// B11 (A): GenerateDataKey works but Decrypt is denied. The deep probe
/// (a GenerateDataKey + Decrypt round trip) turns readiness NOT_SERVING
/// within two probe intervals while liveness stays SERVING; Unwrap says
/// FAILED_PRECONDITION / KMS_ACCESS_DENIED naming kms:Decrypt and the key;
/// readiness returns when KMS recovers. (D): a disabled key is
/// FAILED_PRECONDITION / KMS_KEY_DISABLED.
#[tokio::test]
async fn b11_decrypt_denied_and_disabled_key() {
    let interval = Duration::from_millis(300);
    let config = ServiceConfig {
        health_probe_interval: Some(interval),
        ..no_cache()
    };
    let r = rig(KmsSettings::default(), config).await;
    let mut client = r.sidecar.client().await;
    let envelope = client
        .wrap(WrapRequest {
            plaintext: b"secret".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    wait_for_status(&r.sidecar, ServingStatus::Serving, interval * 3).await;

    r.proxy.inject(Some("Decrypt"), Fault::AccessDenied, None);
    wait_for_status(
        &r.sidecar,
        ServingStatus::NotServing,
        interval * 2 + Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        health_status(&r.sidecar, "").await,
        ServingStatus::Serving as i32,
        "liveness unaffected"
    );
    let err = client
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "KMS_ACCESS_DENIED");
    assert!(err.message().contains("kms:Decrypt"), "{}", err.message());
    assert!(err.message().contains(&r.arn), "{}", err.message());

    r.proxy.clear();
    wait_for_status(
        &r.sidecar,
        ServingStatus::Serving,
        interval * 2 + Duration::from_millis(500),
    )
    .await;

    r.proxy.inject(None, Fault::Disabled, None);
    let err = client
        .wrap(WrapRequest {
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "KMS_KEY_DISABLED");
    wait_for_status(
        &r.sidecar,
        ServingStatus::NotServing,
        interval * 2 + Duration::from_millis(500),
    )
    .await;
    r.proxy.clear();
    wait_for_status(
        &r.sidecar,
        ServingStatus::Serving,
        interval * 2 + Duration::from_millis(500),
    )
    .await;
}

/// B11 (C): a black hole (accepts, never answers). Calls end within the KMS
/// timeout with UNAVAILABLE / KMS_UNAVAILABLE instead of hanging, and
/// readiness turns NOT_SERVING.
#[tokio::test]
async fn b11_black_hole_ends_within_the_kms_timeout() {
    let settings = KmsSettings {
        timeout: Duration::from_secs(1),
        ..KmsSettings::default()
    };
    let config = ServiceConfig {
        health_probe_interval: Some(Duration::from_millis(300)),
        ..no_cache()
    };
    let r = rig(settings, config).await;
    wait_for_status(&r.sidecar, ServingStatus::Serving, Duration::from_secs(2)).await;
    r.proxy.inject(None, Fault::BlackHole, None);
    let started = Instant::now();
    let err = r
        .sidecar
        .client()
        .await
        .wrap(WrapRequest {
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "KMS_UNAVAILABLE");
    assert!(
        took < settings.timeout + Duration::from_millis(500),
        "took {took:?} for a {:?} KMS timeout",
        settings.timeout
    );
    wait_for_status(
        &r.sidecar,
        ServingStatus::NotServing,
        Duration::from_secs(4),
    )
    .await;
}

/// B11: the deep probe's KMS call rate does not follow the probe rate.
#[tokio::test]
async fn b11_probe_rate_does_not_drive_kms_calls() {
    let config = ServiceConfig {
        health_probe_interval: Some(Duration::from_secs(1)),
        ..no_cache()
    };
    let r = rig(KmsSettings::default(), config).await;
    let mut health = HealthClient::new(r.sidecar.channel().await);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        for service in ["", SERVICE] {
            health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap();
        }
    }
    // Probes at 0 s (before reset_calls, maybe), 1 s and 2 s.
    let calls = r.proxy.count("GenerateDataKey");
    assert!(
        (1..=3).contains(&calls),
        "{calls} probe GenerateDataKey calls in 2.5 s at a 1 s interval"
    );
}
