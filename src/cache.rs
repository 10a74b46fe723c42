//! The data-key cache: one cache for every process in the pod, following
//! the AWS Encryption SDK caching materials manager (spec
//! framework/caching-cmm.md).
//!
//! - Encrypt side: a data key is reused only for the same wrapping key,
//!   the same canonical encryption context and the same algorithm suite,
//!   until it reaches its age, message or byte limit, whichever comes
//!   first. Messages of unknown length never use it. Each message still
//!   gets its own message ID, hence its own derived key and commitment.
//! - Decrypt side: encrypted data keys plus context → data key, bounded by
//!   age. A hit is still checked by the key commitment and the header tag.
//! - Both sides: bounded (least recently used first out), single-flight
//!   (concurrent misses for one entry make one KMS call and share its
//!   result, errors included), and time comes from a [`Clock`] so expiry
//!   tests are deterministic. Keys leave memory zeroized when the last
//!   holder of an evicted or expired entry drops it.
//!
//! Only the aws-kms keyring uses it: the local keyring makes a data key in
//! about a microsecond, so reuse would trade key separation for nothing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::envelope::{EncryptedDataKey, EncryptionContext, SUITE_ID};
use crate::error::Error;
use crate::keyring::Keyring;
use crate::secret::DataKey;

/// Cache limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Longest life of an entry; zero turns the cache off.
    pub max_age: Duration,
    /// Most messages one encrypt-side data key may protect.
    pub max_messages: u64,
    /// Most plaintext bytes one encrypt-side data key may protect.
    pub max_bytes: u64,
    /// Most entries per side.
    pub capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(300),
            max_messages: 10_000,
            max_bytes: 1 << 30,
            capacity: 1000,
        }
    }
}

/// The source of time for expiry: the system's monotonic clock, or a
/// manual one that only tests move.
#[derive(Debug, Clone)]
pub struct Clock {
    base: Instant,
    manual: Option<Arc<Mutex<Duration>>>,
}

impl Clock {
    /// The monotonic system clock.
    pub fn system() -> Self {
        Self {
            base: Instant::now(),
            manual: None,
        }
    }

    /// A clock that stands still until [`Self::advance`].
    pub fn manual() -> Self {
        Self {
            base: Instant::now(),
            manual: Some(Arc::new(Mutex::new(Duration::ZERO))),
        }
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual
            && let Ok(mut t) = m.lock()
        {
            *t += by;
        }
    }

    fn now(&self) -> Duration {
        match &self.manual {
            Some(m) => m.lock().map_or(Duration::ZERO, |t| *t),
            None => self.base.elapsed(),
        }
    }
}

/// A data key for new messages, with its encrypted form for their headers.
#[derive(Debug)]
pub struct EncryptionMaterial {
    /// The plaintext data key.
    pub data_key: DataKey,
    /// The data key encrypted under the wrapping key.
    pub encrypted: EncryptedDataKey,
}

/// A message's data key and the wrapping key that opened it.
#[derive(Debug)]
pub struct DecryptionMaterial {
    /// The plaintext data key.
    pub data_key: DataKey,
    /// The key ARN (or local key name) that decrypted it.
    pub key_id: String,
}

/// Why entries left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Older than the age limit.
    Age,
    /// Its message limit was reached.
    Messages,
    /// Its byte limit was reached.
    Bytes,
    /// Least recently used, to make room.
    Capacity,
    /// Flushed by an administrator.
    Flush,
}

/// A snapshot of the cache counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Wraps served by a cached data key.
    pub encrypt_hits: u64,
    /// Wraps that asked KMS for a data key while the cache was on.
    pub encrypt_misses: u64,
    /// Unwraps served by a cached data key.
    pub decrypt_hits: u64,
    /// Unwraps that asked KMS to decrypt while the cache was on.
    pub decrypt_misses: u64,
    /// Entries evicted by age.
    pub evicted_age: u64,
    /// Entries evicted by their message limit.
    pub evicted_messages: u64,
    /// Entries evicted by their byte limit.
    pub evicted_bytes: u64,
    /// Entries evicted to make room.
    pub evicted_capacity: u64,
    /// Entries removed by a flush.
    pub evicted_flush: u64,
    /// Encrypt-side entries now.
    pub encrypt_entries: u64,
    /// Decrypt-side entries now.
    pub decrypt_entries: u64,
}

