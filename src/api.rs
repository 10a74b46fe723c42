//! The `kms_sidecar.v1.KeyService` gRPC service: request validation and
//! limits, then the keyring for data keys and the envelope for the data.
//! Errors leave through [`crate::status::to_status`] only.

use std::sync::Arc;

use ring::rand::SystemRandom;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroize;

use crate::access::{Access, Caller, Operation, Policy};
use crate::audit::{Outcome, Pending};
use crate::cache::{DataKeyCache, Materials};
use crate::config::ServiceConfig;
use crate::envelope::{self, EncryptionContext};
use crate::error::Error;
use crate::keyring::Keyring;
use crate::proto::admin_service_server::AdminService;
use crate::proto::key_service_server::KeyService;
use crate::proto::{
    CacheStats, FlushCacheRequest, FlushCacheResponse, GenerateDataKeyRequest,
    GenerateDataKeyResponse, GetCacheStatsRequest, UnwrapRequest, UnwrapResponse,
    UnwrapStreamRequest, UnwrapStreamResponse, WrapRequest, WrapResponse, WrapStreamRequest,
    WrapStreamResponse,
};
use crate::status::to_status;
use crate::streaming::{Input, RequestReset, ResponseStream, Streams};

/// Most bytes GenerateDataKey returns (the KMS limit).
pub const MAX_DATA_KEY_BYTES: u32 = 1024;
/// Protobuf framing and the key_id field of a reply, beyond its payload.
const REPLY_FIELD_OVERHEAD: usize = 2048 + 16;

/// The service, cheap to clone (one per listener).
#[derive(Debug, Clone)]
pub struct KeyServiceImpl {
    materials: Arc<Materials>,
    access: Arc<Access>,
    config: ServiceConfig,
    streams: Streams,
}

impl KeyServiceImpl {
    /// A service over `materials`, checking and recording calls with
    /// `access`, with `config`'s limits.
    pub fn new(materials: Arc<Materials>, access: Arc<Access>, config: ServiceConfig) -> Self {
        Self {
            streams: Streams::new(Arc::clone(&materials), Arc::clone(&access), config),
            materials,
            access,
            config,
        }
    }

