//! One call of each RPC with fixed arguments, as the authorization tests
//! (Unix socket and mTLS identities) make them, and the check of a denial.

use kms_sidecar::proto::admin_service_client::AdminServiceClient;
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{
    FlushCacheRequest, GenerateDataKeyRequest, UnwrapRequest, UnwrapStreamRequest, WrapRequest,
    WrapStreamRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use super::{ctx, reason};

/// Wraps b"data" with the context app=a.
pub async fn wrap(channel: &Channel) -> Result<Vec<u8>, tonic::Status> {
    KeyServiceClient::new(channel.clone())
        .wrap(WrapRequest {
            plaintext: b"data".to_vec(),
            encryption_context: ctx(&[("app", "a")]),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().envelope)
}

pub async fn unwrap(channel: &Channel, envelope: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    KeyServiceClient::new(channel.clone())
        .unwrap(UnwrapRequest {
            envelope: envelope.to_vec(),
            encryption_context: ctx(&[("app", "a")]),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

pub async fn generate(channel: &Channel, without_plaintext: bool) -> Result<(), tonic::Status> {
    KeyServiceClient::new(channel.clone())
        .generate_data_key(GenerateDataKeyRequest {
            without_plaintext,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

pub async fn wrap_stream(channel: &Channel) -> Result<Vec<u8>, tonic::Status> {
    let reqs = vec![WrapStreamRequest {
        encryption_context: ctx(&[("app", "a")]),
        chunk: b"streamed".to_vec(),
        ..Default::default()
    }];
    let mut out = KeyServiceClient::new(channel.clone())
        .wrap_stream(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut envelope = Vec::new();
    while let Some(msg) = out.message().await? {
        envelope.extend_from_slice(&msg.chunk);
    }
    Ok(envelope)
}

pub async fn unwrap_stream(channel: &Channel, envelope: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let reqs = vec![UnwrapStreamRequest {
        encryption_context: ctx(&[("app", "a")]),
        chunk: envelope.to_vec(),
    }];
    let mut out = KeyServiceClient::new(channel.clone())
        .unwrap_stream(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut plain = Vec::new();
    while let Some(msg) = out.message().await? {
        plain.extend_from_slice(&msg.chunk);
    }
    Ok(plain)
}

pub async fn flush(channel: &Channel) -> Result<(), tonic::Status> {
    AdminServiceClient::new(channel.clone())
        .flush_cache(FlushCacheRequest {})
        .await
        .map(|_| ())
}

#[track_caller]
pub fn denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, caller: &str, operation: &str) {
    let status = result.expect_err("must be denied");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "CALLER_NOT_AUTHORIZED");
    let message = status.message();
    assert!(
        message.contains(caller) && message.contains(&format!("may not {operation}")),
        "the message names the caller and the operation: {message}"
    );
}
