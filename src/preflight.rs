//! `kms-sidecar check`: the permission preflight. With the server's own
//! configuration it finds the AWS credentials (and says where they came
//! from), makes the smallest real calls that prove each KMS permission the
//! sidecar needs on each configured key, prints the results as a table and
//! a minimal IAM policy, and tells whether the sidecar can serve.

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;

use crate::config::{Config, KeyringConfig};

/// The outcome of one permission probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The call succeeded.
    Allowed,
    /// KMS refused the caller (AccessDeniedException).
    Denied,
    /// Another failure, with its error code or kind.
    Error(String),
    /// Not tried, and why.
    Skipped(&'static str),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Allowed => f.write_str("allowed"),
            Self::Denied => f.write_str("DENIED"),
            Self::Error(code) => write!(f, "error: {code}"),
            Self::Skipped(why) => write!(f, "skipped ({why})"),
        }
    }
}

fn outcome<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Outcome {
    match err {
        SdkError::ServiceError(s) => match s.err().code() {
            Some("AccessDeniedException") => Outcome::Denied,
            Some(code) => Outcome::Error(code.to_owned()),
            None => Outcome::Error("unknown service error".into()),
        },
        SdkError::TimeoutError(_) => Outcome::Error("timed out".into()),
        SdkError::DispatchFailure(d) if d.is_io() => {
            Outcome::Error("KMS endpoint unreachable".into())
        }
        SdkError::DispatchFailure(_) => {
            Outcome::Error("request not sent (credentials or network)".into())
        }
        _ => Outcome::Error("request failed".into()),
    }
}

/// The name of the provider in the default chain that supplied `creds`
/// (Environment, Profile, WebIdentityToken, EcsContainer, IMDSv2, ...).
/// `Credentials` has no getter for it; its `Debug` output (which redacts
/// the secret) is the one public place it appears.
fn provider_name(creds: &aws_credential_types::Credentials) -> String {
    let shown = format!("{creds:?}");
    shown
        .split_once("provider_name: \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or_else(|| "unknown".to_owned(), |(name, _)| name.to_owned())
}

/// The preflight report.
#[derive(Debug)]
pub struct Report {
    /// Where the credentials came from, or why there are none.
    pub credentials: Result<String, String>,
    /// (key as configured, key ARN if known, action, outcome).
    pub rows: Vec<(String, Option<String>, &'static str, Outcome)>,
    /// Whether the sidecar can serve Wrap and Unwrap with every key.
    pub can_serve: bool,
    /// A minimal IAM policy statement for the configured keys.
    pub policy: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.credentials {
            Ok(source) => writeln!(f, "AWS credentials: found ({source})")?,
            Err(why) => writeln!(f, "AWS credentials: NOT FOUND ({why})")?,
        }
        if !self.rows.is_empty() {
            writeln!(f, "\n{:<60} {:<38} result", "key", "action")?;
            for (key, arn, action, result) in &self.rows {
                let shown = arn.as_deref().unwrap_or(key);
                writeln!(f, "{shown:<60} {action:<38} {result}")?;
            }
        }
        if let Some(policy) = &self.policy {
            writeln!(
                f,
                "\nMinimal IAM policy statement for these keys:\n{policy}"
            )?;
        }
        writeln!(
            f,
            "\n{}",
            if self.can_serve {
                "OK: the sidecar can serve Wrap and Unwrap with every configured key."
            } else {
                "NOT READY: the sidecar cannot serve with this configuration (see above)."
            }
        )
    }
}

/// The IAM policy statement that allows what the sidecar does.
pub fn minimal_policy(arns: &[String], describe: bool) -> String {
    let mut actions = vec![
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:Decrypt",
    ];
    if describe {
        actions.push("kms:DescribeKey");
    }
    let quote = |items: &[&str]| items.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>();
    let resources: Vec<&str> = arns.iter().map(String::as_str).collect();
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\n  \"Sid\": \"KmsSidecar\",\n  \"Effect\": \"Allow\",\n  \"Action\": [{}],\n  \"Resource\": [{}]\n}}",
        quote(&actions).join(", "),
        quote(&resources).join(", ")
    );
    out
}

