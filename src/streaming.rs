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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use crate::access::{Access, Caller, Operation};
use crate::audit::{Outcome, Pending as AuditPending};
use crate::cache::Materials;
use crate::config::ServiceConfig;
use crate::envelope::{self, ContentType, EncryptionContext};
use crate::error::Error;
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
pub const MAX_WRAP_FRAME_LENGTH: u32 = crate::config::MAX_FRAME_LENGTH;
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
    materials: Arc<Materials>,
    access: Arc<Access>,
    config: ServiceConfig,
    slots: Arc<Semaphore>,
}

/// Sends response messages, failing fast when the client does not read.
struct Sender<T> {
    tx: mpsc::Sender<T>,
    stall: Duration,
    /// Payload bytes sent, for the audit trail.
    sent: Arc<std::sync::atomic::AtomicU64>,
}

/// A response message's payload size.
trait Chunk {
    fn chunk_len(&self) -> usize;
}

impl Chunk for WrapStreamResponse {
    fn chunk_len(&self) -> usize {
        self.chunk.len()
    }
}

impl Chunk for UnwrapStreamResponse {
    fn chunk_len(&self) -> usize {
        self.chunk.len()
    }
}

/// What a streaming call learns for its audit event.
struct Record {
    caller: Caller,
    event: Option<AuditPending>,
    key_id: Option<String>,
    bytes_in: u64,
}

impl Record {
    /// Starts the audit event once the first message named the context.
    fn begin(
        &mut self,
        access: &Access,
        operation: &'static str,
        context: &std::collections::HashMap<String, String>,
    ) {
        if let Some(audit) = &access.audit {
            self.event = Some(audit.begin(&self.caller, operation, Some(context)));
        }
    }
}

impl<T: Chunk> Sender<T> {
    async fn send(&self, msg: T) -> Result<(), Error> {
        use mpsc::error::SendTimeoutError;
        let len = msg.chunk_len() as u64;
        self.sent
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
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
async fn drain<M>(input: &mut Input<M>, idle: Duration) {
    let _ = tokio::time::timeout(MAX_DRAIN, async {
        while let Ok(Ok(Some(_))) = tokio::time::timeout(idle, input.message()).await {}
    })
    .await;
}

/// Longest time a failed call keeps discarding request messages.
const MAX_DRAIN: Duration = Duration::from_secs(30);

/// Reads the first request message within `wait`; an empty stream is a
/// caller error naming what the first message must carry.
async fn first_message<M>(input: &mut Input<M>, wait: Duration, carries: &str) -> Result<M, Error> {
    next(input, wait).await?.ok_or_else(|| {
        Error::InvalidRequest(format!(
            "empty request stream: the first message must carry the {carries}"
        ))
    })
}

/// Reads the next request message within `wait`.
async fn next<M>(input: &mut Input<M>, wait: Duration) -> Result<Option<M>, Error> {
    match tokio::time::timeout(wait, input.message()).await {
        Err(_) => Err(Error::StreamIdle { waited: wait }),
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(status)) => Err(crate::status::from_transport(&status)),
    }
}

impl Streams {
    /// Streaming calls over `materials`, checked and recorded by `access`,
    /// with `config`'s limits.
    pub fn new(materials: Arc<Materials>, access: Arc<Access>, config: ServiceConfig) -> Self {
        Self {
            materials,
            access,
            slots: Arc::new(Semaphore::new(config.streams.max_concurrent)),
            config,
        }
    }

