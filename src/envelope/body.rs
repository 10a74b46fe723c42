//! The message body (data-format/message-body.md) and its AAD
//! (data-format/message-body-aad.md): sealing frames on the way out and
//! opening framed or non-framed bodies on the way in.
//!
//! Both sides work one frame at a time so that a streaming caller holds at
//! most one frame of plaintext that has not been authenticated yet (none is
//! ever released before its tag verifies).

use ring::rand::SecureRandom;

use crate::envelope::EncryptionContext;
use crate::envelope::header::{ContentType, EncryptedDataKey, Header, ParsedHeader};
use crate::envelope::suite::{
    self, IV_LEN, MESSAGE_ID_LEN, MessageKey, TAG_LEN, commitment_matches,
};
use crate::error::Error;
use crate::secret::DataKey;

/// Body AAD content string of a regular frame.
const FRAME_STRING: &[u8] = b"AWSKMSEncryptionClient Frame";
/// Body AAD content string of the final frame.
const FINAL_FRAME_STRING: &[u8] = b"AWSKMSEncryptionClient Final Frame";
/// Body AAD content string of non-framed content.
const SINGLE_BLOCK_STRING: &[u8] = b"AWSKMSEncryptionClient Single Block";
/// Marks the final frame (message-body.md, "Sequence Number End").
const SEQUENCE_NUMBER_END: u32 = 0xFFFF_FFFF;
/// Largest non-framed content (message-body.md): 2^36 - 32 bytes.
const MAX_NON_FRAMED_CONTENT: u64 = (1 << 36) - 32;

/// Bytes a regular frame adds to its plaintext: sequence number, IV, tag.
pub const REGULAR_FRAME_OVERHEAD: u64 = 4 + IV_LEN as u64 + TAG_LEN as u64;
/// Bytes the final frame adds: end marker, sequence number, IV, length, tag.
pub const FINAL_FRAME_OVERHEAD: u64 = 4 + 4 + IV_LEN as u64 + 4 + TAG_LEN as u64;

fn body_aad(message_id: &[u8; MESSAGE_ID_LEN], kind: &[u8], seq: u32, len: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MESSAGE_ID_LEN + kind.len() + 12);
    aad.extend_from_slice(message_id);
    aad.extend_from_slice(kind);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&len.to_be_bytes());
    aad
}

/// Size of a framed message whose header (tag included) is `header_len`
/// bytes and whose plaintext is `plaintext_len` bytes, as [`Sealer`] writes
/// it: full regular frames, then a final frame with the rest (a whole frame
/// when the length is an exact, non-zero multiple of the frame length).
pub fn framed_message_len(header_len: u64, plaintext_len: u64, frame_length: u32) -> u64 {
    let frame = u64::from(frame_length.max(1));
    let regular = plaintext_len.saturating_sub(1) / frame;
    header_len
        .saturating_add(plaintext_len)
        .saturating_add(regular.saturating_mul(REGULAR_FRAME_OVERHEAD))
        .saturating_add(FINAL_FRAME_OVERHEAD)
}

/// Writes one framed message: the header first, then frames in order.
pub struct Sealer {
    key: MessageKey,
    message_id: [u8; MESSAGE_ID_LEN],
    frame_length: u32,
    next_seq: u32,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("frame_length", &self.frame_length)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Starts a message: draws the message ID, derives the message key and
    /// returns the sealer with the serialized, authenticated header.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for a zero frame length, [`Error::Internal`]
    /// if the random generator fails.
    pub fn start(
        data_key: &DataKey,
        context: EncryptionContext,
        encrypted_data_keys: Vec<EncryptedDataKey>,
        frame_length: u32,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, Vec<u8>), Error> {
        if frame_length == 0 {
            return Err(Error::InvalidRequest(
                "frame length must be at least 1".into(),
            ));
        }
        let mut message_id = [0u8; MESSAGE_ID_LEN];
        rng.fill(&mut message_id)
            .map_err(|_| Error::Internal("system random generator failed"))?;
        let (key, commitment) = suite::derive(data_key, &message_id)?;
        let header = Header {
            message_id,
            context,
            encrypted_data_keys,
            content_type: ContentType::Framed { frame_length },
            commitment,
        };
        let mut bytes = header.encode_body()?;
        let tag = key.header_tag(&bytes)?;
        bytes.extend_from_slice(&tag);
        Ok((
            Self {
                key,
                message_id,
                frame_length,
                next_seq: 1,
            },
            bytes,
        ))
    }