/// Runs the preflight for `config`.
pub async fn run(config: &Config) -> Report {
    let KeyringConfig::AwsKms { key_ids } = &config.keyring else {
        let can_serve = crate::build_keyring(config).await.is_ok();
        return Report {
            credentials: Ok("not needed: the local keyring makes no AWS calls".into()),
            rows: Vec::new(),
            can_serve,
            policy: None,
        };
    };
    let (client, shared) = match crate::kms_client(&config.kms, key_ids).await {
        Ok(c) => c,
        Err(e) => {
            return Report {
                credentials: Err(e),
                rows: Vec::new(),
                can_serve: false,
                policy: None,
            };
        }
    };
    let credentials = match shared.credentials_provider() {
        None => Err("no credentials provider configured".to_owned()),
        Some(provider) => match provider.provide_credentials().await {
            Ok(creds) => Ok(format!("provider: {}", provider_name(&creds))),
            Err(e) => Err(aws_sdk_kms::error::DisplayErrorContext(&e).to_string()),
        },
    };
    let mut rows = Vec::new();
    let mut arns = Vec::new();
    let mut can_serve = credentials.is_ok();
    let context: HashMap<String, String> =
        HashMap::from([("kms-sidecar".to_owned(), "preflight".to_owned())]);
    let mut needs_describe = false;
    for key in key_ids {
        let mut arn = None;
        let describe = client.describe_key().key_id(key).send().await;
        let is_arn = key.starts_with("arn:") && key.contains(":key/");
        needs_describe |= !is_arn;
        let described = match describe {
            Ok(out) => {
                arn = out.key_metadata.and_then(|m| m.arn);
                Outcome::Allowed
            }
            Err(e) => outcome(&e),
        };
        if !is_arn && described != Outcome::Allowed {
            can_serve = false; // aliases and key IDs are resolved with it at start
        }
        rows.push((key.clone(), arn.clone(), "kms:DescribeKey", described));
        let target = arn.clone().unwrap_or_else(|| key.clone());
        let generated = client
            .generate_data_key()
            .key_id(&target)
            .number_of_bytes(32)
            .set_encryption_context(Some(context.clone()))
            .send()
            .await;
        let blob = match generated {
            Ok(mut out) => {
                if let Some(mut plain) = out.plaintext.take().map(Blob::into_inner) {
                    zeroize::Zeroize::zeroize(&mut plain);
                }
                rows.push((
                    key.clone(),
                    arn.clone(),
                    "kms:GenerateDataKey",
                    Outcome::Allowed,
                ));
                out.ciphertext_blob
            }
            Err(e) => {
                can_serve = false;
                rows.push((key.clone(), arn.clone(), "kms:GenerateDataKey", outcome(&e)));
                None
            }
        };
        let without = client
            .generate_data_key_without_plaintext()
            .key_id(&target)
            .number_of_bytes(32)
            .set_encryption_context(Some(context.clone()))
            .send()
            .await;
        rows.push((
            key.clone(),
            arn.clone(),
            "kms:GenerateDataKeyWithoutPlaintext",
            without.map_or_else(|e| outcome(&e), |_| Outcome::Allowed),
        ));
        let decrypted = match blob {
            None => Outcome::Skipped("no ciphertext to decrypt"),
            Some(blob) => match client
                .decrypt()
                .key_id(&target)
                .ciphertext_blob(blob)
                .set_encryption_context(Some(context.clone()))
                .send()
                .await
            {
                Ok(mut out) => {
                    if let Some(mut plain) = out.plaintext.take().map(Blob::into_inner) {
                        zeroize::Zeroize::zeroize(&mut plain);
                    }
                    Outcome::Allowed
                }
                Err(e) => outcome(&e),
            },
        };
        if decrypted != Outcome::Allowed {
            can_serve = false;
        }
        rows.push((key.clone(), arn.clone(), "kms:Decrypt", decrypted));
        arns.push(arn.unwrap_or_else(|| key.clone()));
    }
    Report {
        credentials,
        rows,
        can_serve,
        policy: Some(minimal_policy(&arns, needs_describe)),
    }
}