    /// Starts the audit event of a unary call; if the call is dropped
    /// before [`Self::finish_audit`] (the client cancelled, a deadline or
    /// `--request-timeout` passed), the event is still written, as
    /// abandoned.
    fn begin_audit(
        &self,
        caller: &Caller,
        operation: &'static str,
        context: Option<&std::collections::HashMap<String, String>>,
        bytes_in: usize,
    ) -> AuditCall<'_> {
        AuditCall {
            audit: self.access.audit.as_ref(),
            pending: self
                .access
                .audit
                .as_ref()
                .map(|a| a.begin(caller, operation, context)),
            bytes_in,
        }
    }

    fn finish_audit<R>(
        &self,
        mut call: AuditCall<'_>,
        result: &Result<R, Error>,
        summary: impl FnOnce(&R) -> (Option<&str>, usize),
    ) {
        let bytes_in = call.bytes_in;
        let (Some(audit), Some(pending)) = (call.audit, call.pending.take()) else {
            return;
        };
        let outcome = match result {
            Ok(reply) => {
                let (key_id, bytes_out) = summary(reply);
                Outcome {
                    key_id,
                    bytes_in,
                    bytes_out,
                    error: None,
                }
            }
            Err(e) => Outcome {
                bytes_in,
                error: Some(e),
                ..Outcome::default()
            },
        };
        audit.finish(pending, outcome);
    }

    async fn generate_data_key(
        &self,
        req: GenerateDataKeyRequest,
        caller: &Caller,
    ) -> Result<GenerateDataKeyResponse, Error> {
        let n = match req.number_of_bytes {
            0 => 32,
            n @ 1..=MAX_DATA_KEY_BYTES => n,
            n => {
                return Err(Error::InvalidRequest(format!(
                    "number_of_bytes {n} is out of range: use 1 to {MAX_DATA_KEY_BYTES} (0 means 32)"
                )));
            }
        };
        let operation = if req.without_plaintext {
            Operation::GenerateDataKeyWithoutPlaintext
        } else {
            Operation::GenerateDataKey
        };
        // Before the key is looked up: a caller without the right learns
        // nothing about the configured keys.
        self.access.policy.check_any(caller, &[operation])?;
        crate::access::refuse_reserved(&req.encryption_context)?;
        let context = EncryptionContext::from_request(
            req.encryption_context,
            self.config.limits.max_context_bytes,
        )?;
        let keyring = self.materials.keyring();
        let key_id = keyring.resolve(&req.key_id)?;
        tracing::Span::current().record("key_id", key_id);
        self.access.policy.check(caller, operation, Some(key_id))?;
        let generated = keyring
            .generate(key_id, &context, n as usize, !req.without_plaintext)
            .await?;
        let ciphertext_blob = match keyring {
            // KMS: the CiphertextBlob itself, so kms:Decrypt opens it.
            Keyring::AwsKms(_) => generated.encrypted.ciphertext,
            // Local: the self-describing ESDK encrypted-data-key structure.
            Keyring::Local(_) => {
                let mut out = Vec::new();
                generated.encrypted.write_to(&mut out)?;
                out
            }
        };
        Ok(GenerateDataKeyResponse {
            key_id: generated.key_id,
            plaintext: generated
                .plaintext
                .map(|p| p.into_exposed_vec())
                .unwrap_or_default(),
            ciphertext_blob,
        })
    }

    async fn wrap(&self, mut req: WrapRequest, caller: &Caller) -> Result<WrapResponse, Error> {
        let result = self.wrap_inner(&mut req, caller).await;
        req.plaintext.zeroize();
        result
    }

    async fn wrap_inner(
        &self,
        req: &mut WrapRequest,
        caller: &Caller,
    ) -> Result<WrapResponse, Error> {
        let limit = self.config.max_wrap_plaintext();
        if req.plaintext.len() > limit {
            return Err(Error::PayloadTooLarge {
                what: "Wrap plaintext",
                size: req.plaintext.len() as u64,
                limit: limit as u64,
                hint: "; unary Wrap keeps its reply within the 4 MiB a stock gRPC client \
                       accepts: use WrapStream (or `kms-sidecar client wrap`) for larger data",
            });
        }
        let (key_id, sealer, header) = start_envelope(
            &self.materials,
            (&self.access, caller),
            &self.config,
            &req.key_id,
            std::mem::take(&mut req.encryption_context),
            self.config.frame_length,
            Some(req.plaintext.len() as u64),
        )
        .await?;
        let envelope = sealer.seal_all(header, &req.plaintext)?;
        let reply = envelope.len() + key_id.len() + REPLY_FIELD_OVERHEAD;
        if reply > self.config.max_message_bytes {
            return Err(Error::PayloadTooLarge {
                what: "Wrap reply",
                size: reply as u64,
                limit: self.config.max_message_bytes as u64,
                hint: "; use a smaller plaintext or encryption context",
            });
        }
        Ok(WrapResponse { envelope, key_id })
    }

    async fn unwrap(&self, req: UnwrapRequest, caller: &Caller) -> Result<UnwrapResponse, Error> {
        let parsed = envelope::parse_header(&req.envelope, &self.config.limits)?
            .ok_or(Error::auth("envelope shorter than its header"))?;
        let supplied = EncryptionContext::from_pairs(req.encryption_context);
        let (opener, key_id) =
            open_header(&self.materials, (&self.access, caller), &parsed, supplied).await?;
        let body = req.envelope.get(parsed.len..).unwrap_or_default();
        let plaintext = opener.open_all(body)?;
        Ok(UnwrapResponse {
            plaintext,
            key_id,
            encryption_context: parsed.header.context.to_hash_map(),
        })
    }
}

