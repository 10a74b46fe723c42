//! The encryption context and its canonical serialization
//! (data-format/message-header.md, "AAD" and "Key Value Pairs";
//! framework/structures.md, "Encryption Context").

use std::collections::{BTreeMap, HashMap};

use crate::error::Error;

/// Prefix of context keys reserved by the AWS Encryption SDK.
pub const RESERVED_PREFIX: &str = "aws-crypto-";

/// Non-secret key-value pairs bound to a message. Ordered by key bytes, which
/// is the order the message format serializes them in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Builds a context supplied by a caller for a new message.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for an empty key or a key with the reserved
    /// `aws-crypto-` prefix, [`Error::PayloadTooLarge`] when the serialized
    /// form exceeds `max_bytes`.
    pub fn from_request(pairs: HashMap<String, String>, max_bytes: usize) -> Result<Self, Error> {
        if pairs.keys().any(String::is_empty) {
            return Err(Error::InvalidRequest(
                "encryption context keys must not be empty".into(),
            ));
        }
        if let Some(key) = pairs.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
            return Err(Error::InvalidRequest(format!(
                "encryption context key {key:?} uses the reserved prefix {RESERVED_PREFIX:?}"
            )));
        }
        let ctx = Self(pairs.into_iter().collect());
        let size = ctx.serialized_len();
        if size > max_bytes {
            return Err(Error::PayloadTooLarge {
                what: "serialized encryption context",
                size: size as u64,
                limit: max_bytes as u64,
                hint: "",
            });
        }
        Ok(ctx)
    }

    /// Builds a context from pairs without validation (pairs parsed from a
    /// message, or a caller's context to compare against one).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    /// Inserts a pair, returning whether the key was new.
    pub(crate) fn insert_new(&mut self, key: String, value: String) -> bool {
        use std::collections::btree_map::Entry;
        match self.0.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(value);
                true
            }
            Entry::Occupied(_) => false,
        }
    }

    /// Whether both contexts hold the same pairs, ignoring reserved
    /// `aws-crypto-` keys on either side.
    pub fn matches_ignoring_reserved(&self, other: &Self) -> bool {
        fn public(c: &EncryptionContext) -> impl Iterator<Item = (&String, &String)> {
            c.0.iter().filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        }
        public(self).eq(public(other))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The keys, in order. Key names are not secret; values may be.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs as a map, for KMS calls and replies.
    pub fn to_hash_map(&self) -> HashMap<String, String> {
        self.0.clone().into_iter().collect()
    }

    /// Length of [`Self::serialize`]'s output.
    pub fn serialized_len(&self) -> usize {
        if self.0.is_empty() {
            return 0;
        }
        2 + self
            .0
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
    }

    /// The canonical serialization: empty for an empty context, otherwise a
    /// u16 pair count and each pair as u16-length-prefixed UTF-8 key and
    /// value, sorted by key. The caller checks the size limit first
    /// ([`Self::from_request`]); keys and values longer than 65,535 bytes
    /// cannot pass that limit.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.serialized_len());
        if self.0.is_empty() {
            return out;
        }
        put_u16_len(&mut out, self.0.len());
        for (k, v) in &self.0 {
            put_u16_len(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            put_u16_len(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

/// Appends `len` as a big-endian u16, saturating: only reachable with a value
/// over 65,535, which the size limits exclude before serialization.
fn put_u16_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn serialization_is_sorted_and_length_prefixed() {
        let c = EncryptionContext::from_request(ctx(&[("b", "2"), ("a", "1")]), 100).unwrap();
        assert_eq!(
            c.serialize(),
            [0, 2, 0, 1, b'a', 0, 1, b'1', 0, 1, b'b', 0, 1, b'2']
        );
        assert_eq!(c.serialized_len(), c.serialize().len());
        assert!(EncryptionContext::default().serialize().is_empty());
    }

    #[test]
    fn ambiguous_pairs_serialize_differently() {
        // {"ab":"c"} and {"a":"bc"} must not collide (moto's KMS lets them).
        let x = EncryptionContext::from_request(ctx(&[("ab", "c")]), 100).unwrap();
        let y = EncryptionContext::from_request(ctx(&[("a", "bc")]), 100).unwrap();
        assert_ne!(x.serialize(), y.serialize());
    }

    #[test]
    fn invalid_contexts_are_refused() {
        assert!(EncryptionContext::from_request(ctx(&[("", "v")]), 100).is_err());
        assert!(EncryptionContext::from_request(ctx(&[("aws-crypto-x", "v")]), 100).is_err());
        let err = EncryptionContext::from_request(ctx(&[("k", "0123456789")]), 10).unwrap_err();
        assert!(matches!(
            err,
            Error::PayloadTooLarge {
                size: 17,
                limit: 10,
                ..
            }
        ));
    }

    #[test]
    fn reserved_keys_are_ignored_when_matching() {
        let a = EncryptionContext::from_pairs([
            ("k".to_owned(), "v".to_owned()),
            ("aws-crypto-public-key".to_owned(), "x".to_owned()),
        ]);
        let b = EncryptionContext::from_pairs([("k".to_owned(), "v".to_owned())]);
        assert!(a.matches_ignoring_reserved(&b));
        let c = EncryptionContext::from_pairs([("k".to_owned(), "V".to_owned())]);
        assert!(!a.matches_ignoring_reserved(&c));
    }
}
