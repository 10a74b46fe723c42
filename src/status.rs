//! The one place where [`Error`] becomes a gRPC status.
//!
//! Each error maps to exactly one code and one stable `reason` in a
//! `google.rpc.ErrorInfo` detail (domain [`ERROR_DOMAIN`]); throttling also
//! carries `google.rpc.RetryInfo`. The match is exhaustive on purpose: a new
//! error variant does not compile until it has a status.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// `ErrorInfo.domain` of every status this service returns.
pub const ERROR_DOMAIN: &str = "kms-sidecar";

/// The one message every authentication failure carries, whatever the
/// cause (tampered bytes, wrong key, wrong context).
pub const DECRYPT_AUTH_FAILED_MESSAGE: &str = "the envelope could not be decrypted: it was \
     altered or truncated, it was not wrapped under a key this sidecar holds, or the supplied \
     encryption context does not equal the one it was wrapped with";

/// Builds the status for `err`. `supplied_context_keys` are the key names
/// of the caller's encryption context (never values), named in
/// authentication failures to help find a context mismatch.
pub fn to_status(err: &Error, supplied_context_keys: &[&str]) -> Status {
    let mut meta: HashMap<String, String> = HashMap::new();
    let mut retry = None;
    let (code, reason, message) = match err {
        Error::InvalidRequest(_) => (Code::InvalidArgument, "INVALID_REQUEST", err.to_string()),
        Error::KeyNotConfigured { requested, .. } => {
            meta.insert("requested_key_id".into(), requested.clone());
            (Code::NotFound, "KEY_NOT_CONFIGURED", err.to_string())
        }
        Error::PayloadTooLarge { size, limit, .. } => {
            meta.insert("size".into(), size.to_string());
            meta.insert("limit".into(), limit.to_string());
            (
                Code::ResourceExhausted,
                "PAYLOAD_TOO_LARGE",
                err.to_string(),
            )
        }
        Error::TooManyEncryptedDataKeys { count, limit } => {
            meta.insert("count".into(), count.to_string());
            meta.insert("limit".into(), limit.to_string());
            (
                Code::InvalidArgument,
                "TOO_MANY_ENCRYPTED_DATA_KEYS",
                err.to_string(),
            )
        }
        Error::UnsupportedEnvelope(_) => (
            Code::InvalidArgument,
            "UNSUPPORTED_ENVELOPE",
            err.to_string(),
        ),
        Error::DecryptAuthFailed { .. } => {
            let keys = supplied_context_keys.join(", ");
            (
                Code::InvalidArgument,
                "DECRYPT_AUTH_FAILED",
                format!(
                    "{DECRYPT_AUTH_FAILED_MESSAGE} (supplied encryption context keys: [{keys}])"
                ),
            )
        }
        Error::KmsAccessDenied { operation, key_id } => {
            meta.insert("operation".into(), (*operation).into());
            meta.insert("key_id".into(), key_id.clone());
            (
                Code::FailedPrecondition,
                "KMS_ACCESS_DENIED",
                format!("{err}; grant {operation} on this key to the sidecar's role"),
            )
        }
        Error::KmsKeyDisabled { key_id, .. } => {
            meta.insert("key_id".into(), key_id.clone());
            (
                Code::FailedPrecondition,
                "KMS_KEY_DISABLED",
                err.to_string(),
            )
        }
        Error::KmsKeyNotFound { key_id } => {
            meta.insert("key_id".into(), key_id.clone());
            (
                Code::FailedPrecondition,
                "KMS_KEY_NOT_FOUND",
                err.to_string(),
            )
        }
        Error::KmsThrottled {
            operation,
            retry_after,
        } => {
            meta.insert("operation".into(), (*operation).into());
            retry = Some(*retry_after);
            (Code::Unavailable, "KMS_THROTTLED", err.to_string())
        }
        Error::KmsUnavailable { operation, .. } => {
            meta.insert("operation".into(), (*operation).into());
            (Code::Unavailable, "KMS_UNAVAILABLE", err.to_string())
        }
        Error::CredentialsUnavailable(_) => (
            Code::Unavailable,
            "AWS_CREDENTIALS_UNAVAILABLE",
            err.to_string(),
        ),
        Error::KmsUnexpected { operation, .. } => {
            meta.insert("operation".into(), (*operation).into());
            (Code::Internal, "KMS_UNEXPECTED_ERROR", err.to_string())
        }
        Error::StreamIdle { .. } => (
            Code::DeadlineExceeded,
            "STREAM_IDLE_TIMEOUT",
            err.to_string(),
        ),
        Error::StreamNotRead { .. } => {
            (Code::ResourceExhausted, "STREAM_NOT_READ", err.to_string())
        }
        Error::StreamAborted(_) => (Code::Cancelled, "STREAM_ABORTED", err.to_string()),
        Error::TooManyStreams { limit } => {
            meta.insert("limit".into(), limit.to_string());
            retry = Some(std::time::Duration::from_secs(1));
            (Code::ResourceExhausted, "TOO_MANY_STREAMS", err.to_string())
        }
        Error::Busy { budget, .. } => {
            meta.insert("budget".into(), budget.to_string());
            retry = Some(std::time::Duration::from_millis(200));
            (Code::ResourceExhausted, "SIDECAR_BUSY", err.to_string())
        }
        Error::PermissionDenied {
            caller, operation, ..
        } => {
            meta.insert("caller".into(), caller.clone());
            meta.insert("operation".into(), (*operation).into());
            (
                Code::PermissionDenied,
                "CALLER_NOT_AUTHORIZED",
                err.to_string(),
            )
        }
        Error::CallerBindingMismatch { caller, .. } => {
            meta.insert("caller".into(), caller.clone());
            (
                Code::PermissionDenied,
                "CALLER_BINDING_MISMATCH",
                err.to_string(),
            )
        }
        Error::Abandoned => (Code::Cancelled, "CALL_ABANDONED", err.to_string()),
        Error::Internal(_) => (Code::Internal, "INTERNAL", err.to_string()),
    };
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, meta);
    if let Some(delay) = retry {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}