/// The `kms_sidecar.v1.AdminService`: cache flush and counters.
#[derive(Debug, Clone)]
pub struct AdminServiceImpl {
    materials: Arc<Materials>,
    access: Arc<Access>,
}

impl AdminServiceImpl {
    /// The admin service over the same materials and access as the
    /// KeyService.
    pub fn new(materials: Arc<Materials>, access: Arc<Access>) -> Self {
        Self { materials, access }
    }

    /// Checks (and, when it fails, records) an admin call.
    fn authorize<T>(&self, request: &Request<T>, operation: &'static str) -> Result<(), Status> {
        let caller = Caller::of(request);
        let result = self.access.policy.check(&caller, Operation::Admin, None);
        if let Some(audit) = &self.access.audit {
            let pending = audit.begin(&caller, operation, None);
            audit.finish(
                pending,
                Outcome {
                    error: result.as_ref().err(),
                    ..Outcome::default()
                },
            );
        }
        result.map_err(|e| log_failure(&e, &[]))
    }
}

#[tonic::async_trait]
impl AdminService for AdminServiceImpl {
    async fn flush_cache(
        &self,
        request: Request<FlushCacheRequest>,
    ) -> Result<Response<FlushCacheResponse>, Status> {
        self.authorize(&request, "FlushCache")?;
        let flushed = self.materials.cache().map_or(0, DataKeyCache::flush);
        tracing::info!(flushed, "data-key cache flushed");
        Ok(Response::new(FlushCacheResponse {
            flushed: flushed as u64,
        }))
    }

    async fn get_cache_stats(
        &self,
        request: Request<GetCacheStatsRequest>,
    ) -> Result<Response<CacheStats>, Status> {
        self.authorize(&request, "GetCacheStats")?;
        let Some(cache) = self.materials.cache() else {
            return Ok(Response::new(CacheStats::default()));
        };
        let s = cache.stats();
        Ok(Response::new(CacheStats {
            enabled: true,
            encrypt_hits: s.encrypt_hits,
            encrypt_misses: s.encrypt_misses,
            decrypt_hits: s.decrypt_hits,
            decrypt_misses: s.decrypt_misses,
            evicted_age: s.evicted_age,
            evicted_messages: s.evicted_messages,
            evicted_bytes: s.evicted_bytes,
            evicted_capacity: s.evicted_capacity,
            evicted_flush: s.evicted_flush,
            encrypt_entries: s.encrypt_entries,
            decrypt_entries: s.decrypt_entries,
            kms_calls_saved: s.kms_calls_saved(),
        }))
    }
}

/// The audit event of a unary call in progress: written by
/// [`KeyServiceImpl::finish_audit`], or, if the call's future is dropped
/// first, on drop as abandoned (CANCELLED / CALL_ABANDONED).
struct AuditCall<'a> {
    audit: Option<&'a crate::audit::Audit>,
    pending: Option<Pending>,
    bytes_in: usize,
}

impl Drop for AuditCall<'_> {
    fn drop(&mut self) {
        if let (Some(audit), Some(pending)) = (self.audit, self.pending.take()) {
            audit.finish(
                pending,
                Outcome {
                    bytes_in: self.bytes_in,
                    error: Some(&Error::Abandoned),
                    ..Outcome::default()
                },
            );
        }
    }
}

