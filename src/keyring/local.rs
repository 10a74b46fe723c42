//! The local keyring: the AWS Encryption SDK raw AES keyring
//! (framework/raw-aes-keyring.md) with a 256-bit wrapping key kept in a
//! file, so the sidecar runs with no cloud account at all.
//!
//! Wrapped data key: provider ID = key namespace; provider info = key name
//! || tag length in bits (u32, 128) || IV length (u32, 12) || IV; ciphertext
//! = AES-256-GCM(wrapping key, IV, data key, AAD = serialized encryption
//! context) || tag. IVs are random, so one wrapping key should wrap fewer
//! than 2^32 data keys (NIST SP 800-38D); rotate the key file long before.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use zeroize::Zeroize;

use crate::envelope::{EncryptedDataKey, EncryptionContext};
use crate::error::Error;
use crate::secret::{AES_256_KEY_LEN, SecretBytes, WrappingKey};

const TAG_BITS: u32 = 128;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A raw AES keyring with one wrapping key.
pub struct LocalKeyring {
    namespace: String,
    name: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What [`load_or_create_key_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFileOrigin {
    /// The file existed and was read.
    Loaded,
    /// The file did not exist; a new key was written.
    Created,
}

/// Reads the 32-byte wrapping key from `path`, or creates the file with a
/// fresh random key (mode 0600, parent directories 0700) if it does not
/// exist. Creation is atomic and never overwrites: two sidecars starting at
/// once end up with the same key.
///
/// # Errors
/// A one-line, actionable message for unreadable files, files of the wrong
/// size, and directories that cannot be created.
pub fn load_or_create_key_file(
    path: &Path,
    rng: &dyn SecureRandom,
) -> Result<(WrappingKey, KeyFileOrigin), String> {
    match fs::read(path) {
        Ok(mut bytes) => {
            let len = bytes.len();
            let key = WrappingKey::take_from(&mut bytes).ok_or_else(|| {
                format!(
                    "local key file {} holds {len} bytes; it must hold exactly {AES_256_KEY_LEN} \
                     raw bytes (an AES-256 key)",
                    path.display()
                )
            })?;
            if let Ok(meta) = fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "local key file is readable by group or others; chmod 600 it"
                );
            }
            Ok((key, KeyFileOrigin::Loaded))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_key_file(path, rng).map(|k| (k, KeyFileOrigin::Created))
        }
        Err(e) => Err(format!(
            "cannot read local key file {}: {e}",
            path.display()
        )),
    }
}

fn create_key_file(path: &Path, rng: &dyn SecureRandom) -> Result<WrappingKey, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            format!(
                "cannot create directory {} for the local key: {e}",
                dir.display()
            )
        })?;
    let mut bytes = [0u8; AES_256_KEY_LEN];
    rng.fill(&mut bytes)
        .map_err(|_| "system random generator failed".to_owned())?;
    // Write a private temporary file, then link it into place: the final
    // name appears complete or not at all, and an existing key is never
    // replaced.
    let tmp = temp_name(path, rng);
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => WrappingKey::take_from(&mut bytes)
            .ok_or_else(|| "internal error: key length".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bytes.zeroize();
            // Another process created it first: use theirs.
            load_or_create_key_file(path, rng).map(|(k, _)| k)
        }
        Err(e) => {
            bytes.zeroize();
            Err(format!(
                "cannot create local key file {}: {e}",
                path.display()
            ))
        }
    }
}

fn temp_name(path: &Path, rng: &dyn SecureRandom) -> PathBuf {
    let mut suffix = [0u8; 8];
    let _ = rng.fill(&mut suffix);
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{hex}"));
    path.with_file_name(name)
}

impl LocalKeyring {
    /// Builds the keyring from its namespace, key name and wrapping key.
    ///
    /// # Errors
    /// [`Error::Internal`] if ring refuses the key (it never does for 32
    /// bytes).
    pub fn new(namespace: String, name: String, key: &WrappingKey) -> Result<Self, Error> {
        let unbound = UnboundKey::new(&aead::AES_256_GCM, key.expose())
            .map_err(|_| Error::Internal("AES-256 wrapping key rejected"))?;
        Ok(Self {
            namespace,
            name,
            key: LessSafeKey::new(unbound),
        })
    }

    /// The key's name, which is also its key ID in the API.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The provider namespace (EDK provider ID).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Wraps `data_key` bytes for `context` under a fresh random IV.
    ///
    /// # Errors
    /// [`Error::Internal`] if the random generator fails.
    #[allow(
        clippy::disallowed_methods,
        reason = "a fresh random 96-bit IV per wrap (raw-aes-keyring.md); bound documented above"
    )]
    pub fn wrap(
        &self,
        data_key: &[u8],
        context: &EncryptionContext,
        rng: &dyn SecureRandom,
    ) -> Result<EncryptedDataKey, Error> {
        let mut iv = [0u8; IV_LEN];
        rng.fill(&mut iv)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        let mut ciphertext = Vec::with_capacity(data_key.len() + TAG_LEN);
        ciphertext.extend_from_slice(data_key);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(context.serialize()),
                &mut ciphertext,
            )
            .map_err(|_| Error::Internal("AES-GCM seal failed"))?;
        ciphertext.extend_from_slice(tag.as_ref());
        let mut provider_info = Vec::with_capacity(self.name.len() + 8 + IV_LEN);
        provider_info.extend_from_slice(self.name.as_bytes());
        provider_info.extend_from_slice(&TAG_BITS.to_be_bytes());
        provider_info.extend_from_slice(&(IV_LEN as u32).to_be_bytes());
        provider_info.extend_from_slice(&iv);
        Ok(EncryptedDataKey {
            provider_id: self.namespace.clone(),
            provider_info,
            ciphertext,
        })
    }

    /// Unwraps `edk` if it was made by this keyring; `Ok(None)` if it
    /// belongs to another keyring.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] if it claims to be ours but does not
    /// authenticate (tampered, or another context).
    #[allow(
        clippy::disallowed_methods,
        reason = "decryption takes the IV stored with the wrapped key"
    )]
    pub fn unwrap(
        &self,
        edk: &EncryptedDataKey,
        context: &EncryptionContext,
    ) -> Result<Option<SecretBytes>, Error> {
        if edk.provider_id != self.namespace {
            return Ok(None);
        }
        let info = &edk.provider_info;
        let Some((name, rest)) = info.split_at_checked(self.name.len()) else {
            return Ok(None);
        };
        if name != self.name.as_bytes() || rest.len() != 8 + IV_LEN {
            return Ok(None);
        }
        let (lengths, iv) = rest.split_at(8);
        if lengths.get(..4) != Some(&TAG_BITS.to_be_bytes()[..])
            || lengths.get(4..) != Some(&(IV_LEN as u32).to_be_bytes()[..])
        {
            return Err(Error::auth(
                "raw AES provider info with other tag or IV length",
            ));
        }
        let iv = <[u8; IV_LEN]>::try_from(iv).map_err(|_| Error::auth("raw AES IV length"))?;
        let mut buf = edk.ciphertext.clone();
        let opened = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(iv),
                Aad::from(context.serialize()),
                &mut buf,
            )
            .map(|plain| plain.len());
        match opened {
            Ok(len) => {
                buf.truncate(len);
                Ok(Some(SecretBytes::take_from(&mut buf)))
            }
            Err(_) => {
                buf.zeroize();
                Err(Error::auth("raw AES wrapped key did not authenticate"))
            }
        }
    }

    /// Whether `edk` claims to be wrapped by this key (provider and name
    /// match; nothing is decrypted).
    pub fn owns(&self, edk: &EncryptedDataKey) -> bool {
        edk.provider_id == self.namespace
            && edk
                .provider_info
                .split_at_checked(self.name.len())
                .is_some_and(|(name, rest)| {
                    name == self.name.as_bytes() && rest.len() == 8 + IV_LEN
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn keyring(byte: u8) -> LocalKeyring {
        let key = WrappingKey::take_from(&mut [byte; 32]).unwrap();
        LocalKeyring::new("ns".into(), "name".into(), &key).unwrap()
    }

    #[test]
    fn wrap_unwrap_binds_context() {
        let rng = SystemRandom::new();
        let ctx = EncryptionContext::from_pairs([("a".to_owned(), "b".to_owned())]);
        let edk = keyring(1).wrap(&[9; 32], &ctx, &rng).unwrap();
        assert_eq!(edk.provider_info.len(), 4 + 8 + 12);
        let got = keyring(1).unwrap(&edk, &ctx).unwrap().unwrap();
        assert_eq!(got.expose(), &[9; 32]);
        assert!(
            keyring(1)
                .unwrap(&edk, &EncryptionContext::default())
                .is_err()
        );
        assert!(keyring(2).unwrap(&edk, &ctx).is_err());
        let other = LocalKeyring::new(
            "other".into(),
            "name".into(),
            &WrappingKey::take_from(&mut [1; 32]).unwrap(),
        )
        .unwrap();
        assert!(other.unwrap(&edk, &ctx).unwrap().is_none());
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("local.key");
        let rng = SystemRandom::new();
        let (k1, o1) = load_or_create_key_file(&path, &rng).unwrap();
        assert_eq!(o1, KeyFileOrigin::Created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, o2) = load_or_create_key_file(&path, &rng).unwrap();
        assert_eq!(o2, KeyFileOrigin::Loaded);
        assert_eq!(k1.expose(), k2.expose());
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp files left"
        );

        fs::write(&path, b"short").unwrap();
        let err = load_or_create_key_file(&path, &rng).unwrap_err();
        assert!(err.contains("holds 5 bytes"), "{err}");
    }
}