/// Tonic's message for a message over the decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// Recognizes tonic's own "decoded message length too large" status and
/// returns (size, limit).
pub fn tonic_too_large(status: &Status) -> Option<(u64, u64)> {
    if status.code() != Code::OutOfRange {
        return None;
    }
    let rest = status.message().strip_prefix(TONIC_TOO_LARGE)?;
    let numbers: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    match numbers.as_slice() {
        [size, limit, ..] => Some((*size, *limit)),
        _ => None,
    }
}

/// Recognizes the statuses tonic itself returns for a request it cannot
/// decode (before any handler runs) and gives the error they stand for:
/// an oversized message, a message that is not valid protobuf for the
/// method, or a unary call with no message.
pub fn tonic_request_error(status: &Status) -> Option<Error> {
    if let Some((size, limit)) = tonic_too_large(status) {
        return Some(Error::PayloadTooLarge {
            what: "request message",
            size,
            limit,
            hint: "; send less per message or raise --max-message-bytes",
        });
    }
    if status.code() != Code::Internal {
        return None;
    }
    let message = status.message();
    if message.starts_with("failed to decode Protobuf message") {
        let detail = message
            .split_once(": ")
            .map_or("", |(_, d)| d)
            .chars()
            .take(200)
            .collect::<String>();
        return Some(Error::InvalidRequest(format!(
            "the request is not a valid message for this method ({detail})"
        )));
    }
    if message == "Missing request message." {
        return Some(Error::InvalidRequest(
            "the call carried no request message".into(),
        ));
    }
    None
}

/// The error behind a failed read of a request stream.
pub fn from_transport(status: &Status) -> Error {
    if let Some(err) = tonic_request_error(status) {
        return err;
    }
    tracing::debug!(code = ?status.code(), message = status.message(), "request stream failed");
    match status.code() {
        Code::Cancelled => Error::StreamAborted("the client cancelled the call"),
        _ => Error::StreamAborted("the request stream failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &Status) -> String {
        s.get_details_error_info().unwrap().reason
    }

    #[test]
    fn auth_failures_look_the_same_whatever_the_cause() {
        let a = to_status(&Error::auth("header tag did not verify"), &["tenant"]);
        let b = to_status(
            &Error::auth("no encrypted data key for a configured KMS key"),
            &["tenant"],
        );
        assert_eq!(a.code(), Code::InvalidArgument);
        assert_eq!(a.message(), b.message());
        assert_eq!(reason(&a), "DECRYPT_AUTH_FAILED");
        assert!(!a.message().contains("header"));
        assert!(a.message().contains("[tenant]"));
    }

    #[test]
    fn throttling_carries_retry_info() {
        let s = to_status(
            &Error::KmsThrottled {
                operation: "kms:Decrypt",
                retry_after: std::time::Duration::from_millis(1500),
            },
            &[],
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(reason(&s), "KMS_THROTTLED");
        let info = s.get_details_retry_info().unwrap();
        assert_eq!(
            info.retry_delay,
            Some(std::time::Duration::from_millis(1500))
        );
    }

    #[test]
    fn payload_too_large_names_both_sizes() {
        let s = to_status(
            &Error::PayloadTooLarge {
                what: "plaintext",
                size: 4_194_305,
                limit: 4_128_768,
                hint: "",
            },
            &[],
        );
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("4194305") && s.message().contains("4128768"));
    }
}