/// Opens a parsed header for Unwrap or UnwrapStream: with caller binding,
/// the envelope must be bound to this caller; the supplied context must
/// equal the envelope's; a configured key recovers the data key; the key
/// commitment and header tag are verified. Returns the body opener and the
/// key ID.
///
/// # Errors
/// [`Error::CallerBindingMismatch`] for an envelope of another caller,
/// [`Error::DecryptAuthFailed`] for a context mismatch or any
/// authentication failure; KMS errors as classified.
pub(crate) async fn open_header(
    materials: &Materials,
    (access, caller): (&Access, &Caller),
    parsed: &envelope::ParsedHeader,
    supplied: EncryptionContext,
) -> Result<(envelope::Opener, String), Error> {
    let supplied = access.bind_for_unwrap(caller, &parsed.header.context, supplied)?;
    if !parsed.header.context.matches_ignoring_reserved(&supplied) {
        return Err(Error::auth("encryption context differs"));
    }
    let edks = allowed_edks(
        materials.keyring(),
        &access.policy,
        caller,
        &parsed.header.encrypted_data_keys,
    )?;
    let material = materials.for_decrypt(&edks, &parsed.header.context).await?;
    tracing::Span::current().record("key_id", material.key_id.as_str());
    Ok((
        envelope::Opener::new(parsed, &material.data_key)?,
        material.key_id.clone(),
    ))
}

/// The encrypted data keys the caller may have decrypted: with a policy,
/// those of configured keys it allows the caller to unwrap with. KMS is
/// never asked about the others.
///
/// # Errors
/// [`Error::PermissionDenied`] when the envelope has keys of configured
/// keys, none of them allowed.
fn allowed_edks<'a>(
    keyring: &Keyring,
    policy: &Policy,
    caller: &Caller,
    edks: &'a [envelope::EncryptedDataKey],
) -> Result<std::borrow::Cow<'a, [envelope::EncryptedDataKey]>, Error> {
    if !policy.is_enforced() {
        return Ok(std::borrow::Cow::Borrowed(edks));
    }
    let mut denied = None;
    let allowed: Vec<_> = edks
        .iter()
        .filter(|edk| match keyring.owner_of(edk) {
            Some(owner) if policy.allows(caller, Operation::Unwrap, Some(owner)) => true,
            Some(owner) => {
                denied.get_or_insert_with(|| owner.to_owned());
                false
            }
            None => false,
        })
        .cloned()
        .collect();
    match (allowed.is_empty(), denied) {
        (true, Some(key)) => Err(Error::PermissionDenied {
            caller: caller.label(),
            operation: Operation::Unwrap.name(),
            key_id: Some(key),
        }),
        _ => Ok(std::borrow::Cow::Owned(allowed)),
    }
}

/// Starts a new envelope for Wrap or WrapStream: validates the context
/// (binding the caller into it when configured), resolves the key, gets a
/// data key (cached when `plaintext_len` is known and the cache is on) and
/// derives the message key. Returns the key ID, the sealer and the
/// serialized header.
///
/// # Errors
/// Invalid context or key, and KMS errors.
pub(crate) async fn start_envelope(
    materials: &Materials,
    (access, caller): (&Access, &Caller),
    config: &ServiceConfig,
    requested_key: &str,
    encryption_context: std::collections::HashMap<String, String>,
    frame_length: u32,
    plaintext_len: Option<u64>,
) -> Result<(String, envelope::Sealer, Vec<u8>), Error> {
    access.policy.check_any(caller, &[Operation::Wrap])?;
    let encryption_context = access.bind_for_wrap(caller, encryption_context)?;
    let context =
        EncryptionContext::from_request(encryption_context, config.limits.max_context_bytes)?;
    let key_id = materials.keyring().resolve(requested_key)?.to_owned();
    tracing::Span::current().record("key_id", key_id.as_str());
    access
        .policy
        .check(caller, Operation::Wrap, Some(&key_id))?;
    let material = materials
        .for_encrypt(&key_id, &context, plaintext_len)
        .await?;
    let (sealer, header) = envelope::Sealer::start(
        &material.data_key,
        context,
        vec![material.encrypted.clone()],
        frame_length,
        &SystemRandom::new(),
    )?;
    Ok((key_id, sealer, header))
}

