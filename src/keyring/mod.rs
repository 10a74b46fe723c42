//! Where data keys come from: AWS KMS ([`aws_kms`]) or a local wrapping key
//! ([`local`]). The service layer sees one [`Keyring`] and never knows which.

pub mod aws_kms;
pub mod kms_client;
pub mod local;

use ring::rand::SystemRandom;

use crate::envelope::{EncryptedDataKey, EncryptionContext};
use crate::error::Error;
use crate::secret::{AES_256_KEY_LEN, DataKey, SecretBytes};

pub use aws_kms::AwsKmsKeyring;
pub use local::LocalKeyring;

/// A data key freshly generated under one wrapping key.
#[derive(Debug)]
pub struct GeneratedDataKey {
    /// The wrapping key: a KMS key ARN, or the local key's name.
    pub key_id: String,
    /// The plaintext, unless it was not asked for.
    pub plaintext: Option<SecretBytes>,
    /// The data key encrypted under `key_id`.
    pub encrypted: EncryptedDataKey,
}

/// The configured source of data keys.
#[derive(Debug)]
pub enum Keyring {
    /// The ESDK raw AES keyring with a local wrapping key.
    Local(Box<LocalKeyring>),
    /// The ESDK AWS KMS keyring, strict mode.
    AwsKms(AwsKmsKeyring),
}

impl Keyring {
    /// The configured key IDs, the default first (KMS key ARNs, or the local
    /// key's name).
    pub fn key_ids(&self) -> Vec<&str> {
        match self {
            Self::Local(k) => vec![k.name()],
            Self::AwsKms(k) => k.key_arns().collect(),
        }
    }

    /// The canonical ID of the key `requested` names; empty = default key.
    ///
    /// # Errors
    /// [`Error::KeyNotConfigured`] for any key that is not configured.
    pub fn resolve(&self, requested: &str) -> Result<&str, Error> {
        let found = match self {
            Self::Local(k) => (requested.is_empty() || requested == k.name()).then(|| k.name()),
            Self::AwsKms(k) => k.resolve_request(requested),
        };
        found.ok_or_else(|| Error::KeyNotConfigured {
            requested: requested.to_owned(),
            configured: self.key_ids().join(", "),
        })
    }

    /// The configured key that `edk` says wraps it (by provider ID and
    /// info; nothing is decrypted), if any.
    pub fn owner_of(&self, edk: &EncryptedDataKey) -> Option<&str> {
        match self {
            Self::Local(k) => k.owns(edk).then(|| k.name()),
            Self::AwsKms(k) => k.owner_of(edk),
        }
    }

    /// Generates a data key of `number_of_bytes` under `key_id` (already
    /// resolved), bound to `context`.
    ///
    /// # Errors
    /// KMS errors, or [`Error::Internal`] if the random generator fails.
    pub async fn generate(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        number_of_bytes: usize,
        with_plaintext: bool,
    ) -> Result<GeneratedDataKey, Error> {
        match self {
            Self::Local(k) => {
                let rng = SystemRandom::new();
                let mut bytes = vec![0u8; number_of_bytes];
                ring::rand::SecureRandom::fill(&rng, &mut bytes)
                    .map_err(|_| Error::Internal("system random generator failed"))?;
                let plaintext = SecretBytes::take_from(&mut bytes);
                let encrypted = k.wrap(plaintext.expose(), context, &rng)?;
                Ok(GeneratedDataKey {
                    key_id: k.name().to_owned(),
                    plaintext: with_plaintext.then_some(plaintext),
                    encrypted,
                })
            }
            Self::AwsKms(k) => {
                let (plaintext, encrypted) = k
                    .generate(key_id, context, number_of_bytes, with_plaintext)
                    .await?;
                Ok(GeneratedDataKey {
                    key_id: key_id.to_owned(),
                    plaintext,
                    encrypted,
                })
            }
        }
    }

    /// Generates the 32-byte data key of a new message.
    ///
    /// # Errors
    /// As [`Self::generate`].
    pub async fn generate_message_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
    ) -> Result<(DataKey, EncryptedDataKey), Error> {
        let generated = self
            .generate(key_id, context, AES_256_KEY_LEN, true)
            .await?;
        let data_key = generated
            .plaintext
            .and_then(|p| DataKey::take_from(&mut p.into_exposed_vec()))
            .ok_or(Error::Internal("generated data key of the wrong length"))?;
        Ok((data_key, generated.encrypted))
    }

    /// Recovers a message's 32-byte data key from its encrypted data keys.
    /// Returns the key and the ID of the wrapping key that opened it.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when no configured key opens any of
    /// them; KMS errors as classified.
    pub async fn decrypt_message_key(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
    ) -> Result<(DataKey, String), Error> {
        let (secret, key_id) = self.decrypt(edks, context, AES_256_KEY_LEN).await?;
        let data_key = DataKey::take_from(&mut secret.into_exposed_vec())
            .ok_or(Error::auth("decrypted data key of the wrong length"))?;
        Ok((data_key, key_id))
    }

    /// The deep health check: a fresh data key from the default key, and
    /// its decryption, as Wrap and Unwrap would do them.
    ///
    /// # Errors
    /// The error either step returned.
    pub async fn probe(&self) -> Result<(), Error> {
        let key_id = self.resolve("")?.to_owned();
        let context =
            EncryptionContext::from_pairs([("kms-sidecar".to_owned(), "health-probe".to_owned())]);
        let (_data_key, edk) = self.generate_message_key(&key_id, &context).await?;
        self.decrypt_message_key(&[edk], &context).await.map(|_| ())
    }

    async fn decrypt(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
        expected_len: usize,
    ) -> Result<(SecretBytes, String), Error> {
        match self {
            Self::Local(k) => {
                let mut failure = None;
                for edk in edks {
                    match k.unwrap(edk, context) {
                        Ok(Some(secret)) if secret.len() == expected_len => {
                            return Ok((secret, k.name().to_owned()));
                        }
                        Ok(Some(_)) => failure = Some(Error::auth("unwrapped key of wrong length")),
                        Ok(None) => {}
                        Err(e) => failure = Some(e),
                    }
                }
                Err(failure.unwrap_or(Error::auth("no encrypted data key for the local key")))
            }
            Self::AwsKms(k) => k.decrypt(edks, context, expected_len).await,
        }
    }
}