    /// Takes a slot, spawns the call's task and returns its response stream.
    fn spawn<Req, Resp, F, Fut>(
        &self,
        input: Input<Req>,
        caller: Caller,
        operation: &'static str,
        run: F,
    ) -> Result<ResponseStream<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(Self, Input<Req>, Sender<Resp>, Record) -> Fut + Send + 'static,
        Fut: Future<Output = (Result<(), Error>, Vec<String>, Input<Req>, Record)> + Send + 'static,
    {
        // Refused before it starts: recorded, counted, logged.
        let refuse = |err: Error| {
            self.access.audit_refusal(&caller, operation, &err);
            let status = crate::api::log_failure(&err, &[]);
            crate::metrics::global().request(operation, status.code(), Duration::ZERO);
            status
        };
        // A caller without the right holds no slot, even for a moment.
        let right = if operation == "WrapStream" {
            Operation::Wrap
        } else {
            Operation::Unwrap
        };
        self.access
            .policy
            .check_any(&caller, &[right])
            .map_err(refuse)?;
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            refuse(Error::TooManyStreams {
                limit: self.config.streams.max_concurrent,
            })
        })?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sender = Sender {
            tx,
            stall: self.config.streams.stall_timeout,
            sent: Arc::clone(&sent),
        };
        let record = Record {
            caller,
            event: None,
            key_id: None,
            bytes_in: 0,
        };
        let access = Arc::clone(&self.access);
        let started = std::time::Instant::now();
        crate::metrics::global().streams(1);
        let this = self.clone();
        let idle = self.config.streams.idle_timeout;
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let (result, context_keys, mut input, record) =
                    run(this, input, sender, record).await;
                if let Some(audit) = &access.audit {
                    let event = record
                        .event
                        .unwrap_or_else(|| audit.begin(&record.caller, operation, None));
                    audit.finish(
                        event,
                        Outcome {
                            key_id: record.key_id.as_deref(),
                            bytes_in: record.bytes_in as usize,
                            bytes_out: sent.load(std::sync::atomic::Ordering::Relaxed) as usize,
                            error: result.as_ref().err(),
                        },
                    );
                }
                crate::api::record_result(&tracing::Span::current(), result.as_ref().copied());
                let failed = result.is_err();
                let metrics = crate::metrics::global();
                if !failed {
                    if operation == "WrapStream" {
                        metrics.sealed(record.bytes_in);
                    } else {
                        metrics.opened(sent.load(std::sync::atomic::Ordering::Relaxed));
                    }
                }
                let outcome = result.map_err(|err| {
                    let keys: Vec<&str> = context_keys.iter().map(String::as_str).collect();
                    crate::api::log_failure(&err, &keys)
                });
                let code = outcome
                    .as_ref()
                    .map_or_else(Status::code, |()| tonic::Code::Ok);
                tracing::Span::current().record("code", crate::metrics::code_name(code));
                metrics.request(operation, code, started.elapsed());
                metrics.streams(-1);
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
        input: Input<WrapStreamRequest>,
        caller: Caller,
    ) -> Result<ResponseStream<WrapStreamResponse>, Status> {
        self.spawn(
            input,
            caller,
            "WrapStream",
            |this, mut input, out, mut record| async move {
                let result = this.run_wrap(&mut input, &out, &mut record).await;
                (result, Vec::new(), input, record)
            },
        )
    }

    /// Starts an UnwrapStream call.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when all stream slots are taken.
    pub fn unwrap(
        &self,
        input: Input<UnwrapStreamRequest>,
        caller: Caller,
    ) -> Result<ResponseStream<UnwrapStreamResponse>, Status> {
        self.spawn(
            input,
            caller,
            "UnwrapStream",
            |this, mut input, out, mut record| async move {
                let mut keys = Vec::new();
                let result = this
                    .run_unwrap(&mut input, &out, &mut keys, &mut record)
                    .await;
                (result, keys, input, record)
            },
        )
    }

    async fn run_wrap(
        &self,
        input: &mut Input<WrapStreamRequest>,
        out: &Sender<WrapStreamResponse>,
        record: &mut Record,
    ) -> Result<(), Error> {
        let streams = self.config.streams;
        let first = first_message(input, streams.first_message_timeout, "parameters").await?;
        record.begin(&self.access, "WrapStream", &first.encryption_context);
        let frame_length = match first.frame_length {
            0 => self.config.frame_length,
            n @ 1..=MAX_WRAP_FRAME_LENGTH => n,
            n => {
                return Err(Error::InvalidRequest(format!(
                    "frame_length {n} is out of range: use 1 to {MAX_WRAP_FRAME_LENGTH} (0 = server default)"
                )));
            }
        };
        let declared = first.plaintext_length;
        let (key_id, mut sealer, header) = crate::api::start_envelope(
            &self.materials,
            (&self.access, &record.caller),
            &self.config,
            &first.key_id,
            first.encryption_context,
            frame_length,
            declared,
        )
        .await?;
        record.key_id = Some(key_id.clone());
        out.send(WrapStreamResponse {
            chunk: header,
            key_id,
        })
        .await?;

        let frame = frame_length as usize;
        let sealed_frame = frame + envelope::REGULAR_FRAME_OVERHEAD as usize;
        let mut pending = Pending::default();
        record.bytes_in = first.chunk.len() as u64;
        check_declared(declared, record.bytes_in, false)?;
        pending.push(first.chunk);
        let mut sealed: Vec<u8> = Vec::new();
        let mut total: u64 = 0;
        loop {
            // Seal every frame known not to be the last one, copying its
            // plaintext once, from the request chunks into the output.
            while pending.len() > frame {
                // Output messages are sized once: flush rather than grow.
                if sealed.len() + sealed_frame > sealed.capacity() {
                    if !sealed.is_empty() {
                        out.send(wrap_chunk(std::mem::take(&mut sealed))).await?;
                    }
                    let frames = ((pending.len() - 1) / frame).min(OUT_MESSAGE_BYTES / frame + 1);
                    sealed.reserve_exact(frames * sealed_frame);
                }
                sealer.seal_frame_with(&mut sealed, |o| pending.move_to(frame, o))?;
                total += frame as u64;
                if sealed.len() >= OUT_MESSAGE_BYTES {
                    out.send(wrap_chunk(std::mem::take(&mut sealed))).await?;
                }
            }
            // Batch output while more input is already waiting; flush before
            // waiting for the client.
            let msg = match try_next(input)? {
                Some(msg) => msg,
                None => {
                    if !sealed.is_empty() {
                        out.send(wrap_chunk(std::mem::take(&mut sealed))).await?;
                    }
                    next(input, streams.idle_timeout).await?
                }
            };
            match msg {
                Some(msg) => {
                    record.bytes_in += msg.chunk.len() as u64;
                    check_declared(declared, record.bytes_in, false)?;
                    pending.push(msg.chunk);
                }
                None => break,
            }
        }
        check_declared(declared, record.bytes_in, true)?;
        let len = pending.len();
        total += len as u64;
        sealer.seal_final_with(len, &mut sealed, |o| pending.move_to(len, o))?;
        out.send(wrap_chunk(sealed)).await?;
        tracing::debug!(plaintext_bytes = total, "WrapStream done");
        Ok(())
    }

    async fn run_unwrap(
        &self,
        input: &mut Input<UnwrapStreamRequest>,
        out: &Sender<UnwrapStreamResponse>,
        context_keys: &mut Vec<String>,
        record: &mut Record,
    ) -> Result<(), Error> {
        let streams = self.config.streams;
        let first = first_message(input, streams.first_message_timeout, "context").await?;
        record.begin(&self.access, "UnwrapStream", &first.encryption_context);
        record.bytes_in = first.chunk.len() as u64;
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
                Some(msg) => {
                    record.bytes_in += msg.chunk.len() as u64;
                    buf.extend_from_slice(&msg.chunk);
                }
                None => return Err(Error::auth("envelope ends inside its header")),
            }
        };
        let (mut opener, key_id) = crate::api::open_header(
            &self.materials,
            (&self.access, &record.caller),
            &parsed,
            supplied,
        )
        .await?;
        record.key_id = Some(key_id.clone());
        // Most bytes of one frame (or of non-framed content) held until its
        // tag verifies; checked once the header authenticated, so damage
        // to the header reads as damage, as in unary Unwrap.
        let unverified_limit = self.config.max_message_bytes;
        if let ContentType::Framed { frame_length } = parsed.header.content_type
            && frame_length as usize > unverified_limit
        {
            return Err(Error::PayloadTooLarge {
                what: "envelope frame length",
                size: frame_length.into(),
                limit: unverified_limit as u64,
                hint: "; UnwrapStream holds one frame until it verifies",
            });
        }

        out.send(UnwrapStreamResponse {
            chunk: Vec::new(),
            key_id,
            encryption_context: parsed.header.context.to_hash_map(),
        })
        .await?;

        let mut pending = Pending::default();
        pending.push(buf.split_off(parsed.len));
        drop(buf);
        let mut plain: Vec<u8> = Vec::new();
        while !opener.is_finished() {
            // Open every frame that is complete, copying its ciphertext
            // once, from the request chunks into the output.
            let mut head_bytes = [0u8; envelope::MAX_FRAME_HEAD];
            let seen = pending.peek(&mut head_bytes);
            let head = match opener.next_head(head_bytes.get(..seen).unwrap_or_default())? {
                Some(head) if head.content_len > unverified_limit => {
                    return Err(Error::PayloadTooLarge {
                        what: "non-framed envelope content",
                        size: head.content_len as u64,
                        limit: unverified_limit as u64,
                        hint: "; UnwrapStream holds non-framed content until it verifies",
                    });
                }
                Some(head) if pending.len() >= head.total_len() => Some(head),
                _ => None,
            };
            if let Some(head) = head {
                pending.skip(head.head_len);
                // Output messages are sized once: flush rather than grow.
                if plain.len() + head.content_len > plain.capacity() {
                    if !plain.is_empty() {
                        send_plaintext(out, &mut plain).await?;
                    }
                    let expected = pending.len().min(OUT_MESSAGE_BYTES + head.content_len);
                    plain.reserve_exact(expected.max(head.content_len));
                }
                let start = plain.len();
                pending.move_to(head.content_len, &mut plain);
                let mut tag = [0u8; envelope::TAG_LEN];
                pending.move_to_slice(&mut tag);
                opener.open_frame(&head, &tag, &mut plain, start)?;
                if !head.last && plain.len() >= OUT_MESSAGE_BYTES {
                    send_plaintext(out, &mut plain).await?;
                }
                continue;
            }
            let msg = match try_next(input)? {
                Some(msg) => msg,
                None => {
                    if !plain.is_empty() {
                        send_plaintext(out, &mut plain).await?;
                    }
                    next(input, streams.idle_timeout).await?
                }
            };
            match msg {
                Some(msg) => {
                    record.bytes_in += msg.chunk.len() as u64;
                    pending.push(msg.chunk);
                }
                None => return Err(Error::auth("envelope truncated")),
            }
        }
        // The final frame verified; it is released only once the request
        // stream has ended with nothing after it.
        if pending.len() != 0 {
            return Err(Error::auth("bytes after the final frame"));
        }
        while let Some(msg) = next(input, streams.idle_timeout).await? {
            if !msg.chunk.is_empty() {
                return Err(Error::auth("bytes after the final frame"));
            }
        }
        send_plaintext(out, &mut plain).await
    }
}