/// Ends a unary call: records its result on its span, counts it in the
/// metrics, logs a failure (reason and class only) and converts it.
fn reply<R>(
    method: &'static str,
    span: &tracing::Span,
    started: std::time::Instant,
    result: Result<R, Error>,
    supplied_context_keys: &[&str],
) -> Result<Response<R>, Status> {
    record_result(span, result.as_ref().map(|_| ()));
    let result = span.in_scope(|| {
        result
            .map(Response::new)
            .map_err(|e| log_failure(&e, supplied_context_keys))
    });
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    span.record("code", crate::metrics::code_name(code));
    crate::metrics::global().request(method, code, started.elapsed());
    result
}

/// Records an RPC's result class (`ok` or [`crate::error::ErrorClass::name`])
/// on its span.
pub(crate) fn record_result(span: &tracing::Span, result: Result<(), &Error>) {
    span.record(
        "result",
        result.map_or_else(|e| e.class().name(), |()| "ok"),
    );
}

/// Logs a failed call (reason and class only) and converts it.
pub(crate) fn log_failure(err: &Error, supplied_context_keys: &[&str]) -> Status {
    let status = to_status(err, supplied_context_keys);
    match err {
        Error::DecryptAuthFailed { detail } => {
            tracing::info!(code = ?status.code(), class = ?err.class(), detail, "request failed");
        }
        _ => {
            tracing::info!(code = ?status.code(), class = ?err.class(), error = %err, "request failed")
        }
    }
    status
}

#[tonic::async_trait]
impl KeyService for KeyServiceImpl {
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let span = tracing::info_span!(
            "GenerateDataKey",
            caller = %caller.label(),
            key_id = tracing::field::Empty,
            number_of_bytes = req.number_of_bytes,
            without_plaintext = req.without_plaintext,
            result = tracing::field::Empty,
            code = tracing::field::Empty
        );
        let started = std::time::Instant::now();
        let operation = if req.without_plaintext {
            "GenerateDataKeyWithoutPlaintext"
        } else {
            "GenerateDataKey"
        };
        let audit = self.begin_audit(&caller, operation, Some(&req.encryption_context), 0);
        let result = self
            .generate_data_key(req, &caller)
            .instrument(span.clone())
            .await;
        self.finish_audit(audit, &result, |r| {
            (
                Some(r.key_id.as_str()),
                r.plaintext.len() + r.ciphertext_blob.len(),
            )
        });
        reply("GenerateDataKey", &span, started, result, &[])
    }

    async fn wrap(&self, request: Request<WrapRequest>) -> Result<Response<WrapResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let span = tracing::info_span!(
            "Wrap",
            caller = %caller.label(),
            key_id = tracing::field::Empty,
            // i64: OpenTelemetry attributes carry signed integers.
            plaintext_bytes = req.plaintext.len() as i64,
            cache_hit = tracing::field::Empty,
            result = tracing::field::Empty,
            code = tracing::field::Empty
        );
        let started = std::time::Instant::now();
        let bytes_in = req.plaintext.len();
        let audit = self.begin_audit(&caller, "Wrap", Some(&req.encryption_context), bytes_in);
        let result = self.wrap(req, &caller).instrument(span.clone()).await;
        self.finish_audit(audit, &result, |r| {
            (Some(r.key_id.as_str()), r.envelope.len())
        });
        if result.is_ok() {
            crate::metrics::global().sealed(bytes_in as u64);
        }
        reply("Wrap", &span, started, result, &[])
    }

    async fn unwrap(
        &self,
        request: Request<UnwrapRequest>,
    ) -> Result<Response<UnwrapResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let mut keys: Vec<String> = req.encryption_context.keys().cloned().collect();
        keys.sort();
        let span = tracing::info_span!(
            "Unwrap",
            caller = %caller.label(),
            key_id = tracing::field::Empty,
            envelope_bytes = req.envelope.len() as i64,
            cache_hit = tracing::field::Empty,
            result = tracing::field::Empty,
            code = tracing::field::Empty
        );
        let started = std::time::Instant::now();
        let bytes_in = req.envelope.len();
        let audit = self.begin_audit(&caller, "Unwrap", Some(&req.encryption_context), bytes_in);
        let result = self.unwrap(req, &caller).instrument(span.clone()).await;
        self.finish_audit(audit, &result, |r| {
            (Some(r.key_id.as_str()), r.plaintext.len())
        });
        if let Ok(r) = &result {
            crate::metrics::global().opened(r.plaintext.len() as u64);
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        reply("Unwrap", &span, started, result, &keys)
    }

    type WrapStreamStream = ResponseStream<WrapStreamResponse>;

    async fn wrap_stream(
        &self,
        request: Request<tonic::Streaming<WrapStreamRequest>>,
    ) -> Result<Response<Self::WrapStreamStream>, Status> {
        let (caller, input) = streaming_call(request);
        let _enter = stream_span!("WrapStream", caller).entered();
        self.streams.wrap(input, caller).map(Response::new)
    }

    type UnwrapStreamStream = ResponseStream<UnwrapStreamResponse>;

    async fn unwrap_stream(
        &self,
        request: Request<tonic::Streaming<UnwrapStreamRequest>>,
    ) -> Result<Response<Self::UnwrapStreamStream>, Status> {
        let (caller, input) = streaming_call(request);
        let _enter = stream_span!("UnwrapStream", caller).entered();
        self.streams.unwrap(input, caller).map(Response::new)
    }
}

