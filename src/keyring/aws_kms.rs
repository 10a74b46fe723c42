//! The AWS KMS keyring (framework/aws-kms/aws-kms-keyring.md), in strict
//! mode: data keys come from KMS GenerateDataKey, encrypted data keys carry
//! provider ID `aws-kms` and the key ARN KMS returned (never an alias), and
//! decryption asks KMS only about the key ARNs configured here.
//!
//! Every SDK error is sorted into one [`Error`] variant by its error code or
//! failure kind; the SDK's own message goes to the log only.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kms::Client;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use zeroize::Zeroize;

use crate::envelope::{EncryptedDataKey, EncryptionContext};
use crate::error::Error;
use crate::secret::SecretBytes;

/// Provider ID of encrypted data keys made by AWS KMS.
pub const PROVIDER_ID: &str = "aws-kms";

/// One configured KMS key and every name that refers to it.
#[derive(Debug, Clone)]
struct KmsKey {
    arn: String,
    /// The ARN, the bare key ID, and the string it was configured as
    /// (which may be an alias name or alias ARN).
    names: Vec<String>,
}

/// A strict AWS KMS keyring over a fixed list of keys.
#[derive(Debug, Clone)]
pub struct AwsKmsKeyring {
    client: Client,
    keys: Vec<KmsKey>,
}

/// The HTTPS client for KMS: rustls on ring, the crate's one TLS stack.
pub fn https_client() -> aws_sdk_kms::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Whether `id` is a key ARN (not an alias ARN).
fn is_key_arn(id: &str) -> bool {
    id.starts_with("arn:") && id.contains(":key/")
}

/// The key ID part of a key ARN.
fn key_id_of_arn(arn: &str) -> Option<&str> {
    arn.rsplit_once(":key/").map(|(_, id)| id)
}

/// The Region part of an ARN (`arn:partition:service:region:...`).
pub fn region_of_arn(arn: &str) -> Option<&str> {
    arn.split(':').nth(3).filter(|r| !r.is_empty())
}

impl AwsKmsKeyring {
    /// Resolves the configured key IDs to key ARNs. Key ARNs need no call;
    /// aliases and bare key IDs are resolved once with kms:DescribeKey.
    ///
    /// # Errors
    /// The [`Error`] of the failed DescribeKey (not found, access denied,
    /// unreachable), or [`Error::InvalidRequest`] for an empty list.
    pub async fn resolve(client: Client, key_ids: &[String]) -> Result<Self, Error> {
        if key_ids.is_empty() {
            return Err(Error::InvalidRequest(
                "the aws-kms keyring needs at least one --key-id".into(),
            ));
        }
        let mut keys: Vec<KmsKey> = Vec::new();
        for configured in key_ids {
            let arn = if is_key_arn(configured) {
                configured.clone()
            } else {
                let send = client.describe_key().key_id(configured).send();
                let out = observed("kms:DescribeKey", configured, send).await?;
                out.key_metadata
                    .and_then(|m| m.arn)
                    .ok_or(Error::KmsUnexpected {
                        operation: "kms:DescribeKey",
                        code: "response without a key ARN".into(),
                    })?
            };
            let mut names = vec![arn.clone(), configured.clone()];
            if let Some(id) = key_id_of_arn(&arn) {
                names.push(id.to_owned());
            }
            names.dedup();
            match keys.iter_mut().find(|k| k.arn == arn) {
                Some(existing) => existing.names.extend(names),
                None => keys.push(KmsKey { arn, names }),
            }
        }
        Ok(Self { client, keys })
    }

