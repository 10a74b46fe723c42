//! WrapStream and UnwrapStream: envelopes of any size in bounded memory.
//!
//! Each call runs in its own task that reads the request stream, seals or
//! opens whole frames, and hands response messages to a channel of
//! [`CHANNEL_DEPTH`] messages. When the client stops reading, the channel
//! fills, the task stops reading requests, and HTTP/2 flow control stops
//! the client: nothing piles up. Memory per call is bounded by one request
//! message, one frame of unverified input, and the channel: a few MiB,
//! whatever the payload size.
//!
//! Three timers bound a call: the first message must arrive within the
//! first-message timeout; later requests within the idle timeout; and the
//! client must accept pending output within the stall timeout, so a client
//! that writes everything before reading fails fast with
//! RESOURCE_EXHAUSTED instead of hanging until its deadline.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Status, Streaming};

use crate::config::ServiceConfig;
use crate::envelope::{self, ContentType, EncryptionContext, Opener, Sealer, Step};
use crate::error::Error;
use crate::keyring::Keyring;
use crate::proto::{
    UnwrapStreamRequest, UnwrapStreamResponse, WrapStreamRequest, WrapStreamResponse,
};
use crate::status::to_status;

/// Response messages buffered per call before the task waits for the client.
pub const CHANNEL_DEPTH: usize = 2;
/// Output bytes gathered before a response message is sent; also the most
/// plaintext one UnwrapStream response carries.
pub const OUT_MESSAGE_BYTES: usize = 1 << 20;
/// Largest frame length WrapStream accepts.
pub const MAX_WRAP_FRAME_LENGTH: u32 = 1 << 20;
/// Largest header UnwrapStream buffers before giving up on it.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// Limits of streaming calls.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    /// Most WrapStream + UnwrapStream calls in progress at once; more are
    /// refused at once with RESOURCE_EXHAUSTED.
    pub max_concurrent: usize,
    /// Longest wait for the first request message.
    pub first_message_timeout: Duration,
    /// Longest wait for a further request message.
    pub idle_timeout: Duration,
    /// Longest wait for the client to accept a response message.
    pub stall_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            first_message_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(5),
        }
    }
}

/// The response half of a streaming call: the messages the call's task
/// produced, then its final status. The final status travels on its own
/// one-shot channel, so it is delivered even when the message channel was
/// full when the task gave up: a failed call can never end with OK.
#[derive(Debug)]
pub struct ResponseStream<T> {
    messages: mpsc::Receiver<T>,
    outcome: Option<oneshot::Receiver<Result<(), Status>>>,
    failed: bool,
}

impl<T> tokio_stream::Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        // A failure is reported at once; queued messages are dropped (the
        // client must discard everything of a failed call anyway).
        if let Some(outcome) = self.outcome.as_mut()
            && let Poll::Ready(result) = std::pin::Pin::new(outcome).poll(cx)
        {
            let result = result.unwrap_or_else(|_| {
                Err(to_status(
                    &Error::Internal("streaming task ended early"),
                    &[],
                ))
            });
            match result {
                Err(status) => {
                    self.outcome = None;
                    self.messages.close();
                    while self.messages.try_recv().is_ok() {}
                    self.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Ok(()) => self.outcome = None,
            }
        }
        if self.failed {
            return Poll::Ready(None);
        }
        match self.messages.poll_recv(cx) {
            Poll::Ready(Some(msg)) => Poll::Ready(Some(Ok(msg))),
            // The task dropped its sender: done once the outcome is known.
            Poll::Ready(None) if self.outcome.is_none() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// Runs streaming calls for the service.
#[derive(Debug, Clone)]
pub struct Streams {
    keyring: Arc<Keyring>,
    config: ServiceConfig,
    slots: Arc<Semaphore>,
}

/// Sends response messages, failing fast when the client does not read.
struct Sender<T> {
    tx: mpsc::Sender<T>,
    stall: Duration,
}

impl<T> Sender<T> {
    async fn send(&self, msg: T) -> Result<(), Error> {
        use mpsc::error::SendTimeoutError;
        match self.tx.send_timeout(msg, self.stall).await {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(_)) => Err(Error::StreamNotRead {
                waited: self.stall,
                pending: (CHANNEL_DEPTH + 1) * OUT_MESSAGE_BYTES,
            }),
            Err(SendTimeoutError::Closed(_)) => Err(Error::StreamAborted("the client went away")),
        }
    }
}

/// After a failure, reads and discards what the client still sends (for at
/// most [`MAX_DRAIN`], each message within `idle`), so that a client that
/// writes before it reads finishes writing and then sees the error status
/// instead of waiting on flow control until its deadline.
async fn drain<M>(input: &mut Streaming<M>, idle: Duration) {
    let _ = tokio::time::timeout(MAX_DRAIN, async {
        while let Ok(Ok(Some(_))) = tokio::time::timeout(idle, input.message()).await {}
    })
    .await;
}

/// Longest time a failed call keeps discarding request messages.
const MAX_DRAIN: Duration = Duration::from_secs(30);

/// Reads the next request message within `wait`.
async fn next<M>(input: &mut Streaming<M>, wait: Duration) -> Result<Option<M>, Error> {
    match tokio::time::timeout(wait, input.message()).await {
        Err(_) => Err(Error::StreamIdle { waited: wait }),
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(status)) => Err(crate::status::from_transport(&status)),
    }
}