/// The span of a streaming call, with the fields the call's task fills in.
macro_rules! stream_span {
    ($name:literal, $caller:expr) => {
        tracing::info_span!(
            $name,
            caller = %$caller.label(),
            key_id = tracing::field::Empty,
            cache_hit = tracing::field::Empty,
            result = tracing::field::Empty,
            code = tracing::field::Empty
        )
    };
}
use stream_span;

/// A streaming call's caller and request messages (with the reset flag the
/// server's request layer attached).
fn streaming_call<M>(request: Request<tonic::Streaming<M>>) -> (Caller, Input<M>) {
    let caller = Caller::of(&request);
    let reset = request.extensions().get::<RequestReset>().cloned();
    (caller, Input::new(request.into_inner(), reset))
}

/// Shows the length of secret bytes, never the bytes.
struct Redacted(usize);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

// Redacted Debug for the messages that carry plaintext or data keys
// (build.rs skips the derived Debug for them).

impl std::fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("key_id", &self.key_id)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field(
                "ciphertext_blob",
                &format_args!("<{} bytes>", self.ciphertext_blob.len()),
            )
            .finish()
    }
}

impl std::fmt::Debug for WrapRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapRequest")
            .field("key_id", &self.key_id)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field(
                "encryption_context_keys",
                &self.encryption_context.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl std::fmt::Debug for WrapStreamRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapStreamRequest")
            .field("key_id", &self.key_id)
            .field("frame_length", &self.frame_length)
            .field("chunk", &Redacted(self.chunk.len()))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UnwrapStreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwrapStreamResponse")
            .field("key_id", &self.key_id)
            .field("chunk", &Redacted(self.chunk.len()))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UnwrapResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwrapResponse")
            .field("key_id", &self.key_id)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field(
                "encryption_context_keys",
                &self.encryption_context.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_carrying_messages_debug_without_bytes() {
        let req = WrapRequest {
            key_id: "k".into(),
            plaintext: b"TOP-SECRET".to_vec(),
            encryption_context: [("tenant".to_owned(), "acme-value".to_owned())].into(),
        };
        let shown = format!("{req:?}");
        assert!(shown.contains("<redacted, 10 bytes>") && shown.contains("tenant"));
        assert!(!shown.contains("TOP-SECRET") && !shown.contains("acme-value"));
        let dk = GenerateDataKeyResponse {
            key_id: "k".into(),
            plaintext: vec![0x41; 32],
            ciphertext_blob: vec![1; 8],
        };
        assert!(!format!("{dk:?}").contains("65, 65"));
    }
}
