//! Client side: connecting over TCP or a Unix socket, and streaming files
//! through WrapStream / UnwrapStream (the `kms-sidecar client` subcommand,
//! the benchmarks and the tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::{UnwrapStreamRequest, WrapStreamRequest};

/// Opens a channel to `target`: `unix:///path.sock`, `http://host:port` or
/// `host:port`. Unix sockets are reached with `:authority` = `localhost`,
/// which the server's HTTP/2 stack accepts.
///
/// # Errors
/// The transport error of the first connection attempt.
pub async fn connect(target: &str) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = target.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        return Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
    }
    let url = if target.starts_with("http://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    Endpoint::from_shared(url)?.connect().await
}

/// Bytes read from the input per request message by the streaming helpers.
pub const DEFAULT_CHUNK_BYTES: usize = 64 * 1024;

/// Why a streaming client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to {target}: {}{hint}", error_chain(.source), hint = connect_hint(.target))]
    Connect {
        /// The address.
        target: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The server ended the call with an error.
    #[error("{}", describe(.0))]
    Rpc(tonic::Status),
    /// Reading the input or writing the output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

fn connect_hint(target: &str) -> &'static str {
    if target.starts_with('/') {
        " (for a Unix socket, write unix:///path.sock)"
    } else {
        ""
    }
}

fn describe(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let reason = status
        .get_details_error_info()
        .map(|i| format!(" {}", i.reason))
        .unwrap_or_default();
    format!("{:?}{reason}: {}", status.code(), status.message())
}

/// Reads `input` in chunks of `chunk` bytes into request messages; the
/// first message is `first` with the first chunk.
fn request_stream<R, M>(
    mut input: R,
    chunk: usize,
    first: M,
    set_chunk: fn(&mut M, Vec<u8>),
) -> (
    tokio_stream::wrappers::ReceiverStream<M>,
    tokio::task::JoinHandle<std::io::Result<u64>>,
)
where
    R: AsyncRead + Unpin + Send + 'static,
    M: Default + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<M>(4);
    let reader = tokio::spawn(async move {
        let mut msg = Some(first);
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; chunk];
            let mut filled = 0;
            // Fill the chunk (pipes return short reads).
            while filled < chunk {
                let n = input
                    .read(buf.get_mut(filled..).unwrap_or_default())
                    .await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            total += filled as u64;
            let done = filled < chunk;
            let mut m = msg.take().unwrap_or_default();
            set_chunk(&mut m, buf);
            if tx.send(m).await.is_err() || done {
                return Ok(total);
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), reader)
}

/// Streams `input` through WrapStream into `output`; returns the key ID and
/// the plaintext bytes read.
///
/// # Errors
/// The server's status, or an I/O error on either side.
pub async fn wrap_stream<R, W>(
    channel: Channel,
    key_id: String,
    encryption_context: HashMap<String, String>,
    frame_length: u32,
    input: R,
    output: &mut W,
    chunk: usize,
) -> Result<(String, u64), ClientError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let first = WrapStreamRequest {
        key_id,
        encryption_context,
        frame_length,
        chunk: Vec::new(),
        // Unknown in general (pipes): such streams never use cached keys.
        plaintext_length: None,
    };
    let (requests, reader) = request_stream(input, chunk, first, |m, c| m.chunk = c);
    let responses = streaming_client(channel)
        .wrap_stream(requests)
        .await
        .map_err(ClientError::Rpc)?
        .into_inner();
    let (used_key, _) = copy_responses(responses, output).await?;
    let total = reader.await.map_err(std::io::Error::other)??;
    Ok((used_key, total))
}

/// A client that accepts the large messages of streaming calls.
fn streaming_client(channel: Channel) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A streaming response message: its key ID (first message only) and chunk.
trait Chunked {
    fn into_parts(self) -> (String, Vec<u8>);
}

impl Chunked for crate::proto::WrapStreamResponse {
    fn into_parts(self) -> (String, Vec<u8>) {
        (self.key_id, self.chunk)
    }
}

impl Chunked for crate::proto::UnwrapStreamResponse {
    fn into_parts(self) -> (String, Vec<u8>) {
        (self.key_id, self.chunk)
    }
}

/// Writes every response chunk to `output`; returns the key ID and the
/// bytes written.
async fn copy_responses<T: Chunked, W: AsyncWrite + Unpin>(
    mut responses: tonic::Streaming<T>,
    output: &mut W,
) -> Result<(String, u64), ClientError> {
    let mut used_key = String::new();
    let mut written = 0u64;
    while let Some(msg) = responses.next().await {
        let (key_id, chunk) = msg.map_err(ClientError::Rpc)?.into_parts();
        if !key_id.is_empty() {
            used_key = key_id;
        }
        written += chunk.len() as u64;
        output.write_all(&chunk).await?;
    }
    output.flush().await?;
    Ok((used_key, written))
}

/// Streams an envelope from `input` through UnwrapStream into `output`;
/// returns the key ID and the plaintext bytes written. On error, what was
/// written must be discarded ([`unwrap_stream_to_file`] does that).
///
/// # Errors
/// The server's status, or an I/O error on either side.
pub async fn unwrap_stream<R, W>(
    channel: Channel,
    encryption_context: HashMap<String, String>,
    input: R,
    output: &mut W,
    chunk: usize,
) -> Result<(String, u64), ClientError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let first = UnwrapStreamRequest {
        encryption_context,
        chunk: Vec::new(),
    };
    let (requests, reader) = request_stream(input, chunk, first, |m, c| m.chunk = c);
    let responses = streaming_client(channel)
        .unwrap_stream(requests)
        .await
        .map_err(ClientError::Rpc)?
        .into_inner();
    let done = copy_responses(responses, output).await?;
    reader.await.map_err(std::io::Error::other)??;
    Ok(done)
}

/// [`unwrap_stream`] into a file that appears only if the whole envelope
/// verified: the output goes to `<path>.partial` and is renamed at the
/// end, or removed on any error.
///
/// # Errors
/// As [`unwrap_stream`].
pub async fn unwrap_stream_to_file<R>(
    channel: Channel,
    encryption_context: HashMap<String, String>,
    input: R,
    path: &Path,
    chunk: usize,
) -> Result<(String, u64), ClientError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial).await?;
    let result = unwrap_stream(channel, encryption_context, input, &mut file, chunk).await;
    drop(file);
    match result {
        Ok(done) => {
            tokio::fs::rename(&partial, path).await?;
            Ok(done)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

/// Asks `target` for the grpc.health.v1 status of `service` ("" = the
/// process) within `timeout`.
///
/// # Errors
/// Connection failure, the call's status, or the timeout.
pub async fn health(
    target: &str,
    service: &str,
    timeout: std::time::Duration,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, ClientError> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let call = async {
        let channel = connect(target)
            .await
            .map_err(|source| ClientError::Connect {
                target: target.to_owned(),
                source,
            })?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(ClientError::Rpc)?;
        Ok(resp.into_inner().status())
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| {
        ClientError::Rpc(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        )))
    })?
}