impl CacheStats {
    /// KMS calls the cache saved: every hit is one call not made.
    pub fn kms_calls_saved(&self) -> u64 {
        self.encrypt_hits + self.decrypt_hits
    }
}

type Digest = [u8; 64];
/// What a single-flight leader tells the callers waiting for it: `None`
/// until it is done, then its outcome.
type Outcome = Option<Result<(), Error>>;

struct Slot<V> {
    value: Arc<V>,
    created: Duration,
    messages: u64,
    bytes: u64,
    tick: u64,
}

struct Side<V> {
    entries: HashMap<Digest, Slot<V>>,
    lru: BTreeMap<u64, Digest>,
    inflight: HashMap<Digest, watch::Receiver<Outcome>>,
}

impl<V> Default for Side<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            inflight: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    tick: u64,
    encrypt: Side<EncryptionMaterial>,
    decrypt: Side<DecryptionMaterial>,
}

#[derive(Default)]
struct Counters {
    hits: [AtomicU64; 2],
    misses: [AtomicU64; 2],
    evicted: [AtomicU64; 5],
}

impl Counters {
    fn evicted(&self, why: Eviction) {
        let i = match why {
            Eviction::Age => 0,
            Eviction::Messages => 1,
            Eviction::Bytes => 2,
            Eviction::Capacity => 3,
            Eviction::Flush => 4,
        };
        if let Some(c) = self.evicted.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Encrypt,
    Decrypt,
}

impl Which {
    fn index(self) -> usize {
        match self {
            Self::Encrypt => 0,
            Self::Decrypt => 1,
        }
    }
}

/// Picks one side of [`Inner`]; a trait so the single-flight code is
/// written once for both.
trait SideOf: Sized {
    const WHICH: Which;
    fn side(inner: &mut Inner) -> &mut Side<Self>;
}

impl SideOf for EncryptionMaterial {
    const WHICH: Which = Which::Encrypt;
    fn side(inner: &mut Inner) -> &mut Side<Self> {
        &mut inner.encrypt
    }
}

impl SideOf for DecryptionMaterial {
    const WHICH: Which = Which::Decrypt;
    fn side(inner: &mut Inner) -> &mut Side<Self> {
        &mut inner.decrypt
    }
}

/// The cache itself.
pub struct DataKeyCache {
    config: CacheConfig,
    clock: Clock,
    inner: Mutex<Inner>,
    counters: Counters,
}

impl std::fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl DataKeyCache {
    /// An empty cache.
    pub fn new(config: CacheConfig, clock: Clock) -> Self {
        Self {
            config,
            clock,
            inner: Mutex::new(Inner::default()),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half made
        // (every update is a single insert or remove), so a poisoned lock
        // is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        let (enc, dec) = {
            let inner = self.lock();
            (inner.encrypt.entries.len(), inner.decrypt.entries.len())
        };
        let c = &self.counters;
        let load = |a: Option<&AtomicU64>| a.map_or(0, |a| a.load(Ordering::Relaxed));
        CacheStats {
            encrypt_hits: load(c.hits.first()),
            encrypt_misses: load(c.misses.first()),
            decrypt_hits: load(c.hits.get(1)),
            decrypt_misses: load(c.misses.get(1)),
            evicted_age: load(c.evicted.first()),
            evicted_messages: load(c.evicted.get(1)),
            evicted_bytes: load(c.evicted.get(2)),
            evicted_capacity: load(c.evicted.get(3)),
            evicted_flush: load(c.evicted.get(4)),
            encrypt_entries: enc as u64,
            decrypt_entries: dec as u64,
        }
    }

    /// Removes every entry; returns how many there were.
    pub fn flush(&self) -> usize {
        let mut inner = self.lock();
        let n = inner.encrypt.entries.len() + inner.decrypt.entries.len();
        inner.encrypt.entries.clear();
        inner.encrypt.lru.clear();
        inner.decrypt.entries.clear();
        inner.decrypt.lru.clear();
        drop(inner);
        for _ in 0..n {
            self.counters.evicted(Eviction::Flush);
        }
        n
    }

    /// Removes the entries past their age.
    pub fn sweep(&self) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let expired = sweep_side(&mut inner.encrypt, now, self.config.max_age)
            + sweep_side(&mut inner.decrypt, now, self.config.max_age);
        drop(inner);
        for _ in 0..expired {
            self.counters.evicted(Eviction::Age);
        }
    }

