//! The message header, version 2 (data-format/message-header.md).
//!
//! Layout: version (0x02) | suite ID (u16) | message ID (32) | AAD length
//! (u16) | AAD (serialized encryption context) | EDK count (u16) | EDKs |
//! content type (u8) | frame length (u32) | suite data (32-byte commitment)
//! | header authentication tag (16; the v2 header IV is implicit zeros).

use crate::envelope::EnvelopeLimits;
use crate::envelope::context::EncryptionContext;
use crate::envelope::suite::{COMMITMENT_LEN, MESSAGE_ID_LEN, SUITE_ID, TAG_LEN};
use crate::error::Error;

/// Message format version 2.
const VERSION_2: u8 = 0x02;
/// Message format version 1 (recognized only to refuse it clearly).
const VERSION_1: u8 = 0x01;

/// A data key encrypted by one wrapping key; public, stored in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    /// Key provider ID: `aws-kms`, or the raw AES keyring's namespace.
    pub provider_id: String,
    /// Key provider information: the KMS key ARN, or the raw AES keyring's
    /// key name, tag length, IV length and IV.
    pub provider_info: Vec<u8>,
    /// The encrypted data key.
    pub ciphertext: Vec<u8>,
}

impl EncryptedDataKey {
    fn serialized_len(&self) -> usize {
        6 + self.provider_id.len() + self.provider_info.len() + self.ciphertext.len()
    }

    /// Appends the serialized structure (three u16-length-prefixed fields).
    ///
    /// # Errors
    /// [`Error::Internal`] when a field is over 65,535 bytes.
    pub fn write_to(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        for field in [
            self.provider_id.as_bytes(),
            &self.provider_info,
            &self.ciphertext,
        ] {
            let len = u16::try_from(field.len())
                .map_err(|_| Error::Internal("encrypted data key field over 65,535 bytes"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        Ok(())
    }

    /// Parses one serialized structure that must span all of `bytes`.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when malformed.
    pub fn parse_exact(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let edk = read_edk(&mut r).map_err(|e| e.into_error("encrypted data key truncated"))?;
        if r.pos != bytes.len() {
            return Err(Error::auth("trailing bytes after encrypted data key"));
        }
        Ok(edk)
    }
}

/// How the body is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// One sealed block (content type 0x01).
    NonFramed,
    /// Frames of `frame_length` plaintext bytes (content type 0x02).
    Framed {
        /// Plaintext bytes per regular frame, at least 1.
        frame_length: u32,
    },
}

/// A parsed or to-be-written header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Random per message; salt of the key derivation.
    pub message_id: [u8; MESSAGE_ID_LEN],
    /// The context bound to the message.
    pub context: EncryptionContext,
    /// At least one encrypted data key.
    pub encrypted_data_keys: Vec<EncryptedDataKey>,
    /// Body layout.
    pub content_type: ContentType,
    /// Key commitment (suite data).
    pub commitment: [u8; COMMITMENT_LEN],
}

/// A header read from a message, with the bytes its tag authenticates.
#[derive(Debug)]
pub struct ParsedHeader {
    /// The fields.
    pub header: Header,
    /// The serialized header body (everything before the tag).
    pub body: Vec<u8>,
    /// The header authentication tag.
    pub tag: [u8; TAG_LEN],
    /// Bytes of the message taken by the header, tag included.
    pub len: usize,
}

impl Header {
    /// Serializes the header body (without the authentication tag).
    ///
    /// # Errors
    /// [`Error::Internal`] when a length does not fit its field (the
    /// request limits prevent this).
    pub fn encode_body(&self) -> Result<Vec<u8>, Error> {
        let aad = self.context.serialize();
        let edks_len: usize = self
            .encrypted_data_keys
            .iter()
            .map(EncryptedDataKey::serialized_len)
            .sum();
        let mut out = Vec::with_capacity(1 + 2 + 32 + 2 + aad.len() + 2 + edks_len + 1 + 4 + 32);
        out.push(VERSION_2);
        out.extend_from_slice(&SUITE_ID.to_be_bytes());
        out.extend_from_slice(&self.message_id);
        let aad_len = u16::try_from(aad.len())
            .map_err(|_| Error::Internal("serialized encryption context over 65,535 bytes"))?;
        out.extend_from_slice(&aad_len.to_be_bytes());
        out.extend_from_slice(&aad);
        let count = u16::try_from(self.encrypted_data_keys.len())
            .map_err(|_| Error::Internal("more than 65,535 encrypted data keys"))?;
        out.extend_from_slice(&count.to_be_bytes());
        for edk in &self.encrypted_data_keys {
            edk.write_to(&mut out)?;
        }
        match self.content_type {
            ContentType::NonFramed => {
                out.push(0x01);
                out.extend_from_slice(&0u32.to_be_bytes());
            }
            ContentType::Framed { frame_length } => {
                out.push(0x02);
                out.extend_from_slice(&frame_length.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.commitment);
        Ok(out)
    }
}

/// Why a read stopped.
enum ReadError {
    /// More bytes are needed.
    Incomplete,
    /// The bytes can never form a valid header.
    Invalid(Error),
}

impl ReadError {
    /// Turns "incomplete" into a truncation failure for callers that hold
    /// the whole message.
    fn into_error(self, truncated: &'static str) -> Error {
        match self {
            Self::Incomplete => Error::auth(truncated),
            Self::Invalid(e) => e,
        }
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        Self::Invalid(e)
    }
}

/// A bounds-checked cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        let end = self.pos.checked_add(n).ok_or(ReadError::Incomplete)?;
        let out = self.bytes.get(self.pos..end).ok_or(ReadError::Incomplete)?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u16_prefixed(&mut self) -> Result<&'a [u8], ReadError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn utf8(&mut self, what: &'static str) -> Result<String, ReadError> {
        let bytes = self.u16_prefixed()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::auth(what).into())
    }
}

