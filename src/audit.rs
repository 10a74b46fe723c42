//! The audit trail: one JSON line per key use (GenerateDataKey, Wrap,
//! Unwrap and their streams, admin calls), to stdout, stderr or a file.
//!
//! An event holds the time, the caller, the operation, the key ARN, the
//! encryption-context *keys* with each value only as a keyed hash
//! (HMAC-SHA256, hex, under `--audit-hash-key-file` or a random key per
//! process), the sizes, the result (gRPC code and reason) and the
//! duration. Never a data key, plaintext, a context value or a credential.
//!
//! ```json
//! {"time":"2026-12-03T20:14:00.123Z","caller":"uid:1000","operation":"Wrap",
//!  "key_id":"arn:aws:kms:…","context":{"tenant":"hmac-sha256:3f1c…"},
//!  "bytes_in":1024,"bytes_out":1321,"code":"OK","reason":"","duration_ms":0.41}
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use ring::hmac;

use crate::access::Caller;
use crate::error::Error;

/// Where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// Not recorded.
    Off,
    /// Standard output (logs go to standard error).
    Stdout,
    /// Standard error, between the logs.
    Stderr,
    /// Appended to this file (created with mode 0600).
    File(std::path::PathBuf),
}

/// The audit trail writer.
pub struct Audit {
    out: Mutex<Box<dyn Write + Send>>,
    hash_key: hmac::Key,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit(<sink>, hash key <redacted>)")
    }
}

impl Audit {
    /// Opens `sink`; context values are hashed under the 32 bytes of
    /// `hash_key_file`, or a random key for this process when it is `None`.
    ///
    /// # Errors
    /// A one-line message (unwritable file, bad key file).
    pub fn open(sink: &AuditSink, hash_key_file: Option<&Path>) -> Result<Option<Self>, String> {
        let out: Box<dyn Write + Send> = match sink {
            AuditSink::Off => return Ok(None),
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::Stderr => Box::new(std::io::stderr()),
            AuditSink::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| format!("cannot open audit log {}: {e}", path.display()))?,
                )
            }
        };
        let rng = ring::rand::SystemRandom::new();
        let hash_key = match hash_key_file {
            Some(path) => {
                let mut bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read audit hash key {}: {e}", path.display()))?;
                if bytes.len() < 32 {
                    zeroize::Zeroize::zeroize(&mut bytes);
                    return Err(format!(
                        "audit hash key {} must hold at least 32 bytes",
                        path.display()
                    ));
                }
                let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
                zeroize::Zeroize::zeroize(&mut bytes);
                key
            }
            None => hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .map_err(|_| "system random generator failed".to_owned())?,
        };
        Ok(Some(Self {
            out: Mutex::new(out),
            hash_key,
        }))
    }

    /// Starts an event for `operation` by `caller` (the context's values are
    /// hashed now; nothing is kept of them).
    pub fn begin(
        &self,
        caller: &Caller,
        operation: &'static str,
        context: Option<&HashMap<String, String>>,
    ) -> Pending {
        let mut hashed: Vec<(String, String)> = context
            .map(|c| c.iter().map(|(k, v)| (k.clone(), self.hash(v))).collect())
            .unwrap_or_default();
        hashed.sort();
        Pending {
            started: Instant::now(),
            time: SystemTime::now(),
            caller: caller.clone(),
            operation,
            context: hashed,
        }
    }

    fn hash(&self, value: &str) -> String {
        let tag = hmac::sign(&self.hash_key, value.as_bytes());
        let mut out = String::from("hmac-sha256:");
        for b in tag.as_ref() {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Writes the event `pending` began, with its outcome.
    pub fn finish(&self, pending: Pending, outcome: Outcome<'_>) {
        let mut line = String::with_capacity(256);
        line.push('{');
        field(&mut line, "time", &timestamp(pending.time));
        line.push(',');
        field(&mut line, "caller", &pending.caller.label());
        if let Some(peer) = pending.caller.peer() {
            line.push(',');
            field(&mut line, "peer", peer);
        }
        if let Caller::Unix { gid, .. } = &pending.caller {
            let _ = write!(line, ",\"gid\":{gid}");
        }
        line.push(',');
        field(&mut line, "operation", pending.operation);
        line.push(',');
        line.push_str("\"key_id\":");
        match outcome.key_id {
            Some(k) => json_string(&mut line, k),
            None => line.push_str("null"),
        }
        line.push_str(",\"context\":{");
        for (i, (k, v)) in pending.context.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            field(&mut line, k, v);
        }
        line.push('}');
        let _ = write!(line, ",\"bytes_in\":{}", outcome.bytes_in);
        let _ = write!(line, ",\"bytes_out\":{}", outcome.bytes_out);
        let (code, reason) = match outcome.error {
            None => ("OK".to_owned(), String::new()),
            Some(err) => {
                use tonic_types::StatusExt;
                let status = crate::status::to_status(err, &[]);
                let reason = status
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default();
                (crate::metrics::code_name(status.code()).to_owned(), reason)
            }
        };
        line.push(',');
        field(&mut line, "code", &code);
        line.push(',');
        field(&mut line, "reason", &reason);
        let _ = writeln!(
            line,
            ",\"duration_ms\":{:.3}}}",
            pending.started.elapsed().as_secs_f64() * 1e3
        );
        let Ok(mut out) = self.out.lock() else {
            return;
        };
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            tracing::error!("cannot write the audit log");
        }
    }
}

/// An event in progress.
#[derive(Debug)]
pub struct Pending {
    started: Instant,
    time: SystemTime,
    caller: Caller,
    operation: &'static str,
    context: Vec<(String, String)>,
}

/// How a call ended, for its audit event.
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    /// The key used (the ARN KMS returned, or the local key's name).
    pub key_id: Option<&'a str>,
    /// Bytes received from the caller (plaintext or envelope).
    pub bytes_in: usize,
    /// Bytes returned to the caller.
    pub bytes_out: usize,
    /// The error, if the call failed.
    pub error: Option<&'a Error>,
}

fn field(line: &mut String, name: &str, value: &str) {
    json_string(line, name);
    line.push(':');
    json_string(line, value);
}

/// Appends `s` as a JSON string (RFC 8259 escaping).
fn json_string(line: &mut String, s: &str) {
    line.push('"');
    for c in s.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", u32::from(c));
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

fn timestamp(t: SystemTime) -> String {
    aws_sdk_kms::primitives::DateTime::from(t)
        .fmt(aws_sdk_kms::primitives::DateTimeFormat::DateTime)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    }
}