    /// Finds a usable entry, counting `usage` (plaintext bytes of one more
    /// message, encrypt side only), or evicts it if it is used up.
    fn take<V: SideOf>(
        &self,
        inner: &mut Inner,
        key: &Digest,
        usage: Option<u64>,
    ) -> Option<Arc<V>> {
        let now = self.clock.now();
        inner.tick += 1;
        let tick = inner.tick;
        let side = V::side(inner);
        let slot = side.entries.get_mut(key)?;
        let verdict = if now.saturating_sub(slot.created) >= self.config.max_age {
            Err(Eviction::Age)
        } else if let Some(len) = usage {
            if slot.messages >= self.config.max_messages {
                Err(Eviction::Messages)
            } else if slot.bytes.saturating_add(len) > self.config.max_bytes {
                Err(Eviction::Bytes)
            } else {
                slot.messages += 1;
                slot.bytes += len;
                Ok(())
            }
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                side.lru.remove(&slot.tick);
                slot.tick = tick;
                let value = Arc::clone(&slot.value);
                side.lru.insert(tick, *key);
                Some(value)
            }
            Err(why) => {
                if let Some(old) = side.entries.remove(key) {
                    side.lru.remove(&old.tick);
                }
                self.counters.evicted(why);
                None
            }
        }
    }

    fn insert<V: SideOf>(&self, key: Digest, value: &Arc<V>, usage: Option<u64>) {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let side = V::side(&mut inner);
        let mut expired = sweep_side(side, now, self.config.max_age);
        let mut full = 0;
        if let Some(old) = side.entries.remove(&key) {
            side.lru.remove(&old.tick);
        }
        while side.entries.len() >= self.config.capacity {
            let Some((_, oldest)) = side.lru.pop_first() else {
                break;
            };
            side.entries.remove(&oldest);
            full += 1;
        }
        side.entries.insert(
            key,
            Slot {
                value: Arc::clone(value),
                created: now,
                messages: u64::from(usage.is_some()),
                bytes: usage.unwrap_or(0),
                tick,
            },
        );
        side.lru.insert(tick, key);
        drop(inner);
        while expired > 0 {
            self.counters.evicted(Eviction::Age);
            expired -= 1;
        }
        for _ in 0..full {
            self.counters.evicted(Eviction::Capacity);
        }
    }

    /// The entry for `key`, or `load`'s value, made once however many
    /// callers miss at the same time.
    async fn get_or_load<V, F, Fut>(
        &self,
        key: Digest,
        usage: Option<u64>,
        load: F,
    ) -> Result<Arc<V>, Error>
    where
        V: SideOf,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, Error>>,
    {
        if usage.is_some_and(|len| len > self.config.max_bytes) {
            // Over the byte limit on its own: never cached, never waits.
            record_cache_hit(false);
            return load().await.map(Arc::new);
        }
        let which = V::WHICH.index();
        let mut waited = false;
        let flight = loop {
            let wait = {
                let mut inner = self.lock();
                if let Some(hit) = self.take::<V>(&mut inner, &key, usage) {
                    if let Some(c) = self.counters.hits.get(which) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    record_cache_hit(true);
                    return Ok(hit);
                }
                let side = V::side(&mut inner);
                match side.inflight.get(&key) {
                    // Wait for the caller already asking KMS, once; after
                    // that (its key used up, or not cacheable) ask KMS.
                    Some(rx) if !waited => Some(rx.clone()),
                    Some(_) => break None,
                    None => {
                        let (tx, rx) = watch::channel(None);
                        side.inflight.insert(key, rx);
                        break Some(Flight {
                            cache: self,
                            key,
                            tx,
                            pick: V::side,
                        });
                    }
                }
            };
            if let Some(mut rx) = wait {
                waited = true;
                // Err: the leader was cancelled; look again.
                if let Ok(outcome) = rx.wait_for(Option::is_some).await
                    && let Some(Err(e)) = &*outcome
                {
                    return Err(e.clone());
                }
            }
        };
        if let Some(c) = self.counters.misses.get(which) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        record_cache_hit(false);
        let result = load().await.map(Arc::new);
        if let Ok(value) = &result {
            self.insert(key, value, usage);
        }
        if let Some(flight) = flight {
            flight.finish(result.as_ref().map(|_| ()).map_err(Clone::clone));
        }
        result
    }
}

