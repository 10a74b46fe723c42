//! The crate's one error type, named by cause, and its coarse classes.
//!
//! Messages of variants that reach callers are written for them: they name
//! sizes, limits, key IDs and context *key names*, never key material,
//! plaintext or context values. Upstream error text (AWS SDK messages) goes
//! to the log only; see [`crate::status`] for the mapping to gRPC.

use std::time::Duration;

/// Everything that can go wrong while serving a request. `Clone` so that
/// callers sharing one KMS call (the cache's single flight) share its
/// error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A request field is out of range or malformed (caller error).
    #[error("{0}")]
    InvalidRequest(String),

    /// The request names a key that is not one of the configured keys.
    #[error("key {requested:?} is not configured in this sidecar; configured keys: {configured}")]
    KeyNotConfigured {
        /// What the caller asked for.
        requested: String,
        /// The configured key IDs, comma separated.
        configured: String,
    },

    /// A request or a reply would exceed a size limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes{hint}")]
    PayloadTooLarge {
        /// What is too large ("plaintext", "request", ...).
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
        /// A hint on what to do instead, starting with "; " (may be empty).
        hint: &'static str,
    },

    /// The envelope holds more encrypted data keys than allowed.
    #[error("envelope holds {count} encrypted data keys, over the limit of {limit}")]
    TooManyEncryptedDataKeys {
        /// Keys in the envelope.
        count: usize,
        /// Configured limit.
        limit: usize,
    },

    /// The envelope is well formed but of a kind this sidecar does not open
    /// (another message version or algorithm suite, or not an ESDK message).
    #[error("{0}")]
    UnsupportedEnvelope(String),

    /// Authentication failed: tampered or truncated bytes, a data key no
    /// configured key can decrypt, or a different encryption context. The
    /// cause is deliberately not recorded in the value; callers all see the
    /// same status. The detail, for the log only, is `detail`.
    #[error("envelope authentication failed")]
    DecryptAuthFailed {
        /// Why, for debug logs only (never sent to the caller).
        detail: &'static str,
    },

    /// KMS refused the sidecar's identity for this key and operation.
    #[error("KMS denied {operation} on key {key_id} to the sidecar's AWS identity")]
    KmsAccessDenied {
        /// The KMS action, e.g. "kms:Decrypt".
        operation: &'static str,
        /// The key as named in the call.
        key_id: String,
    },

    /// The KMS key is disabled or pending deletion / import.
    #[error("KMS key {key_id} is disabled or not in a usable state ({code})")]
    KmsKeyDisabled {
        /// The key.
        key_id: String,
        /// The KMS error code.
        code: String,
    },

    /// KMS does not know the key (wrong ID, alias, account or Region).
    #[error("KMS key {key_id} was not found (check the key ID, alias, account and Region)")]
    KmsKeyNotFound {
        /// The key as named in the call.
        key_id: String,
    },

    /// KMS throttled the request after the SDK's retries.
    #[error("KMS is throttling requests ({operation}); retry after a short delay")]
    KmsThrottled {
        /// The KMS action.
        operation: &'static str,
        /// Suggested delay before retrying.
        retry_after: Duration,
    },

    /// KMS could not be reached, timed out or answered with a server error.
    #[error("KMS is unavailable for {operation}: {reason}")]
    KmsUnavailable {
        /// The KMS action.
        operation: &'static str,
        /// A short, safe description (error kind or code, no upstream text).
        reason: String,
    },

    /// AWS credentials could not be obtained or refreshed.
    #[error("AWS credentials are unavailable: {0}")]
    CredentialsUnavailable(String),

    /// KMS answered with something the sidecar does not expect.
    #[error("KMS returned an unexpected error for {operation} ({code})")]
    KmsUnexpected {
        /// The KMS action.
        operation: &'static str,
        /// The error code.
        code: String,
    },

    /// No request message arrived within the stream's idle timeout.
    #[error(
        "no request message arrived for {waited:?}; send chunks more often or raise --stream-idle-timeout"
    )]
    StreamIdle {
        /// How long the server waited.
        waited: Duration,
    },

    /// The client did not read the response stream while output waited.
    #[error(
        "the response stream was not read for {waited:?} while the server held its buffer of \
         {pending} bytes; read responses while sending requests"
    )]
    StreamNotRead {
        /// How long the server waited.
        waited: Duration,
        /// The per-call output buffer bound, in bytes.
        pending: usize,
    },

    /// The request stream ended abnormally (cancelled, reset).
    #[error("the request stream was aborted: {0}")]
    StreamAborted(&'static str),

    /// Every streaming slot is in use.
    #[error(
        "{limit} streaming calls are already in progress (--max-concurrent-streams); retry shortly"
    )]
    TooManyStreams {
        /// The configured limit.
        limit: usize,
    },

    /// Unary calls in progress already hold the in-flight byte budget.
    #[error(
        "the sidecar is busy: {in_flight} bytes of unary requests are in progress and this one \
         needs {needed} more, over the budget of {budget} bytes (--max-inflight-bytes); retry shortly"
    )]
    Busy {
        /// Bytes held by calls in progress.
        in_flight: u64,
        /// Bytes this call needs.
        needed: u64,
        /// The configured budget.
        budget: u64,
    },

    /// The authorization policy does not allow this caller this operation
    /// (on this key).
    #[error(
        "{caller} may not {operation}{} under this sidecar's policy (--policy-file)",
        key_id.as_deref().map(|k| format!(" with key {k}")).unwrap_or_default()
    )]
    PermissionDenied {
        /// The caller's identity, as policies name it.
        caller: String,
        /// The operation, as policies name it.
        operation: &'static str,
        /// The key, when the operation uses one.
        key_id: Option<String>,
    },

    /// Caller binding (`--bind-caller`) is on and the envelope is bound to
    /// another caller identity, or to none.
    #[error(
        "{caller} may not unwrap this envelope: {}",
        if *bound {
            "it is bound to another caller identity (--bind-caller)"
        } else {
            "it is not bound to a caller identity, and with --bind-caller only envelopes \
             wrapped by the same identity open"
        }
    )]
    CallerBindingMismatch {
        /// The caller's identity, as policies name it.
        caller: String,
        /// Whether the envelope names a (different) identity at all.
        bound: bool,
    },

    /// The call ended before it finished: the client cancelled it, or its
    /// deadline (or `--request-timeout`) passed. Only recorded (audit
    /// trail): nobody is left to receive it.
    #[error(
        "the call was abandoned before it finished: the client cancelled it or a deadline passed"
    )]
    Abandoned,

    /// A bug or an environment failure (random generator, I/O) in the sidecar.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Coarse classes of [`Error`], for metrics, logs and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request was wrong; retrying it unchanged fails again.
    Caller,
    /// The data did not authenticate.
    DataCorrupt,
    /// The key cannot be used (permissions, state, existence).
    KeyUnusable,
    /// KMS is rate limiting.
    Throttled,
    /// KMS or credentials are unavailable; retry later.
    BackendUnavailable,
    /// A fault in the sidecar.
    Internal,
}

