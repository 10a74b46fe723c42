//! kms-sidecar: envelope encryption as a gRPC sidecar.
//!
//! KMS (or a local wrapping key) makes the data key; the data is sealed
//! locally with AES-256-GCM from `ring`; the result is an AWS Encryption SDK
//! message (format version 2, suite 0x0478), so any official SDK can open
//! it and the sidecar opens theirs.
//!
//! # Layout
//! - [`config`]: flags and `KMS_SIDECAR_*` variables, parsed once into typed values.
//! - [`client`]: connects to a sidecar over TCP or a Unix socket (tools, benchmarks, tests).
//! - [`server`]: binds TCP / Unix listeners, stacks health, reflection and the service, shuts down.
//! - [`api`]: the `kms_sidecar.v1.KeyService` handlers: validation, limits, orchestration.
//! - [`streaming`]: WrapStream / UnwrapStream: frame-at-a-time, backpressure, stream limits.
//! - [`status`]: the one mapping from [`error::Error`] to gRPC status codes and reasons.
//! - [`preflight`]: `kms-sidecar check`: which KMS permissions are needed, and granted.
//! - [`access`]: caller identities (Unix socket peer credentials, mTLS certificates), the
//!   authorization policy and caller binding.
//! - [`tls`]: TLS and mutual TLS on TCP listeners, reloaded when the files change.
//! - [`audit`]: the JSON-lines audit trail, one event per key use.
//! - [`cache`]: the data-key cache (ESDK caching materials manager semantics), single-flight.
//! - [`telemetry`]: logs, and OTLP export of traces and metrics (`--otel`).
//! - [`metrics`]: Prometheus counters and histograms, served on `--metrics-listen`.
//! - [`keyring`]: where data keys come from: AWS KMS or the local raw AES keyring.
//! - [`envelope`]: the ESDK message format; pure, no I/O.
//! - [`secret`]: the zeroizing, redacted types that hold plaintext keys.
//! - [`error`]: the crate's error enum and its classes.
//! - [`proto`]: code generated from `proto/kms_sidecar/v1/kms_sidecar.proto`.
//!
//! Dependencies point one way: `api` → `keyring`, `envelope` → `secret`, `error`.

pub mod access;
pub mod api;
pub mod audit;
pub mod cache;
pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
pub mod keyring;
pub mod metrics;
pub mod preflight;
pub mod secret;
pub mod server;
pub mod status;
pub mod streaming;
pub mod telemetry;
pub mod tls;

/// Generated protobuf and gRPC code for `kms_sidecar.v1`.
#[allow(
    missing_docs,
    reason = "generated code; the proto file documents every item"
)]
pub mod proto {
    tonic::include_proto!("kms_sidecar.v1");

    /// Encoded descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("kms_sidecar_descriptor");
}

use std::future::Future;
use std::sync::Arc;

use aws_config::BehaviorVersion;

use crate::config::{Config, KeyringConfig};
use crate::keyring::{AwsKmsKeyring, Keyring, LocalKeyring};

/// Builds the configured keyring: loads or creates the local key file, or
/// builds the AWS KMS client from the standard aws-config chain and
/// resolves the configured keys.
///
/// # Errors
/// A one-line message for the operator.
pub async fn build_keyring(config: &Config) -> Result<Keyring, String> {
    match &config.keyring {
        KeyringConfig::Local {
            key_file,
            namespace,
            name,
        } => {
            let rng = ring::rand::SystemRandom::new();
            let (key, origin) = keyring::local::load_or_create_key_file(key_file, &rng)?;
            match origin {
                keyring::local::KeyFileOrigin::Created => tracing::info!(
                    path = %key_file.display(),
                    "created a new local wrapping key (mode 0600); keep this file: data wrapped \
                     with it cannot be unwrapped without it"
                ),
                keyring::local::KeyFileOrigin::Loaded => {
                    tracing::info!(path = %key_file.display(), "loaded the local wrapping key");
                }
            }
            LocalKeyring::new(namespace.clone(), name.clone(), &key)
                .map(|k| Keyring::Local(Box::new(k)))
                .map_err(|e| e.to_string())
        }
        KeyringConfig::AwsKms { key_ids } => {
            let (client, _) = kms_client(&config.kms, key_ids).await?;
            let keyring = AwsKmsKeyring::resolve(client, key_ids)
                .await
                .map_err(|e| format!("cannot resolve the configured KMS keys: {e}"))?;
            tracing::info!(keys = ?keyring.key_arns().collect::<Vec<_>>(), "using AWS KMS keys");
            Ok(Keyring::AwsKms(keyring))
        }
    }
}

/// The AWS KMS client: credentials, Region and endpoint from the standard
/// chain (environment, profile, web identity, container and instance
/// metadata; `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_KMS`), one rustls-on-ring
/// HTTPS stack, and `settings` (timeout, retries, credential refresh).
pub(crate) async fn kms_client(
    settings: &keyring::kms_client::KmsSettings,
    key_ids: &[String],
) -> Result<(aws_sdk_kms::Client, aws_config::SdkConfig), String> {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .http_client(keyring::aws_kms::https_client())
        .load()
        .await;
    let region = key_ids
        .iter()
        .find_map(|k| keyring::aws_kms::region_of_arn(k))
        .map(str::to_owned);
    if shared.region().is_none() && region.is_none() {
        return Err(
            "no AWS Region: set AWS_REGION (or use key ARNs, which name their Region)".into(),
        );
    }
    Ok((
        keyring::kms_client::build(&shared, settings, region),
        shared,
    ))
}

/// Runs the sidecar with `config` until `shutdown` resolves.
///
/// # Errors
/// A one-line message for the operator (bad key file, unresolvable key,
/// address in use, ...).
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), String> {
    let keyring = Arc::new(build_keyring(&config).await?);
    let access = access::Access::from_config(&config, &keyring)?;
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        tracing::info!(address = %addr, "serving Prometheus metrics on GET /metrics");
        tokio::spawn(metrics::serve(listener));
    }
    let listeners = server::bind(
        &config.listen,
        config.unix_socket_mode,
        config.unix_socket_group,
    )
    .await?;
    let listeners = match &config.tls {
        None => listeners,
        Some(files) => {
            let tls = tls::TlsServer::load(files.clone())?;
            if !listeners
                .iter()
                .any(|l| matches!(l, server::Listener::Tcp(_)))
            {
                tracing::warn!("TLS is configured but no TCP address is listened on");
            }
            tls.spawn_reloader(config.tls_reload_interval);
            listeners.into_iter().map(|l| l.with_tls(&tls)).collect()
        }
    };
    for l in &listeners {
        tracing::info!(address = %l.local_addr(), "serving kms_sidecar.v1.KeyService");
    }
    tracing::info!(
        default_key = keyring.key_ids().first().copied().unwrap_or_default(),
        max_wrap_plaintext = config.service.max_wrap_plaintext(),
        max_message_bytes = config.service.max_message_bytes,
        "ready"
    );
    server::serve_with(
        listeners,
        keyring,
        access,
        config.service,
        config.shutdown,
        shutdown,
    )
    .await
}