    /// Plaintext bytes per regular frame.
    pub fn frame_length(&self) -> usize {
        self.frame_length as usize
    }

    fn take_seq(&mut self) -> Result<u32, Error> {
        let seq = self.next_seq;
        if seq == SEQUENCE_NUMBER_END {
            return Err(Error::PayloadTooLarge {
                what: "message",
                size: u64::from(seq) * u64::from(self.frame_length),
                limit: u64::from(SEQUENCE_NUMBER_END - 1) * u64::from(self.frame_length),
                hint: "; the format allows at most 2^32 - 2 frames, use a larger frame length",
            });
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Seals one regular frame (exactly `frame_length` bytes) onto `out`.
    ///
    /// # Errors
    /// [`Error::Internal`] if `plaintext` is not one frame long.
    pub fn seal_frame(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_frame_with(out, |o| o.extend_from_slice(plaintext))
    }

    /// Seals one regular frame whose plaintext `fill` appends to `out`
    /// (exactly `frame_length` bytes), so a caller holding the plaintext in
    /// pieces copies it once, straight into the output.
    ///
    /// # Errors
    /// [`Error::Internal`] if `fill` appends another number of bytes.
    pub fn seal_frame_with(
        &mut self,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        let seq = self.take_seq()?;
        out.extend_from_slice(&seq.to_be_bytes());
        let len = self.frame_length();
        self.seal_into(seq, FRAME_STRING, len, None, out, fill)
    }

    /// Seals the final frame (0..=`frame_length` bytes) onto `out`, ending
    /// the message.
    ///
    /// # Errors
    /// [`Error::Internal`] if `plaintext` is longer than one frame.
    pub fn seal_final(self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_final_with(plaintext.len(), out, |o| o.extend_from_slice(plaintext))
    }

    /// [`Self::seal_final`] with the plaintext (`len` bytes) appended by
    /// `fill`.
    ///
    /// # Errors
    /// [`Error::Internal`] if `len` is over the frame length or `fill`
    /// appends another number of bytes.
    pub fn seal_final_with(
        mut self,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        if len > self.frame_length() {
            return Err(Error::Internal("final frame longer than the frame length"));
        }
        let seq = self.take_seq()?;
        out.extend_from_slice(&SEQUENCE_NUMBER_END.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        self.seal_into(seq, FINAL_FRAME_STRING, len, Some(len as u32), out, fill)
    }

    /// Appends IV, [the final frame's length,] ciphertext and tag.
    fn seal_into(
        &self,
        seq: u32,
        kind: &[u8],
        len: usize,
        final_len: Option<u32>,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        let mut iv = [0u8; IV_LEN];
        iv[IV_LEN - 4..].copy_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&iv);
        if let Some(n) = final_len {
            out.extend_from_slice(&n.to_be_bytes());
        }
        let start = out.len();
        fill(out);
        if out.len() - start != len {
            out.truncate(start);
            return Err(Error::Internal("frame plaintext of the wrong length"));
        }
        let aad = body_aad(&self.message_id, kind, seq, len as u64);
        let tag = self
            .key
            .seal(seq, &aad, out.get_mut(start..).unwrap_or_default())?;
        out.extend_from_slice(&tag);
        Ok(())
    }
}

/// Seals a whole plaintext into one framed message.
///
/// # Errors
/// As [`Sealer::start`].
pub fn seal(
    data_key: &DataKey,
    context: EncryptionContext,
    encrypted_data_keys: Vec<EncryptedDataKey>,
    frame_length: u32,
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    let (sealer, header) =
        Sealer::start(data_key, context, encrypted_data_keys, frame_length, rng)?;
    sealer.seal_all(header, plaintext)
}

impl Sealer {
    /// Completes the message started by [`Sealer::start`] (whose `header`
    /// it was given) with all of `plaintext`: full regular frames, then the
    /// final frame with the rest.
    ///
    /// # Errors
    /// As [`Sealer::seal_frame`].
    pub fn seal_all(mut self, header: Vec<u8>, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let total = framed_message_len(
            header.len() as u64,
            plaintext.len() as u64,
            self.frame_length,
        );
        let mut out = header;
        out.reserve_exact(
            usize::try_from(total)
                .unwrap_or(0)
                .saturating_sub(out.len()),
        );
        let frame = self.frame_length();
        let regular = plaintext.len().saturating_sub(1) / frame;
        let (full, last) = plaintext.split_at(regular * frame);
        for chunk in full.chunks_exact(frame) {
            self.seal_frame(chunk, &mut out)?;
        }
        self.seal_final(last, &mut out)?;
        Ok(out)
    }
}

/// What [`Opener::open_next`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The input does not yet hold the whole next frame.
    NeedMore,
    /// One frame was authenticated; its plaintext was appended to the output.
    Opened {
        /// Input bytes the frame took.
        consumed: usize,
        /// Whether it was the last frame of the message.
        last: bool,
    },
}

/// Opens the body of one message after its header authenticated.
pub struct Opener {
    key: MessageKey,
    message_id: [u8; MESSAGE_ID_LEN],
    content_type: ContentType,
    next_seq: u32,
    finished: bool,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("content_type", &self.content_type)
            .field("next_seq", &self.next_seq)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Derives the message key, checks the key commitment and the header
    /// authentication tag.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when either check fails.
    pub fn new(parsed: &ParsedHeader, data_key: &DataKey) -> Result<Self, Error> {
        let (key, commitment) = suite::derive(data_key, &parsed.header.message_id)?;
        if !commitment_matches(&commitment, &parsed.header.commitment) {
            return Err(Error::auth("key commitment does not match"));
        }
        key.verify_header(&parsed.body, &parsed.tag)?;
        Ok(Self {
            key,
            message_id: parsed.header.message_id,
            content_type: parsed.header.content_type,
            next_seq: 1,
            finished: false,
        })
    }

