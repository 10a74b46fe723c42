//! The AWS KMS client: timeouts, the SDK's standard retries, and
//! credentials that are refreshed ahead of their expiry.
//!
//! Retries are the SDK's: exponential backoff with full jitter, and a
//! retry budget (the SDK's token bucket, one per client: [`RETRY_BUDGET`]
//! tokens, a retry costs 5, a success returns 1), so a KMS outage never
//! becomes a retry storm. Nothing here loops by hand.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_kms::config::IdentityCache;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_smithy_runtime::client::retries::{RetryPartition, TokenBucket};

/// Tokens of the retry budget: with 5 per retry, at most 100 retries in a
/// row without a success in between.
pub const RETRY_BUDGET: usize = 500;

/// How the sidecar talks to KMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsSettings {
    /// Bound on one KMS operation, retries included.
    pub timeout: Duration,
    /// Attempts per operation, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Upper bound of the first retry's jittered delay; it doubles per
    /// retry.
    pub initial_backoff: Duration,
    /// Temporary credentials are refreshed this long before they expire.
    pub credentials_refresh_margin: Duration,
}

impl Default for KmsSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            credentials_refresh_margin: Duration::from_secs(300),
        }
    }
}

/// A KMS client from `shared` (the standard chain's Region, endpoint and
/// credentials) with `settings` applied; `region` is used when `shared`
/// names none.
pub fn build(
    shared: &SdkConfig,
    settings: &KmsSettings,
    region: Option<String>,
) -> aws_sdk_kms::Client {
    let timeouts = TimeoutConfig::builder()
        .operation_timeout(settings.timeout)
        .operation_attempt_timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(2)))
        .build();
    let retries = RetryConfig::standard()
        .with_max_attempts(settings.max_attempts.max(1))
        .with_initial_backoff(settings.initial_backoff)
        .with_max_backoff(settings.timeout);
    // A partition of its own: the SDK's default budget is shared by every
    // client of the process.
    let partition = RetryPartition::custom("kms-sidecar")
        .token_bucket(TokenBucket::new(RETRY_BUDGET))
        .build();
    let mut kms = aws_sdk_kms::config::Builder::from(shared)
        .timeout_config(timeouts)
        .retry_config(retries)
        .retry_partition(partition);
    if let Some(inner) = shared.credentials_provider() {
        // Our provider caches and refreshes ahead of expiry; the SDK's
        // identity cache would only refresh 10 s ahead and fail the call
        // when a refresh fails, even with valid credentials in hand.
        kms = kms
            .credentials_provider(RefreshingCredentials::new(
                inner,
                settings.credentials_refresh_margin,
            ))
            .identity_cache(IdentityCache::no_cache());
    }
    if shared.region().is_none()
        && let Some(region) = region
    {
        kms = kms.region(aws_sdk_kms::config::Region::new(region));
    }
    aws_sdk_kms::Client::from_conf(kms.build())
}

/// Credentials this close to expiry count as expired: a request signed
/// now must still be valid when KMS checks it.
const EXPIRY_SKEW: Duration = Duration::from_secs(2);

/// First and longest wait between failed refreshes.
const REFRESH_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Credentials cached until `margin` before their expiry, then refreshed
/// in the background while calls go on with the still-valid ones. A failed
/// refresh is retried with doubling delays (never past half the remaining
/// validity); only once the credentials have expired do calls wait for a
/// refresh, and fail if it fails.
#[derive(Debug, Clone)]
pub struct RefreshingCredentials {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    inner: SharedCredentialsProvider,
    margin: Duration,
    current: RwLock<Option<Credentials>>,
    refresh: Arc<tokio::sync::Mutex<Backoff>>,
    /// The last refresh's error (empty before any failure and after a
    /// success); readable while a refresh holds `refresh`.
    failure: RwLock<String>,
}

#[derive(Debug)]
struct Backoff {
    last_attempt: Option<Instant>,
    next_attempt: Option<Instant>,
    delay: Duration,
}

