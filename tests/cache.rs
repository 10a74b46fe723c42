//! The data-key cache, counting the KMS calls that moto actually received
//! (through the call-counting proxy), not the sidecar's own counters.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::kms_proxy::{Fault, KmsProxy};
use common::{Sidecar, create_key, ctx, kms_client, kms_server, production_keyring, reason};
use kms_sidecar::cache::{CacheConfig, Clock, Materials};
use kms_sidecar::config::ServiceConfig;
use kms_sidecar::envelope::EncryptionContext;
use kms_sidecar::keyring::kms_client::KmsSettings;
use kms_sidecar::proto::admin_service_client::AdminServiceClient;
use kms_sidecar::proto::{
    FlushCacheRequest, GetCacheStatsRequest, UnwrapRequest, WrapRequest, WrapStreamRequest,
};
use tonic::Code;

async fn proxy_and_key() -> (KmsProxy, String) {
    let arn = create_key(&kms_client()).await;
    (KmsProxy::start(&kms_server().endpoint).await, arn)
}

/// Materials over the proxy with `config` and a manual clock.
async fn materials(proxy: &KmsProxy, keys: &[String], config: CacheConfig) -> (Materials, Clock) {
    let keyring = production_keyring(&proxy.endpoint, &KmsSettings::default(), keys).await;
    let clock = Clock::manual();
    (
        Materials::new(Arc::new(keyring), config, clock.clone()),
        clock,
    )
}

fn context(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::from_pairs(ctx(pairs))
}

/// Age, message and byte limits, each on its own, with a manual clock.
#[tokio::test]
async fn encrypt_side_limits_by_age_messages_and_bytes() {
    let (proxy, arn) = proxy_and_key().await;
    let config = CacheConfig {
        max_age: Duration::from_secs(60),
        max_messages: 3,
        max_bytes: 100,
        capacity: 10,
    };
    let (m, clock) = materials(&proxy, std::slice::from_ref(&arn), config).await;
    let c = context(&[("app", "a")]);
    let calls = || proxy.count("GenerateDataKey");

    // Age: reused within it, a new key at it.
    let first = m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    clock.advance(Duration::from_secs(59));
    let second = m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(calls(), 1);
    clock.advance(Duration::from_secs(1));
    let third = m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    assert!(!Arc::ptr_eq(&first, &third));
    assert_eq!(calls(), 2);
    assert_eq!(m.cache().unwrap().stats().evicted_age, 1);

    // Messages: 3 per key (the one above already served one).
    m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    assert_eq!(calls(), 2);
    m.for_encrypt(&arn, &c, Some(1)).await.unwrap();
    assert_eq!(calls(), 3, "the fourth message needs a new key");
    assert_eq!(m.cache().unwrap().stats().evicted_messages, 1);

    // Bytes: 1 used; 99 more fit, 1 more does not.
    m.for_encrypt(&arn, &c, Some(98)).await.unwrap();
    assert_eq!(calls(), 3);
    m.for_encrypt(&arn, &c, Some(2)).await.unwrap();
    assert_eq!(calls(), 4, "100 bytes used: 2 more need a new key");
    assert_eq!(m.cache().unwrap().stats().evicted_bytes, 1);

    // A message over the byte limit is never cached; unknown length never
    // uses the cache.
    m.for_encrypt(&arn, &c, Some(101)).await.unwrap();
    m.for_encrypt(&arn, &c, Some(101)).await.unwrap();
    m.for_encrypt(&arn, &c, None).await.unwrap();
    m.for_encrypt(&arn, &c, None).await.unwrap();
    assert_eq!(calls(), 8);
}

/// Entries are partitioned by wrapping key and by the whole context.
#[tokio::test]
async fn encrypt_side_partitions_by_key_and_context() {
    let (proxy, arn) = proxy_and_key().await;
    let other = create_key(&kms_client()).await;
    let (m, _) = materials(
        &proxy,
        &[arn.clone(), other.clone()],
        CacheConfig::default(),
    )
    .await;
    let contexts = [
        context(&[]),
        context(&[("a", "bc")]),
        context(&[("ab", "c")]), // moto would confuse these two; the cache does not
        context(&[("a", "bc"), ("d", "e")]),
    ];
    for _ in 0..3 {
        for c in &contexts {
            for key in [&arn, &other] {
                m.for_encrypt(key, c, Some(10)).await.unwrap();
            }
        }
    }
    assert_eq!(proxy.count("GenerateDataKey"), 8, "one per (key, context)");
    let stats = m.cache().unwrap().stats();
    assert_eq!(stats.encrypt_entries, 8);
    assert_eq!(stats.encrypt_hits, 16);
}