/// Records on the current RPC span whether its data key came from the
/// cache (`false`: KMS or the local keyring made or opened it).
fn record_cache_hit(hit: bool) {
    tracing::Span::current().record("cache_hit", hit);
}

fn sweep_side<V>(side: &mut Side<V>, now: Duration, max_age: Duration) -> usize {
    let before = side.entries.len();
    let lru = &mut side.lru;
    side.entries.retain(|_, slot| {
        let keep = now.saturating_sub(slot.created) < max_age;
        if !keep {
            lru.remove(&slot.tick);
        }
        keep
    });
    before - side.entries.len()
}

/// The single-flight leader's registration; removed when it finishes or
/// is cancelled (then the waiters look again).
struct Flight<'a, V> {
    cache: &'a DataKeyCache,
    key: Digest,
    tx: watch::Sender<Outcome>,
    pick: fn(&mut Inner) -> &mut Side<V>,
}

impl<V> Flight<'_, V> {
    fn finish(self, outcome: Result<(), Error>) {
        self.tx.send_replace(Some(outcome));
        // Drop unregisters.
    }
}

impl<V> Drop for Flight<'_, V> {
    fn drop(&mut self) {
        let mut inner = self.cache.lock();
        let side = (self.pick)(&mut inner);
        if side
            .inflight
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            side.inflight.remove(&self.key);
        }
    }
}

fn digest(parts: &[&[u8]]) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Where Wrap and Unwrap get their data keys: the keyring, through the
/// cache when one is configured (the cryptographic materials manager of
/// the ESDK).
#[derive(Debug)]
pub struct Materials {
    keyring: Arc<Keyring>,
    cache: Option<DataKeyCache>,
}

impl Materials {
    /// Materials from `keyring`, cached per `config` when the keyring is
    /// aws-kms and the cache is on.
    pub fn new(keyring: Arc<Keyring>, config: CacheConfig, clock: Clock) -> Self {
        let cache = (matches!(*keyring, Keyring::AwsKms(_)) && !config.max_age.is_zero())
            .then(|| DataKeyCache::new(config, clock));
        Self { keyring, cache }
    }

    /// The keyring behind the cache.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The cache, if on.
    pub fn cache(&self) -> Option<&DataKeyCache> {
        self.cache.as_ref()
    }

    /// A data key for one new message of `plaintext_len` bytes (`None`:
    /// unknown, never cached) under `key_id` (resolved) and `context`.
    ///
    /// # Errors
    /// As [`Keyring::generate_message_key`].
    pub async fn for_encrypt(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        plaintext_len: Option<u64>,
    ) -> Result<Arc<EncryptionMaterial>, Error> {
        let load = || async {
            let (data_key, encrypted) = self.keyring.generate_message_key(key_id, context).await?;
            Ok(EncryptionMaterial {
                data_key,
                encrypted,
            })
        };
        match (&self.cache, plaintext_len) {
            (Some(cache), Some(len)) => {
                let key = digest(&[
                    b"encrypt",
                    &SUITE_ID.to_be_bytes(),
                    key_id.as_bytes(),
                    &context.serialize(),
                ]);
                cache.get_or_load(key, Some(len), load).await
            }
            _ => {
                record_cache_hit(false);
                load().await.map(Arc::new)
            }
        }
    }

    /// The data key of a message with `edks` and `context`.
    ///
    /// # Errors
    /// As [`Keyring::decrypt_message_key`].
    pub async fn for_decrypt(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
    ) -> Result<Arc<DecryptionMaterial>, Error> {
        let load = || async {
            let (data_key, key_id) = self.keyring.decrypt_message_key(edks, context).await?;
            Ok(DecryptionMaterial { data_key, key_id })
        };
        let Some(cache) = &self.cache else {
            record_cache_hit(false);
            return load().await.map(Arc::new);
        };
        let mut serialized = Vec::new();
        for edk in edks {
            edk.write_to(&mut serialized)?;
        }
        let key = digest(&[
            b"decrypt",
            &SUITE_ID.to_be_bytes(),
            &context.serialize(),
            &serialized,
        ]);
        cache.get_or_load(key, None, load).await
    }
}