impl RefreshingCredentials {
    /// Wraps `inner`.
    pub fn new(inner: SharedCredentialsProvider, margin: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                margin,
                current: RwLock::new(None),
                refresh: Arc::new(tokio::sync::Mutex::new(Backoff {
                    last_attempt: None,
                    next_attempt: None,
                    delay: REFRESH_BACKOFF.0,
                })),
                failure: RwLock::new(String::new()),
            }),
        }
    }

    async fn load(&self) -> provider::Result {
        let shared = &self.shared;
        match shared.usable() {
            Some((c, Freshness::Fresh)) => return Ok(c),
            Some((c, _)) => {
                // Inside the margin: one background refresh at a time.
                if let Ok(guard) = Arc::clone(&shared.refresh).try_lock_owned()
                    && guard.next_attempt.is_none_or(|t| Instant::now() >= t)
                {
                    let shared = Arc::clone(shared);
                    tokio::spawn(async move {
                        let _ = shared.refresh(guard).await;
                    });
                }
                return Ok(c);
            }
            None => {}
        }
        // No usable credentials. Before the first failure (at start), wait
        // for the refresh. After a failure, fail fast with its reason while
        // a background refresh retries (at most once a second), so calls
        // never queue behind a slow or failing STS.
        let Ok(guard) = Arc::clone(&shared.refresh).try_lock_owned() else {
            // A refresh is in progress (its STS call may take seconds
            // with the SDK's own retries). Only at start, before any
            // credentials or failure, do calls wait for it.
            let failure = shared.failure();
            if !failure.is_empty() {
                return Err(CredentialsError::provider_error(failure));
            }
            if shared.current.read().is_ok_and(|c| c.is_some()) {
                return Err(CredentialsError::provider_error(
                    "the AWS credentials expired and their refresh is still in progress",
                ));
            }
            let _guard = shared.refresh.lock().await;
            if let Some((c, _)) = shared.usable() {
                return Ok(c);
            }
            return Err(CredentialsError::provider_error(shared.failure()));
        };
        if let Some((c, _)) = shared.usable() {
            return Ok(c);
        }
        let error = shared.failure();
        if error.is_empty() {
            return shared.refresh(guard).await;
        }
        if guard
            .last_attempt
            .is_none_or(|t| t.elapsed() >= REFRESH_BACKOFF.0)
        {
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                let _ = shared.refresh(guard).await;
            });
        }
        Err(CredentialsError::provider_error(error))
    }
}

impl Shared {
    /// The last refresh's error; empty before the first failure and after
    /// a success.
    fn failure(&self) -> String {
        self.failure.read().map(|f| f.clone()).unwrap_or_default()
    }

    /// The current credentials unless expired, with their freshness.
    fn usable(&self) -> Option<(Credentials, Freshness)> {
        let c = self.current.read().ok().and_then(|c| c.clone())?;
        let freshness = match c.expiry() {
            None => Freshness::Fresh,
            Some(expiry) => {
                let now = SystemTime::now();
                if expiry > now + self.margin {
                    Freshness::Fresh
                } else if expiry > now + EXPIRY_SKEW {
                    Freshness::Valid
                } else {
                    Freshness::Expired
                }
            }
        };
        (freshness != Freshness::Expired).then_some((c, freshness))
    }

    async fn refresh(
        &self,
        mut backoff: tokio::sync::OwnedMutexGuard<Backoff>,
    ) -> provider::Result {
        backoff.last_attempt = Some(Instant::now());
        match self.inner.provide_credentials().await {
            Ok(fresh) => {
                if let Some(expiry) = fresh.expiry() {
                    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::info!(valid_for_s = left.as_secs(), "AWS credentials refreshed");
                }
                if let Ok(mut slot) = self.current.write() {
                    *slot = Some(fresh.clone());
                }
                backoff.next_attempt = None;
                backoff.delay = REFRESH_BACKOFF.0;
                if let Ok(mut failure) = self.failure.write() {
                    failure.clear();
                }
                Ok(fresh)
            }
            Err(err) => {
                let reason = upstream_code(&err);
                if let Ok(mut failure) = self.failure.write() {
                    failure.clone_from(&reason);
                }
                let usable = self.usable().map(|(c, _)| c);
                // Never wait past half of the remaining validity, so that
                // a recovered STS is used before the credentials expire.
                let left = usable
                    .as_ref()
                    .and_then(Credentials::expiry)
                    .and_then(|e| e.duration_since(SystemTime::now() + EXPIRY_SKEW).ok())
                    .unwrap_or(backoff.delay * 2);
                let delay = if usable.is_some() {
                    backoff.delay.min(left / 2).max(Duration::from_millis(100))
                } else {
                    REFRESH_BACKOFF.0
                };
                backoff.next_attempt = Some(Instant::now() + delay);
                backoff.delay = (backoff.delay * 2).min(REFRESH_BACKOFF.1);
                tracing::warn!(
                    error = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    still_valid = usable.is_some(),
                    "refreshing AWS credentials failed"
                );
                Err(CredentialsError::provider_error(reason))
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Freshness {
    Fresh,
    Valid,
    Expired,
}

impl ProvideCredentials for RefreshingCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(self.load())
    }
}

/// A short, safe description of a credentials failure: the provider's
/// error kind and, for STS answers, the error code (no upstream message
/// text, which may quote request parameters).
fn upstream_code(err: &CredentialsError) -> String {
    let kind = match err {
        CredentialsError::CredentialsNotLoaded(_) => "no credentials found",
        CredentialsError::ProviderTimedOut(_) => "the credentials provider timed out",
        CredentialsError::InvalidConfiguration(_) => "invalid credentials configuration",
        CredentialsError::ProviderError(_) => "the credentials provider (for example STS) failed",
        _ => "the credentials provider failed",
    };
    let full = aws_sdk_kms::error::DisplayErrorContext(err).to_string();
    match error_code_in(&full) {
        Some(code) => format!("{kind}: {code}"),
        None => kind.to_owned(),
    }
}

/// The `code: Some("...")` of an SDK error's debug rendering, if any.
fn error_code_in(text: &str) -> Option<String> {
    let rest = text.split("code: Some(\"").nth(1)?;
    let code = rest.split('"').next()?;
    code.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.')
        .then(|| code.to_owned())
}