impl Streams {
    /// Streaming calls over `keyring` with `config`'s limits.
    pub fn new(keyring: Arc<Keyring>, config: ServiceConfig) -> Self {
        Self {
            keyring,
            slots: Arc::new(Semaphore::new(config.streams.max_concurrent)),
            config,
        }
    }

    /// Takes a slot, spawns the call's task and returns its response stream.
    fn spawn<Req, Resp, F, Fut>(
        &self,
        input: Streaming<Req>,
        run: F,
    ) -> Result<ResponseStream<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(Self, Streaming<Req>, Sender<Resp>) -> Fut + Send + 'static,
        Fut: Future<Output = (Result<(), Error>, Vec<String>, Streaming<Req>)> + Send + 'static,
    {
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            let err = Error::TooManyStreams {
                limit: self.config.streams.max_concurrent,
            };
            tracing::info!(error = %err, "streaming call refused");
            to_status(&err, &[])
        })?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let sender = Sender {
            tx,
            stall: self.config.streams.stall_timeout,
        };
        let this = self.clone();
        let idle = self.config.streams.idle_timeout;
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let (result, context_keys, mut input) = run(this, input, sender).await;
                let failed = result.is_err();
                let outcome = result.map_err(|err| {
                    let keys: Vec<&str> = context_keys.iter().map(String::as_str).collect();
                    crate::api::log_failure(&err, &keys)
                });
                let _ = done_tx.send(outcome);
                if failed {
                    drain(&mut input, idle).await;
                }
                drop(permit);
            },
            span,
        ));
        Ok(ResponseStream {
            messages: rx,
            outcome: Some(done_rx),
            failed: false,
        })
    }

    /// Starts a WrapStream call.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when all stream slots are taken.
    pub fn wrap(
        &self,
        input: Streaming<WrapStreamRequest>,
    ) -> Result<ResponseStream<WrapStreamResponse>, Status> {
        self.spawn(input, |this, mut input, out| async move {
            (this.run_wrap(&mut input, &out).await, Vec::new(), input)
        })
    }

    /// Starts an UnwrapStream call.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when all stream slots are taken.
    pub fn unwrap(
        &self,
        input: Streaming<UnwrapStreamRequest>,
    ) -> Result<ResponseStream<UnwrapStreamResponse>, Status> {
        self.spawn(input, |this, mut input, out| async move {
            let mut keys = Vec::new();
            let result = this.run_unwrap(&mut input, &out, &mut keys).await;
            (result, keys, input)
        })
    }

    async fn run_wrap(
        &self,
        input: &mut Streaming<WrapStreamRequest>,
        out: &Sender<WrapStreamResponse>,
    ) -> Result<(), Error> {
        let streams = self.config.streams;
        let first = next(input, streams.first_message_timeout)
            .await?
            .ok_or_else(|| {
                Error::InvalidRequest(
                    "empty request stream: the first message must carry the parameters".into(),
                )
            })?;
        let frame_length = match first.frame_length {
            0 => self.config.frame_length,
            n @ 1..=MAX_WRAP_FRAME_LENGTH => n,
            n => {
                return Err(Error::InvalidRequest(format!(
                    "frame_length {n} is out of range: use 1 to {MAX_WRAP_FRAME_LENGTH} (0 = server default)"
                )));
            }
        };
        let context = EncryptionContext::from_request(
            first.encryption_context,
            self.config.limits.max_context_bytes,
        )?;
        let key_id = self.keyring.resolve(&first.key_id)?.to_owned();
        tracing::Span::current().record("key_id", key_id.as_str());
        let (data_key, edk) = self.keyring.generate_message_key(&key_id, &context).await?;
        let (mut sealer, header) = Sealer::start(
            &data_key,
            context,
            vec![edk],
            frame_length,
            &ring::rand::SystemRandom::new(),
        )?;
        drop(data_key);
        out.send(WrapStreamResponse {
            chunk: header,
            key_id,
        })
        .await?;

        let frame = frame_length as usize;
        let mut pending = first.chunk;
        let mut sealed: Vec<u8> = Vec::with_capacity(OUT_MESSAGE_BYTES + frame + 64);
        let mut total: u64 = 0;
        loop {
            // Seal every frame known not to be the last one.
            let mut start = 0;
            while pending.len() - start > frame {
                let chunk = pending.get(start..start + frame).unwrap_or_default();
                sealer.seal_frame(chunk, &mut sealed)?;
                start += frame;
                if sealed.len() >= OUT_MESSAGE_BYTES {
                    out.send(take_chunk(&mut sealed)).await?;
                }
            }
            pending.drain(..start);
            total += start as u64;
            if !sealed.is_empty() {
                out.send(take_chunk(&mut sealed)).await?;
            }
            match next(input, streams.idle_timeout).await? {
                Some(msg) => pending.extend_from_slice(&msg.chunk),
                None => break,
            }
        }
        total += pending.len() as u64;
        sealer.seal_final(&pending, &mut sealed)?;
        out.send(take_chunk(&mut sealed)).await?;
        tracing::debug!(plaintext_bytes = total, "WrapStream done");
        Ok(())
    }

    async fn run_unwrap(
        &self,
        input: &mut Streaming<UnwrapStreamRequest>,
        out: &Sender<UnwrapStreamResponse>,
        context_keys: &mut Vec<String>,
    ) -> Result<(), Error> {
        let streams = self.config.streams;
        let first = next(input, streams.first_message_timeout)
            .await?
            .ok_or_else(|| {
                Error::InvalidRequest(
                    "empty request stream: the first message must carry the context".into(),
                )
            })?;
        context_keys.extend(first.encryption_context.keys().cloned());
        context_keys.sort();
        let supplied = EncryptionContext::from_pairs(first.encryption_context);
        let mut buf = first.chunk;
        let parsed = loop {
            if let Some(parsed) = envelope::parse_header(&buf, &self.config.limits)? {
                break parsed;
            }
            if buf.len() > MAX_HEADER_BYTES {
                return Err(Error::auth("header longer than any valid header"));
            }
            match next(input, streams.idle_timeout).await? {
                Some(msg) => buf.extend_from_slice(&msg.chunk),
                None => return Err(Error::auth("envelope ends inside its header")),
            }
        };
        if !parsed.header.context.matches_ignoring_reserved(&supplied) {
            return Err(Error::auth("encryption context differs"));
        }
        // Bytes of one frame (or of non-framed content) that must be held
        // until its tag verifies.
        let unverified_limit = match parsed.header.content_type {
            ContentType::Framed { frame_length } => {
                let limit = self.config.max_message_bytes as u64;
                if u64::from(frame_length) > limit {
                    return Err(Error::PayloadTooLarge {
                        what: "envelope frame length",
                        size: frame_length.into(),
                        limit,
                        hint: "; UnwrapStream holds one frame until it verifies",
                    });
                }
                frame_length as usize + envelope::FINAL_FRAME_OVERHEAD as usize
            }
            ContentType::NonFramed => self.config.max_message_bytes,
        };
        let (data_key, key_id) = self
            .keyring
            .decrypt_message_key(&parsed.header.encrypted_data_keys, &parsed.header.context)
            .await?;
        tracing::Span::current().record("key_id", key_id.as_str());
        let mut opener = Opener::new(&parsed, &data_key)?;
        drop(data_key);
        out.send(UnwrapStreamResponse {
            chunk: Vec::new(),
            key_id,
            encryption_context: parsed.header.context.to_hash_map(),
        })
        .await?;

        let mut pos = parsed.len;
        let mut plain: Vec<u8> = Vec::new();
        loop {
            match opener.open_next(buf.get(pos..).unwrap_or_default(), &mut plain)? {
                Step::Opened { consumed, last } => {
                    pos += consumed;
                    if last {
                        break;
                    }
                    while plain.len() >= OUT_MESSAGE_BYTES {
                        let rest = plain.split_off(OUT_MESSAGE_BYTES);
                        out.send(unwrap_chunk(std::mem::replace(&mut plain, rest)))
                            .await?;
                    }
                }
                Step::NeedMore => {
                    if !plain.is_empty() {
                        out.send(unwrap_chunk(std::mem::take(&mut plain))).await?;
                    }
                    buf.drain(..pos);
                    pos = 0;
                    if buf.len() > unverified_limit {
                        return Err(Error::PayloadTooLarge {
                            what: "non-framed envelope content",
                            size: buf.len() as u64,
                            limit: unverified_limit as u64,
                            hint: "; UnwrapStream buffers non-framed content until it verifies",
                        });
                    }
                    match next(input, streams.idle_timeout).await? {
                        Some(msg) => buf.extend_from_slice(&msg.chunk),
                        None => return Err(Error::auth("envelope truncated")),
                    }
                }
            }
        }
        // The final frame verified; it is released only once the request
        // stream has ended with nothing after it.
        if pos != buf.len() {
            return Err(Error::auth("bytes after the final frame"));
        }
        while let Some(msg) = next(input, streams.idle_timeout).await? {
            if !msg.chunk.is_empty() {
                return Err(Error::auth("bytes after the final frame"));
            }
        }
        while plain.len() > OUT_MESSAGE_BYTES {
            let rest = plain.split_off(OUT_MESSAGE_BYTES);
            out.send(unwrap_chunk(std::mem::replace(&mut plain, rest)))
                .await?;
        }
        if !plain.is_empty() {
            out.send(unwrap_chunk(plain)).await?;
        }
        Ok(())
    }
}

fn take_chunk(sealed: &mut Vec<u8>) -> WrapStreamResponse {
    let capacity = sealed.capacity();
    WrapStreamResponse {
        chunk: std::mem::replace(sealed, Vec::with_capacity(capacity)),
        key_id: String::new(),
    }
}

fn unwrap_chunk(chunk: Vec<u8>) -> UnwrapStreamResponse {
    UnwrapStreamResponse {
        chunk,
        ..Default::default()
    }
}