    /// Whether the last frame has been opened.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Reads the start of the next frame (or of non-framed content) from
    /// `bytes`, which needs at most [`MAX_FRAME_HEAD`] bytes. `Ok(None)`:
    /// more bytes are needed. Checks the sequence number and lengths.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] for a frame out of sequence, a bad
    /// length, or anything after the final frame.
    pub fn next_head(&self, bytes: &[u8]) -> Result<Option<FrameHead>, Error> {
        if self.finished {
            return Err(Error::auth("bytes after the final frame"));
        }
        let mut r = Cursor {
            input: bytes,
            pos: 0,
        };
        let frame_length = match self.content_type {
            ContentType::NonFramed => {
                let (Some(iv), Some(len)) = (r.array::<IV_LEN>(), r.array::<8>()) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(len);
                if len > MAX_NON_FRAMED_CONTENT {
                    return Err(Error::auth("non-framed content length over 2^36 - 32"));
                }
                let content_len = usize::try_from(len)
                    .map_err(|_| Error::auth("non-framed content over the address space"))?;
                return Ok(Some(FrameHead {
                    seq: 1,
                    iv,
                    head_len: r.pos,
                    content_len,
                    last: true,
                    kind: SINGLE_BLOCK_STRING,
                }));
            }
            ContentType::Framed { frame_length } => frame_length,
        };
        let Some(first) = r.array::<4>().map(u32::from_be_bytes) else {
            return Ok(None);
        };
        let last = first == SEQUENCE_NUMBER_END;
        let seq = if last {
            let Some(seq) = r.array::<4>().map(u32::from_be_bytes) else {
                return Ok(None);
            };
            seq
        } else {
            first
        };
        if seq != self.next_seq {
            return Err(Error::auth("frame out of sequence"));
        }
        let Some(iv) = r.array::<IV_LEN>() else {
            return Ok(None);
        };
        let content_len = if last {
            let Some(len) = r.array::<4>().map(u32::from_be_bytes) else {
                return Ok(None);
            };
            if len > frame_length {
                return Err(Error::auth("final frame longer than the frame length"));
            }
            len
        } else {
            frame_length
        };
        Ok(Some(FrameHead {
            seq,
            iv,
            head_len: r.pos,
            content_len: content_len as usize,
            last,
            kind: if last {
                FINAL_FRAME_STRING
            } else {
                FRAME_STRING
            },
        }))
    }