/// The least recently used entry leaves first when the cache is full.
#[tokio::test]
async fn capacity_evicts_least_recently_used() {
    let (proxy, arn) = proxy_and_key().await;
    let config = CacheConfig {
        capacity: 2,
        ..CacheConfig::default()
    };
    let (m, _) = materials(&proxy, std::slice::from_ref(&arn), config).await;
    let [a, b, c] = [
        context(&[("n", "a")]),
        context(&[("n", "b")]),
        context(&[("n", "c")]),
    ];
    m.for_encrypt(&arn, &a, Some(1)).await.unwrap();
    m.for_encrypt(&arn, &b, Some(1)).await.unwrap();
    m.for_encrypt(&arn, &a, Some(1)).await.unwrap(); // a is now the most recent
    m.for_encrypt(&arn, &c, Some(1)).await.unwrap(); // evicts b
    assert_eq!(proxy.count("GenerateDataKey"), 3);
    m.for_encrypt(&arn, &a, Some(1)).await.unwrap();
    assert_eq!(proxy.count("GenerateDataKey"), 3, "a stayed");
    m.for_encrypt(&arn, &b, Some(1)).await.unwrap();
    assert_eq!(proxy.count("GenerateDataKey"), 4, "b was evicted");
    let stats = m.cache().unwrap().stats();
    assert_eq!(stats.evicted_capacity, 2);
    assert_eq!(stats.encrypt_entries, 2);
}

/// Decrypt side: one KMS Decrypt per encrypted data key and context until
/// the age limit; a different context is a different entry; sweeping
/// removes expired entries.
#[tokio::test]
async fn decrypt_side_reuses_and_expires() {
    let (proxy, arn) = proxy_and_key().await;
    let (m, clock) = materials(&proxy, std::slice::from_ref(&arn), CacheConfig::default()).await;
    let c = context(&[("app", "a")]);
    let made = m.for_encrypt(&arn, &c, None).await.unwrap();
    let edks = vec![made.encrypted.clone()];
    for _ in 0..5 {
        let got = m.for_decrypt(&edks, &c).await.unwrap();
        assert_eq!(got.data_key.expose(), made.data_key.expose());
        assert_eq!(got.key_id, arn);
    }
    assert_eq!(proxy.count("Decrypt"), 1);
    // The wrong context is not served from the entry: KMS refuses it.
    let err = m
        .for_decrypt(&edks, &context(&[("app", "b")]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        kms_sidecar::error::Error::DecryptAuthFailed { .. }
    ));
    assert_eq!(proxy.count("Decrypt"), 2);

    clock.advance(Duration::from_secs(301));
    m.cache().unwrap().sweep();
    let stats = m.cache().unwrap().stats();
    assert_eq!((stats.decrypt_entries, stats.encrypt_entries), (0, 0));
    m.for_decrypt(&edks, &c).await.unwrap();
    assert_eq!(proxy.count("Decrypt"), 3, "expired: asked again");
}

async fn cached_sidecar(proxy: &KmsProxy, arn: &str) -> Sidecar {
    let keyring =
        production_keyring(&proxy.endpoint, &KmsSettings::default(), &[arn.to_owned()]).await;
    let config = ServiceConfig {
        health_probe_interval: None,
        ..ServiceConfig::default()
    };
    let sidecar = Sidecar::start_with(keyring, config, &[]).await;
    proxy.reset_calls();
    sidecar
}