fn read_edk(r: &mut Reader<'_>) -> Result<EncryptedDataKey, ReadError> {
    Ok(EncryptedDataKey {
        provider_id: r.utf8("provider ID is not UTF-8")?,
        provider_info: r.u16_prefixed()?.to_vec(),
        ciphertext: r.u16_prefixed()?.to_vec(),
    })
}

/// Parses the encryption context field of a given serialized length.
fn read_context(bytes: &[u8]) -> Result<EncryptionContext, Error> {
    let mut ctx = EncryptionContext::default();
    if bytes.is_empty() {
        return Ok(ctx);
    }
    let mut r = Reader::new(bytes);
    let parse = |r: &mut Reader<'_>, ctx: &mut EncryptionContext| -> Result<(), ReadError> {
        let count = r.u16()?;
        if count == 0 {
            return Err(Error::auth("non-empty AAD with zero pairs").into());
        }
        for _ in 0..count {
            let key = r.utf8("context key is not UTF-8")?;
            let value = r.utf8("context value is not UTF-8")?;
            if !ctx.insert_new(key, value) {
                return Err(Error::auth("duplicate encryption context key").into());
            }
        }
        Ok(())
    };
    parse(&mut r, &mut ctx).map_err(|e| e.into_error("encryption context truncated"))?;
    if r.pos != bytes.len() {
        return Err(Error::auth("AAD length does not match its pairs"));
    }
    Ok(ctx)
}

/// Parses a header at the start of `bytes`.
///
/// Returns `Ok(None)` when `bytes` is a valid prefix of a header but too
/// short (a streaming reader then waits for more); unary callers treat that
/// as truncation. Limits apply before large fields are read.
///
/// # Errors
/// [`Error::UnsupportedEnvelope`] for another version or suite or for bytes
/// that are not an ESDK message, [`Error::TooManyEncryptedDataKeys`] and
/// [`Error::PayloadTooLarge`] for limits, [`Error::DecryptAuthFailed`] for
/// any other malformation.
pub fn parse(bytes: &[u8], limits: &EnvelopeLimits) -> Result<Option<ParsedHeader>, Error> {
    match parse_inner(bytes, limits) {
        Ok(h) => Ok(Some(h)),
        Err(ReadError::Incomplete) => Ok(None),
        Err(ReadError::Invalid(e)) => Err(e),
    }
}

fn parse_inner(bytes: &[u8], limits: &EnvelopeLimits) -> Result<ParsedHeader, ReadError> {
    let mut r = Reader::new(bytes);
    match r.u8()? {
        VERSION_2 => {}
        VERSION_1 => {
            return Err(Error::UnsupportedEnvelope(
                "envelope is an AWS Encryption SDK message of format version 1 (a \
                 non-committing algorithm suite); kms-sidecar opens version 2 messages \
                 with suite 0x0478 only"
                    .into(),
            )
            .into());
        }
        _ => {
            return Err(Error::UnsupportedEnvelope(
                "envelope is not an AWS Encryption SDK message (unknown format version byte)"
                    .into(),
            )
            .into());
        }
    }
    let suite = r.u16()?;
    if suite != SUITE_ID {
        return Err(Error::UnsupportedEnvelope(format!(
            "envelope uses algorithm suite 0x{suite:04X}; kms-sidecar opens suite 0x0478 \
             (AES-256-GCM, HKDF-SHA512, key commitment, no signature) only"
        ))
        .into());
    }
    let message_id = r.array::<MESSAGE_ID_LEN>()?;
    let aad_len = usize::from(r.u16()?);
    // Read first (at most 64 KiB): a length that runs past the message is
    // damage, not a size problem.
    let aad = r.take(aad_len)?;
    if aad_len > limits.max_context_bytes {
        return Err(Error::PayloadTooLarge {
            what: "envelope's serialized encryption context",
            size: aad_len as u64,
            limit: limits.max_context_bytes as u64,
            hint: "",
        }
        .into());
    }
    let context = read_context(aad)?;
    let count = usize::from(r.u16()?);
    if count == 0 {
        return Err(Error::auth("no encrypted data keys").into());
    }
    if count > limits.max_encrypted_data_keys {
        return Err(Error::TooManyEncryptedDataKeys {
            count,
            limit: limits.max_encrypted_data_keys,
        }
        .into());
    }
    let mut encrypted_data_keys = Vec::with_capacity(count);
    for _ in 0..count {
        encrypted_data_keys.push(read_edk(&mut r)?);
    }
    let content_type = match (r.u8()?, r.u32()?) {
        (0x01, 0) => ContentType::NonFramed,
        (0x02, frame_length) if frame_length > 0 => ContentType::Framed { frame_length },
        _ => return Err(Error::auth("invalid content type or frame length").into()),
    };
    let commitment = r.array::<COMMITMENT_LEN>()?;
    let body_len = r.pos;
    let tag = r.array::<TAG_LEN>()?;
    Ok(ParsedHeader {
        header: Header {
            message_id,
            context,
            encrypted_data_keys,
            content_type,
            commitment,
        },
        body: bytes.get(..body_len).unwrap_or_default().to_vec(),
        tag,
        len: r.pos,
    })
}