/// The next request message if one is already waiting (`Ok(None)`: none
/// yet); `Ok(Some(None))` is the end of the stream.
#[allow(
    clippy::option_option,
    reason = "not ready / ended / message are three distinct answers"
)]
fn try_next<M>(input: &mut Input<M>) -> Result<Option<Option<M>>, Error> {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(&mut input.inner).poll_next(&mut cx) {
        Poll::Pending => Ok(None),
        Poll::Ready(None) => input
            .end()
            .map(|()| Some(None))
            .map_err(|status| crate::status::from_transport(&status)),
        Poll::Ready(Some(Ok(msg))) => Ok(Some(Some(msg))),
        Poll::Ready(Some(Err(status))) => Err(crate::status::from_transport(&status)),
    }
}

/// Set by the server's request layer when a streaming call's request body
/// fails (the client reset the stream) rather than ending: tonic reports
/// both as the end of the request stream.
#[derive(Debug, Clone, Default)]
pub struct RequestReset(Arc<std::sync::atomic::AtomicBool>);

impl RequestReset {
    /// Records that the request body failed.
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    fn happened(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A streaming call's request messages, telling the client's end of the
/// stream from its reset (CANCELLED / STREAM_ABORTED), so that a cancelled
/// WrapStream is never sealed as if complete and a cancelled UnwrapStream
/// is not reported as a corrupt envelope.
#[derive(Debug)]
pub struct Input<M> {
    inner: Streaming<M>,
    reset: Option<RequestReset>,
}

impl<M> Input<M> {
    /// The messages of `inner`; `reset` is the flag the server's request
    /// layer put in the request's extensions.
    pub fn new(inner: Streaming<M>, reset: Option<RequestReset>) -> Self {
        Self { inner, reset }
    }

    /// The next message; `None` at the client's end of the stream.
    async fn message(&mut self) -> Result<Option<M>, Status> {
        match self.inner.message().await? {
            Some(msg) => Ok(Some(msg)),
            None => self.end().map(|()| None),
        }
    }

    /// At the end of the messages: an error if it was a reset.
    fn end(&self) -> Result<(), Status> {
        if self.reset.as_ref().is_some_and(RequestReset::happened) {
            return Err(Status::cancelled("the client reset the stream"));
        }
        Ok(())
    }
}

/// Sends verified plaintext in messages of at most [`OUT_MESSAGE_BYTES`]
/// when a frame made it larger (frames over 1 MiB), else as it is.
async fn send_plaintext(
    out: &Sender<UnwrapStreamResponse>,
    plain: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut all = std::mem::take(plain);
    if all.is_empty() {
        return Ok(());
    }
    if all.len() > 2 * OUT_MESSAGE_BYTES {
        for piece in all.chunks(OUT_MESSAGE_BYTES) {
            out.send(unwrap_chunk(piece.to_vec())).await?;
        }
        all.clear();
        return Ok(());
    }
    out.send(unwrap_chunk(all)).await
}

/// Chunks smaller than this are coalesced in [`Pending`].
const SMALL_CHUNK: usize = 4096;
/// Size of the buffers small chunks are coalesced into.
const COALESCE_BYTES: usize = 64 * 1024;

/// Request bytes received but not yet consumed, kept as the chunks they
/// arrived in: nothing is copied into one big buffer.
#[derive(Debug, Default)]
struct Pending {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already consumed.
    offset: usize,
    len: usize,
}

impl Pending {
    /// Adds a request chunk. Small chunks are copied into the previous one
    /// (up to [`COALESCE_BYTES`]) so that a client sending one byte per
    /// message costs one byte, not one allocation, per byte.
    fn push(&mut self, chunk: Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        if chunk.len() < SMALL_CHUNK {
            if let Some(back) = self.chunks.back_mut()
                && back.len() + chunk.len() <= COALESCE_BYTES
                && back.capacity() >= COALESCE_BYTES
            {
                back.extend_from_slice(&chunk);
                return;
            }
            let mut merged = Vec::with_capacity(COALESCE_BYTES);
            merged.extend_from_slice(&chunk);
            self.chunks.push_back(merged);
            return;
        }
        self.chunks.push_back(chunk);
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Copies the first bytes into `out` without consuming them; returns
    /// how many were copied.
    fn peek(&self, out: &mut [u8]) -> usize {
        let mut filled = 0;
        let mut offset = self.offset;
        for chunk in &self.chunks {
            let src = chunk.get(offset..).unwrap_or_default();
            let dst = out.get_mut(filled..).unwrap_or_default();
            let n = src.len().min(dst.len());
            dst.get_mut(..n)
                .unwrap_or_default()
                .copy_from_slice(src.get(..n).unwrap_or_default());
            filled += n;
            offset = 0;
            if filled == out.len() {
                break;
            }
        }
        filled
    }

    /// Consumes `n` bytes, handing each piece to `sink`.
    fn consume(&mut self, mut n: usize, mut sink: impl FnMut(&[u8])) {
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                return;
            };
            let available = front.get(self.offset..).unwrap_or_default();
            let take = available.len().min(n);
            sink(available.get(..take).unwrap_or_default());
            self.offset += take;
            self.len -= take;
            n -= take;
            if self.offset == front.len() {
                self.chunks.pop_front();
                self.offset = 0;
            }
        }
    }

    fn skip(&mut self, n: usize) {
        self.consume(n, |_| {});
    }

    /// Moves `n` bytes to the end of `out`.
    fn move_to(&mut self, n: usize, out: &mut Vec<u8>) {
        self.consume(n, |piece| out.extend_from_slice(piece));
    }

    /// Moves exactly `out.len()` bytes into `out`.
    fn move_to_slice(&mut self, out: &mut [u8]) {
        let mut at = 0;
        self.consume(out.len(), |piece| {
            if let Some(dst) = out.get_mut(at..at + piece.len()) {
                dst.copy_from_slice(piece);
            }
            at += piece.len();
        });
    }
}

fn wrap_chunk(chunk: Vec<u8>) -> WrapStreamResponse {
    WrapStreamResponse {
        chunk,
        key_id: String::new(),
    }
}

fn unwrap_chunk(chunk: Vec<u8>) -> UnwrapStreamResponse {
    UnwrapStreamResponse {
        chunk,
        ..Default::default()
    }
}

/// Holds a WrapStream to its declared `plaintext_length`: never more
/// bytes, and at the end exactly as many.
fn check_declared(declared: Option<u64>, received: u64, at_end: bool) -> Result<(), Error> {
    match declared {
        Some(d) if received > d || (at_end && received != d) => {
            Err(Error::InvalidRequest(format!(
                "the stream carried {received} plaintext bytes{} but declared plaintext_length {d}; \
                 declare the exact length, or leave plaintext_length unset",
                if at_end { "" } else { " so far" }
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn pending_moves_bytes_across_chunks() {
        let mut p = Pending::default();
        p.push(vec![1, 2, 3]);
        p.push(Vec::new());
        p.push(vec![4]);
        p.push(vec![5, 6, 7, 8]);
        assert_eq!(p.len(), 8);
        let mut head = [0u8; 5];
        assert_eq!(p.peek(&mut head), 5);
        assert_eq!(head, [1, 2, 3, 4, 5]);
        p.skip(2);
        let mut out = vec![9];
        p.move_to(3, &mut out);
        assert_eq!(out, [9, 3, 4, 5]);
        let mut tag = [0u8; 3];
        p.move_to_slice(&mut tag);
        assert_eq!(tag, [6, 7, 8]);
        assert_eq!(p.len(), 0);
        let mut big = [0u8; 4];
        assert_eq!(p.peek(&mut big), 0);
    }

    #[test]
    fn one_byte_chunks_share_buffers() {
        let mut p = Pending::default();
        for i in 0..200_000u32 {
            p.push(vec![i as u8]);
        }
        assert_eq!(p.len(), 200_000);
        assert!(p.chunks.len() <= 4, "{} buffers", p.chunks.len());
        let mut out = Vec::new();
        p.move_to(200_000, &mut out);
        assert!(out.iter().enumerate().all(|(i, b)| *b == i as u8));
    }
}