/// Single flight: 200 concurrent Wraps on a cold entry make exactly one
/// GenerateDataKey (slowed so they all overlap it). Every envelope still
/// has its own message ID, and Unwrapping all of them makes one Decrypt.
/// The stats RPC agrees, and a flush makes the next Wrap ask KMS again.
#[tokio::test]
async fn single_flight_decrypt_reuse_stats_and_flush_over_grpc() {
    let (proxy, arn) = proxy_and_key().await;
    let sidecar = cached_sidecar(&proxy, &arn).await;
    let client = sidecar.client().await;
    proxy.inject(
        Some("GenerateDataKey"),
        Fault::Delay(Duration::from_millis(300)),
        Some(1),
    );
    let mut wraps = tokio::task::JoinSet::new();
    for i in 0..200 {
        let mut client = client.clone();
        wraps.spawn(async move {
            client
                .wrap(WrapRequest {
                    plaintext: format!("message {i}").into_bytes(),
                    encryption_context: ctx(&[("tenant", "t1")]),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .envelope
        });
    }
    let envelopes = wraps.join_all().await;
    assert_eq!(
        proxy.count("GenerateDataKey"),
        1,
        "200 cold Wraps, one KMS call"
    );
    // Bytes 4..36 of a v2 header are the message ID.
    let mut ids: Vec<&[u8]> = envelopes.iter().map(|e| &e[4..36]).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every message has its own ID");

    let mut unwraps = tokio::task::JoinSet::new();
    for envelope in envelopes {
        let mut client = client.clone();
        unwraps.spawn(async move {
            client
                .unwrap(UnwrapRequest {
                    envelope,
                    encryption_context: ctx(&[("tenant", "t1")]),
                })
                .await
                .unwrap()
                .into_inner()
                .plaintext
        });
    }
    let plaintexts = unwraps.join_all().await;
    assert!(plaintexts.iter().all(|p| p.starts_with(b"message ")));
    assert_eq!(
        proxy.count("Decrypt"),
        1,
        "200 Unwraps of one data key, one KMS call"
    );

    let mut admin = AdminServiceClient::new(sidecar.channel().await);
    let stats = admin
        .get_cache_stats(GetCacheStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.enabled);
    assert_eq!((stats.encrypt_misses, stats.encrypt_hits), (1, 199));
    assert_eq!((stats.decrypt_misses, stats.decrypt_hits), (1, 199));
    assert_eq!(stats.kms_calls_saved, 398);
    assert_eq!((stats.encrypt_entries, stats.decrypt_entries), (1, 1));

    let flushed = admin
        .flush_cache(FlushCacheRequest {})
        .await
        .unwrap()
        .into_inner()
        .flushed;
    assert_eq!(flushed, 2);
    client
        .clone()
        .wrap(WrapRequest {
            plaintext: b"after flush".to_vec(),
            encryption_context: ctx(&[("tenant", "t1")]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(proxy.count("GenerateDataKey"), 2);
}

/// A failed KMS call is shared too: 50 concurrent Wraps while KMS throttles
/// make one flight of attempts, not 50, and all get KMS_THROTTLED.
#[tokio::test]
async fn single_flight_shares_failures() {
    let (proxy, arn) = proxy_and_key().await;
    let sidecar = cached_sidecar(&proxy, &arn).await;
    let client = sidecar.client().await;
    proxy.inject(Some("GenerateDataKey"), Fault::Throttle, None);
    let mut wraps = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let mut client = client.clone();
        wraps.spawn(async move {
            client
                .wrap(WrapRequest {
                    plaintext: b"x".to_vec(),
                    encryption_context: ctx(&[("tenant", "t2")]),
                    ..Default::default()
                })
                .await
        });
    }
    for result in wraps.join_all().await {
        assert_eq!(reason(&result.unwrap_err()), "KMS_THROTTLED");
    }
    assert_eq!(
        proxy.count("GenerateDataKey"),
        KmsSettings::default().max_attempts as usize,
        "one flight of SDK attempts"
    );
}

/// WrapStream uses the cache only when the caller declares the length, and
/// then holds the stream to it.
#[tokio::test]
async fn wrap_stream_uses_cache_only_with_declared_length() {
    let (proxy, arn) = proxy_and_key().await;
    let sidecar = cached_sidecar(&proxy, &arn).await;
    let client = sidecar.client().await;
    let run = |declared: Option<u64>, body: &'static [u8]| {
        let mut client = client.clone();
        async move {
            let reqs = vec![
                WrapStreamRequest {
                    encryption_context: ctx(&[("s", "1")]),
                    plaintext_length: declared,
                    chunk: body[..body.len() / 2].to_vec(),
                    ..Default::default()
                },
                WrapStreamRequest {
                    chunk: body[body.len() / 2..].to_vec(),
                    ..Default::default()
                },
            ];
            let mut out = client
                .wrap_stream(tokio_stream::iter(reqs))
                .await?
                .into_inner();
            let mut envelope = Vec::new();
            while let Some(msg) = out.message().await? {
                envelope.extend_from_slice(&msg.chunk);
            }
            Ok::<_, tonic::Status>(envelope)
        }
    };
    run(None, b"unknown length").await.unwrap();
    run(None, b"unknown length").await.unwrap();
    assert_eq!(
        proxy.count("GenerateDataKey"),
        2,
        "unknown length: never cached"
    );
    let envelope = run(Some(12), b"twelve bytes").await.unwrap();
    run(Some(12), b"twelve bytes").await.unwrap();
    assert_eq!(proxy.count("GenerateDataKey"), 3, "declared length: cached");
    let plain = client
        .clone()
        .unwrap(UnwrapRequest {
            envelope,
            encryption_context: ctx(&[("s", "1")]),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"twelve bytes");

    for (declared, body) in [
        (Some(5), &b"more than five"[..]),
        (Some(50), &b"fewer than fifty"[..]),
    ] {
        let err = run(declared, body).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(reason(&err), "INVALID_REQUEST");
        assert!(
            err.message().contains("plaintext_length"),
            "{}",
            err.message()
        );
    }
}

/// With the local keyring the cache is off (nothing to save) and the stats
/// say so.
#[tokio::test]
async fn local_keyring_has_no_cache() {
    let sidecar = Sidecar::start(common::local_keyring(1)).await;
    let stats = AdminServiceClient::new(sidecar.channel().await)
        .get_cache_stats(GetCacheStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.enabled);
}