impl ErrorClass {
    /// The stable name of the class: the `result` field of RPC spans.
    pub fn name(self) -> &'static str {
        match self {
            Self::Caller => "caller_error",
            Self::DataCorrupt => "data_corrupt",
            Self::KeyUnusable => "key_unusable",
            Self::Throttled => "throttled",
            Self::BackendUnavailable => "backend_unavailable",
            Self::Internal => "internal",
        }
    }
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidRequest(_)
            | Self::KeyNotConfigured { .. }
            | Self::PayloadTooLarge { .. }
            | Self::TooManyEncryptedDataKeys { .. }
            | Self::UnsupportedEnvelope(_)
            | Self::StreamIdle { .. }
            | Self::StreamNotRead { .. }
            | Self::StreamAborted(_)
            | Self::PermissionDenied { .. }
            | Self::CallerBindingMismatch { .. }
            | Self::Abandoned => ErrorClass::Caller,
            Self::DecryptAuthFailed { .. } => ErrorClass::DataCorrupt,
            Self::KmsAccessDenied { .. }
            | Self::KmsKeyDisabled { .. }
            | Self::KmsKeyNotFound { .. } => ErrorClass::KeyUnusable,
            Self::KmsThrottled { .. } | Self::TooManyStreams { .. } | Self::Busy { .. } => {
                ErrorClass::Throttled
            }
            Self::KmsUnavailable { .. } | Self::CredentialsUnavailable(_) => {
                ErrorClass::BackendUnavailable
            }
            Self::KmsUnexpected { .. } | Self::Internal(_) => ErrorClass::Internal,
        }
    }

    /// Shorthand for an authentication failure with a log-only detail.
    pub(crate) fn auth(detail: &'static str) -> Self {
        Self::DecryptAuthFailed { detail }
    }
}