    /// Opens the frame `head` whose ciphertext the caller appended to `out`
    /// at `start`. On success the plaintext replaces it; on failure it is
    /// wiped and removed.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] when the tag does not verify.
    pub fn open_frame(
        &mut self,
        head: &FrameHead,
        tag: &[u8; TAG_LEN],
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), Error> {
        let aad = body_aad(
            &self.message_id,
            head.kind,
            head.seq,
            head.content_len as u64,
        );
        let opened = match out.get_mut(start..) {
            Some(ciphertext) if ciphertext.len() == head.content_len => {
                self.key.open(&head.iv, &aad, tag, ciphertext)
            }
            _ => Err(Error::Internal("frame ciphertext of the wrong length")),
        };
        if let Err(e) = opened {
            // ring leaves the buffer unspecified on failure: drop it.
            if let Some(tail) = out.get_mut(start..) {
                zeroize::Zeroize::zeroize(tail);
            }
            out.truncate(start);
            return Err(e);
        }
        if head.last {
            self.finished = true;
        } else {
            self.next_seq = head
                .seq
                .checked_add(1)
                .filter(|s| *s != SEQUENCE_NUMBER_END)
                .ok_or(Error::auth("too many frames"))?;
        }
        Ok(())
    }

    /// Opens the frame at the start of `input`, appending its plaintext to
    /// `out` only once its tag verified.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] for a frame that is malformed, out of
    /// sequence, or does not authenticate, and for input after the end.
    pub fn open_next(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Step, Error> {
        let Some(head) = self.next_head(input)? else {
            return Ok(Step::NeedMore);
        };
        let end = head.head_len + head.content_len;
        let (Some(ciphertext), Some(tag)) = (
            input.get(head.head_len..end),
            input
                .get(end..end + TAG_LEN)
                .and_then(|t| <[u8; TAG_LEN]>::try_from(t).ok()),
        ) else {
            return Ok(Step::NeedMore);
        };
        let start = out.len();
        out.extend_from_slice(ciphertext);
        self.open_frame(&head, &tag, out, start)?;
        Ok(Step::Opened {
            consumed: end + TAG_LEN,
            last: head.last,
        })
    }
}

/// Longest frame start: end marker, sequence number, IV, content length.
pub const MAX_FRAME_HEAD: usize = 4 + 4 + IV_LEN + 4;

/// The start of a frame (or of non-framed content), read by
/// [`Opener::next_head`].
#[derive(Debug, Clone, Copy)]
pub struct FrameHead {
    seq: u32,
    iv: [u8; IV_LEN],
    /// Bytes before the ciphertext.
    pub head_len: usize,
    /// Ciphertext bytes (equal to the plaintext bytes).
    pub content_len: usize,
    /// Whether this is the last frame of the message.
    pub last: bool,
    kind: &'static [u8],
}

impl FrameHead {
    /// Bytes of the whole frame: start, ciphertext and tag.
    pub fn total_len(&self) -> usize {
        self.head_len + self.content_len + TAG_LEN
    }
}

/// A cursor that answers `None` when the input is too short.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.input.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| <[u8; N]>::try_from(s).ok())
    }
}

/// Opens a complete message (header and body in `message`) with the data
/// key the caller recovered from one of `parsed`'s encrypted data keys.
///
/// # Errors
/// [`Error::DecryptAuthFailed`] for any authentication or format failure,
/// including truncation and trailing bytes.
pub fn open(parsed: &ParsedHeader, data_key: &DataKey, message: &[u8]) -> Result<Vec<u8>, Error> {
    let body = message
        .get(parsed.len..)
        .ok_or(Error::auth("message shorter than its header"))?;
    Opener::new(parsed, data_key)?.open_all(body)
}

impl Opener {
    /// Opens a whole body (everything after the header), which must end
    /// exactly with the final frame. On failure nothing is returned and
    /// the partial plaintext is wiped.
    ///
    /// # Errors
    /// [`Error::DecryptAuthFailed`] for any authentication or format
    /// failure, truncation and trailing bytes included.
    pub fn open_all(mut self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let mut rest = body;
        let mut out = Vec::with_capacity(rest.len());
        let result = loop {
            match self.open_next(rest, &mut out) {
                Ok(Step::NeedMore) => break Err(Error::auth("message truncated")),
                Ok(Step::Opened { consumed, last }) => {
                    rest = rest.get(consumed..).unwrap_or_default();
                    if last {
                        break if rest.is_empty() {
                            Ok(())
                        } else {
                            Err(Error::auth("bytes after the final frame"))
                        };
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                zeroize::Zeroize::zeroize(&mut out);
                Err(e)
            }
        }
    }
}