    /// The configured key ARNs, the default first.
    pub fn key_arns(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.arn.as_str())
    }

    /// The ARN of the key `requested` names (ARN, key ID or configured
    /// alias); empty selects the default key.
    pub fn resolve_request(&self, requested: &str) -> Option<&str> {
        if requested.is_empty() {
            return self.keys.first().map(|k| k.arn.as_str());
        }
        self.keys
            .iter()
            .find(|k| k.names.iter().any(|n| n == requested))
            .map(|k| k.arn.as_str())
    }

    /// Calls GenerateDataKey (or GenerateDataKeyWithoutPlaintext) on `arn`.
    /// Returns the plaintext (if asked for) and the encrypted data key.
    ///
    /// # Errors
    /// The classified KMS error; [`Error::KmsUnexpected`] when KMS answers
    /// with another key than asked or a key of the wrong length.
    pub async fn generate(
        &self,
        arn: &str,
        context: &EncryptionContext,
        number_of_bytes: usize,
        with_plaintext: bool,
    ) -> Result<(Option<SecretBytes>, EncryptedDataKey), Error> {
        let n = i32::try_from(number_of_bytes)
            .map_err(|_| Error::InvalidRequest("number_of_bytes out of range".into()))?;
        let ctx = kms_context(context);
        let (key_id, blob, plaintext) = if with_plaintext {
            let op = "kms:GenerateDataKey";
            let send = self
                .client
                .generate_data_key()
                .key_id(arn)
                .number_of_bytes(n)
                .set_encryption_context(ctx)
                .send();
            let out = observed(op, arn, send).await?;
            let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
            let plain = SecretBytes::take_from(&mut plain);
            if plain.len() != number_of_bytes {
                return Err(unexpected(op, "plaintext of the wrong length"));
            }
            (out.key_id, out.ciphertext_blob, Some(plain))
        } else {
            let op = "kms:GenerateDataKeyWithoutPlaintext";
            let send = self
                .client
                .generate_data_key_without_plaintext()
                .key_id(arn)
                .number_of_bytes(n)
                .set_encryption_context(ctx)
                .send();
            let out = observed(op, arn, send).await?;
            (out.key_id, out.ciphertext_blob, None)
        };
        let key_id = key_id.ok_or(unexpected("kms:GenerateDataKey", "response without KeyId"))?;
        if key_id != arn {
            return Err(unexpected(
                "kms:GenerateDataKey",
                "response names another key",
            ));
        }
        let ciphertext = blob
            .map(Blob::into_inner)
            .filter(|b| !b.is_empty())
            .ok_or(unexpected(
                "kms:GenerateDataKey",
                "response without CiphertextBlob",
            ))?;
        Ok((
            plaintext,
            EncryptedDataKey {
                provider_id: PROVIDER_ID.into(),
                provider_info: key_id.into_bytes(),
                ciphertext,
            },
        ))
    }

    /// The configured key ARN `edk` names, if any (nothing is sent).
    pub fn owner_of(&self, edk: &EncryptedDataKey) -> Option<&str> {
        if edk.provider_id != PROVIDER_ID {
            return None;
        }
        let arn = std::str::from_utf8(&edk.provider_info).ok()?;
        self.keys
            .iter()
            .find(|k| k.arn == arn)
            .map(|k| k.arn.as_str())
    }

    /// Decrypts the first encrypted data key that belongs to a configured
    /// key ARN. Keys of other providers and other ARNs are never sent to
    /// KMS.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when no key is ours or KMS says the
    /// ciphertext or context is wrong; otherwise the first classified KMS
    /// error (access denied, disabled, unavailable, ...), so an operator
    /// problem is not hidden behind an authentication failure.
    pub async fn decrypt(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
        expected_len: usize,
    ) -> Result<(SecretBytes, String), Error> {
        let mut first_error: Option<Error> = None;
        for edk in edks.iter().filter(|e| e.provider_id == PROVIDER_ID) {
            let Ok(arn) = std::str::from_utf8(&edk.provider_info) else {
                continue;
            };
            let Some(key) = self.keys.iter().find(|k| k.arn == arn) else {
                continue;
            };
            let send = self
                .client
                .decrypt()
                .key_id(&key.arn)
                .ciphertext_blob(Blob::new(edk.ciphertext.clone()))
                .set_encryption_context(kms_context(context))
                .send();
            match observed("kms:Decrypt", &key.arn, send).await {
                Ok(out) => {
                    let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
                    if out.key_id.as_deref() != Some(key.arn.as_str())
                        || plain.len() != expected_len
                    {
                        plain.zeroize();
                        first_error.get_or_insert(Error::auth(
                            "KMS Decrypt answered for another key or length",
                        ));
                        continue;
                    }
                    return Ok((SecretBytes::take_from(&mut plain), key.arn.clone()));
                }
                Err(err) => {
                    if first_error.is_none()
                        || matches!(first_error, Some(Error::DecryptAuthFailed { .. }))
                    {
                        first_error = Some(err);
                    }
                }
            }
        }
        Err(first_error.unwrap_or(Error::auth(
            "no encrypted data key for a configured KMS key",
        )))
    }
}

fn kms_context(context: &EncryptionContext) -> Option<HashMap<String, String>> {
    (!context.is_empty()).then(|| context.to_hash_map())
}

fn unexpected(operation: &'static str, what: &str) -> Error {
    Error::KmsUnexpected {
        operation,
        code: what.to_owned(),
    }
}

/// Whether a credentials provider failure is anywhere in `err`'s chain.
fn credentials_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
        {
            return Some(match c {
                aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(
                    _,
                ) => "no credentials found in the environment, profile, web identity token or \
                     instance metadata"
                    .into(),
                aws_credential_types::provider::error::CredentialsError::ProviderTimedOut(_) => {
                    "the credentials provider timed out".into()
                }
                aws_credential_types::provider::error::CredentialsError::InvalidConfiguration(
                    _,
                ) => "the credentials configuration is invalid".into(),
                aws_credential_types::provider::error::CredentialsError::ProviderError(_) => {
                    std::error::Error::source(c).map_or_else(
                        || "the credentials provider (for example STS) returned an error".into(),
                        ToString::to_string,
                    )
                }
                _ => "the credentials provider failed".into(),
            });
        }
        cur = e.source();
    }
    None
}

/// Runs one KMS call in a `kms` span (operation, key ARN, result class),
/// counts it in the metrics, and classifies its error.
async fn observed<T, E, R>(
    operation: &'static str,
    key_id: &str,
    send: impl std::future::Future<Output = Result<T, SdkError<E, R>>>,
) -> Result<T, Error>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use tracing::Instrument;
    let span = tracing::info_span!("kms", operation, key_id, result = tracing::field::Empty);
    async move {
        let started = std::time::Instant::now();
        let result = send.await.map_err(|e| classify(e, operation, key_id));
        let class = crate::metrics::kms_result(result.as_ref().map(|_| ()));
        tracing::Span::current().record("result", class);
        crate::metrics::global().kms_call(operation, class, started.elapsed());
        result
    }
    .instrument(span)
    .await
}

/// Sorts an SDK error into the crate's error. Logs the SDK's own text.
fn classify<E, R>(err: SdkError<E, R>, operation: &'static str, key_id: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    tracing::warn!(
        operation,
        key_id,
        error = %aws_sdk_kms::error::DisplayErrorContext(&err),
        "KMS call failed"
    );
    if let Some(reason) = credentials_failure(&err) {
        return Error::CredentialsUnavailable(reason);
    }
    let key_id = key_id.to_owned();
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            match code.as_str() {
                "AccessDeniedException" => Error::KmsAccessDenied { operation, key_id },
                "DisabledException" | "KMSInvalidStateException" | "KeyUnavailableException" => {
                    Error::KmsKeyDisabled { key_id, code }
                }
                "NotFoundException" => Error::KmsKeyNotFound { key_id },
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    Error::auth("KMS rejected the ciphertext or encryption context")
                }
                "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" => {
                    Error::KmsThrottled {
                        operation,
                        retry_after: Duration::from_secs(1),
                    }
                }
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "IncompleteSignature" => Error::CredentialsUnavailable(format!(
                    "KMS rejected the request signature or token ({code})"
                )),
                "KMSInternalException"
                | "DependencyTimeoutException"
                | "InternalFailure"
                | "ServiceUnavailable" => Error::KmsUnavailable {
                    operation,
                    reason: code,
                },
                _ => Error::KmsUnexpected { operation, code },
            }
        }
        SdkError::TimeoutError(_) => Error::KmsUnavailable {
            operation,
            reason: "the call timed out".into(),
        },
        SdkError::DispatchFailure(failure) => Error::KmsUnavailable {
            operation,
            reason: if failure.is_timeout() {
                "the connection timed out".into()
            } else if failure.is_io() {
                "cannot connect to the KMS endpoint".into()
            } else {
                "the request could not be sent".into()
            },
        },
        SdkError::ResponseError(_) => Error::KmsUnavailable {
            operation,
            reason: "the response could not be read".into(),
        },
        _ => Error::KmsUnexpected {
            operation,
            code: "request construction failed".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arn_helpers() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab";
        assert!(is_key_arn(arn));
        assert!(!is_key_arn("arn:aws:kms:eu-west-1:111122223333:alias/app"));
        assert!(!is_key_arn("alias/app"));
        assert_eq!(key_id_of_arn(arn), Some("1234abcd-12ab"));
        assert_eq!(region_of_arn(arn), Some("eu-west-1"));
        assert_eq!(region_of_arn("alias/app"), None);
    }
}
