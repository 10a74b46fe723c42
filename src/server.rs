//! Listeners and the gRPC server: binds TCP and Unix sockets, stacks the
//! KeyService with health, reflection (v1 and v1alpha) and the size-limit
//! status rewrite, and serves until the shutdown future resolves.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::access::{Access, Caller, Operation};
use crate::api::{AdminServiceImpl, KeyServiceImpl};
use crate::cache::{Clock, Materials};
use crate::config::{ListenAddr, ServiceConfig, ShutdownConfig};
use crate::keyring::Keyring;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::status::to_status;
use crate::streaming::RequestReset;

/// The fully qualified service name, as used by grpc.health.v1.
pub const SERVICE_NAME: &str = "kms_sidecar.v1.KeyService";

/// A bound socket, ready to serve.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix listener and the socket path to remove at exit.
    Unix(UnixListener, PathBuf),
    /// A TCP listener whose connections are TLS (mTLS with a client CA).
    Tls(TcpListener, crate::tls::TlsServer),
}

impl Listener {
    /// The address this listener serves, for logs and tests.
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| a.to_string()),
            Self::Tls(l, tls) => {
                let mode = if tls.requires_client_certs() {
                    "mtls"
                } else {
                    "tls"
                };
                l.local_addr()
                    .map_or_else(|_| format!("{mode}:?"), |a| format!("{a} ({mode})"))
            }
            Self::Unix(_, p) => format!("unix://{}", p.display()),
        }
    }

    /// This listener with TLS if it is a TCP one.
    #[must_use]
    pub fn with_tls(self, tls: &crate::tls::TlsServer) -> Self {
        match self {
            Self::Tcp(l) => Self::Tls(l, tls.clone()),
            other => other,
        }
    }
}

/// Binds every address. A Unix socket path left by a crashed process is
/// replaced; one that a live process answers on is refused.
///
/// # Errors
/// A one-line message naming the address.
pub async fn bind(
    addrs: &[ListenAddr],
    unix_mode: u32,
    unix_group: Option<u32>,
) -> Result<Vec<Listener>, String> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        out.push(match addr {
            ListenAddr::Tcp(a) => Listener::Tcp(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("cannot listen on {a}: {e}"))?,
            ),
            ListenAddr::Unix(p) => {
                Listener::Unix(bind_unix(p, unix_mode, unix_group).await?, p.clone())
            }
        });
    }
    Ok(out)
}

async fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot create directory {} for the socket: {e}",
                    dir.display()
                )
            })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "cannot listen on unix://{}: the path exists and is not a socket",
                path.display()
            ));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "cannot listen on unix://{}: another process is serving on it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on unix://{}: {e}", path.display()))?;
    if group.is_some() {
        std::os::unix::fs::chown(path, None, group)
            .map_err(|e| format!("cannot set the group of {}: {e}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set mode of {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves on every listener until `shutdown` resolves, then shuts down in
/// phases: readiness (the KeyService health status) turns NOT_SERVING at
/// once; calls are still served, on existing and new connections, through
/// the drain (until `drain_window` ends, or earlier once no KeyService call
/// has been in progress for `drain_quiet_period`); then no new calls are
/// taken, in-flight ones get up to `timeout`, idle connections are closed,
/// and Unix socket files are removed.
///
/// # Errors
/// A reflection setup or transport failure.
pub async fn serve(
    listeners: Vec<Listener>,
    keyring: Arc<Keyring>,
    config: ServiceConfig,
    phases: ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    serve_with(
        listeners,
        keyring,
        Access::default(),
        config,
        phases,
        shutdown,
    )
    .await
}

/// [`serve`] with an authorization policy and an audit trail.
///
/// # Errors
/// As [`serve`].
pub async fn serve_with(
    listeners: Vec<Listener>,
    keyring: Arc<Keyring>,
    access: Access,
    config: ServiceConfig,
    phases: ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let access = Arc::new(access);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<KeyServiceServer<KeyServiceImpl>>()
        .await;
    let prober = config
        .health_probe_interval
        .map(|every| tokio::spawn(probe_loop(Arc::clone(&keyring), health.clone(), every)));
    let materials = Arc::new(Materials::new(keyring, config.cache, Clock::system()));
    let sweeper = materials.cache().is_some().then(|| {
        let materials = Arc::clone(&materials);
        let every = config.cache.max_age.min(Duration::from_secs(60));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                if let Some(cache) = materials.cache() {
                    cache.sweep();
                }
            }
        })
    });
    if materials.cache().is_some() {
        tracing::info!(config = ?config.cache, "data-key cache on");
    }
    crate::metrics::global().watch_cache(&materials);
    let admin = AdminServiceImpl::new(Arc::clone(&materials), Arc::clone(&access));
    let service = KeyServiceImpl::new(materials, Arc::clone(&access), config);
    let activity = Arc::new(Activity::default());
    let budget = Budget::new(config.max_inflight_bytes);
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut socket_paths = Vec::new();
    for listener in listeners {
        let tracked = Arc::clone(&activity);
        let admission = budget.clone();
        let admission_access = Arc::clone(&access);
        let peek_timeout = config.request_timeout;
        let router = http2_settings(Server::builder())
            // Unary calls (request received, handled, answered) must finish
            // in this time, so a client that never completes its request
            // does not hold memory; streaming handlers return at once.
            .timeout(config.request_timeout)
            .layer(tower::layer::layer_fn(PayloadLimitStatus::new))
            .layer(tower::layer::layer_fn(move |inner| TrackActivity {
                inner,
                activity: Arc::clone(&tracked),
            }))
            .layer(tower::layer::layer_fn(move |inner| Admission {
                inner,
                budget: admission.clone(),
                access: Arc::clone(&admission_access),
                peek_timeout,
            }))
            // Health, reflection and admin requests are tiny: a small
            // decoding limit keeps callers (who need no right to reach
            // health and reflection) from making the server buffer
            // megabytes outside the unary budget.
            .add_service(
                health_service
                    .clone()
                    .max_decoding_message_size(CONTROL_MESSAGE_LIMIT),
            )
            .add_service(reflection_v1()?.max_decoding_message_size(CONTROL_MESSAGE_LIMIT))
            .add_service(reflection_v1alpha()?.max_decoding_message_size(CONTROL_MESSAGE_LIMIT))
            .add_service(
                AdminServiceServer::new(admin.clone())
                    .max_decoding_message_size(CONTROL_MESSAGE_LIMIT),
            )
            .add_service(
                KeyServiceServer::new(service.clone())
                    .max_decoding_message_size(config.max_message_bytes)
                    .max_encoding_message_size(config.max_message_bytes),
            );
        let mut rx = stop_rx.clone();
        let stopped = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        match listener {
            Listener::Tcp(l) => {
                // Without TCP_NODELAY, small replies wait for delayed ACKs
                // (about 40 ms per call).
                let incoming = tonic::transport::server::TcpIncoming::from(l)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60)));
                tasks.spawn(router.serve_with_incoming_shutdown(
                    limit_connections(incoming, &connections, config.max_connections),
                    stopped,
                ));
            }
            Listener::Tls(l, tls) => {
                tasks.spawn(router.serve_with_incoming_shutdown(
                    limit_connections(tls.incoming(l), &connections, config.max_connections),
                    stopped,
                ));
            }
            Listener::Unix(l, path) => {
                socket_paths.push(path);
                tasks.spawn(router.serve_with_incoming_shutdown(
                    limit_connections(
                        UnixListenerStream::new(l),
                        &connections,
                        config.max_connections,
                    ),
                    stopped,
                ));
            }
        }
    }
    shutdown.await;
    if let Some(prober) = prober {
        prober.abort();
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    health
        .set_not_serving::<KeyServiceServer<KeyServiceImpl>>()
        .await;
    tracing::info!(
        drain_window = ?phases.drain_window,
        quiet_period = ?phases.drain_quiet_period,
        "shutdown signal: readiness NOT_SERVING; still serving while the application drains"
    );
    let drain_end = tokio::time::Instant::now() + phases.drain_window;
    loop {
        let now = tokio::time::Instant::now();
        if now >= drain_end {
            tracing::info!("drain window over");
            break;
        }
        if activity
            .quiet_for()
            .is_some_and(|q| q >= phases.drain_quiet_period)
        {
            tracing::info!("no calls for the quiet period: the application is gone");
            break;
        }
        tokio::time::sleep((drain_end - now).min(Duration::from_millis(100))).await;
    }
    tracing::info!(
        in_flight = activity.in_flight(),
        "no new calls; waiting for in-flight calls"
    );
    let _ = stop_tx.send(true);
    let finished = tokio::time::timeout(phases.timeout, async {
        while let Some(res) = tasks.join_next().await {
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "listener ended with an error");
            }
        }
    })
    .await;
    if finished.is_err() {
        // Idle connections (or calls that outlive the bound) never hold the
        // process past it.
        tracing::warn!(
            timeout = ?phases.timeout,
            in_flight = activity.in_flight(),
            "shutdown bound reached; closing remaining connections"
        );
        tasks.abort_all();
    }
    for path in socket_paths {
        let _ = std::fs::remove_file(&path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Gives each accepted connection one of the `slots` (shared by all
/// listeners) for as long as it is open; a connection accepted when none is
/// free is closed at once (the client sees the connection refused or reset,
/// never a hang), and the refusal is logged.
///
/// An accept error (out of file descriptors, EMFILE) is logged and
/// followed by a pause of [`ACCEPT_ERROR_PAUSE`]: the server's accept loop
/// would otherwise retry at once, spinning a core until descriptors free.
fn limit_connections<S, T>(
    incoming: S,
    slots: &Arc<tokio::sync::Semaphore>,
    max: usize,
) -> impl tokio_stream::Stream<Item = Result<Counted<T>, std::io::Error>> + use<S, T>
where
    S: tokio_stream::Stream<Item = Result<T, std::io::Error>>,
{
    use tokio_stream::StreamExt as _;
    let slots = Arc::clone(slots);
    incoming
        .then(move |accepted| {
            let slots = Arc::clone(&slots);
            async move {
                match accepted {
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; pausing before the next accept");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        Some(Err(e))
                    }
                    Ok(conn) => match slots.try_acquire_owned() {
                        Ok(permit) => Some(Ok(Counted {
                            inner: conn,
                            _slot: permit,
                        })),
                        Err(_) => {
                            tracing::warn!(
                                max_connections = max,
                                "connection refused: --max-connections reached"
                            );
                            None
                        }
                    },
                }
            }
        })
        .filter_map(|accepted| accepted)
}

/// Largest request message of the health, reflection and admin services.
const CONTROL_MESSAGE_LIMIT: usize = 16 * 1024;

/// Pause after an accept error (such as EMFILE) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A connection holding a connection slot until it is closed.
pub struct Counted<T> {
    inner: T,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Runs the deep health probe every `every` and sets the KeyService status
/// from it, logging each transition once with its reason. The probe rate of
/// the kubelet or of clients never changes the KMS call rate.
async fn probe_loop(
    keyring: Arc<Keyring>,
    health: tonic_health::server::HealthReporter,
    every: Duration,
) {
    let mut serving = true;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match keyring.probe().await {
            Ok(()) => {
                if !serving {
                    tracing::info!("health probe succeeded: KeyService SERVING again");
                    health
                        .set_serving::<KeyServiceServer<KeyServiceImpl>>()
                        .await;
                    serving = true;
                }
            }
            // Throttling says KMS works and is busy: a readiness flip would
            // only move load elsewhere and make the throttling worse.
            Err(err) if err.class() == crate::error::ErrorClass::Throttled => {
                tracing::info!(error = %err, "health probe throttled by KMS; status unchanged");
            }
            Err(err) => {
                if serving {
                    tracing::warn!(
                        class = ?err.class(),
                        error = %err,
                        "health probe failed: KeyService NOT_SERVING (liveness unaffected)"
                    );
                    health
                        .set_not_serving::<KeyServiceServer<KeyServiceImpl>>()
                        .await;
                    serving = false;
                }
            }
        }
    }
}

/// The in-flight byte budget of unary KeyService calls, counted in KiB.
#[derive(Debug, Clone)]
struct Budget {
    permits: Arc<tokio::sync::Semaphore>,
    total: usize,
}

/// Budget permits are KiB, so the semaphore's range is never a limit.
const BUDGET_UNIT: usize = 1024;

impl Budget {
    fn new(bytes: usize) -> Self {
        let total = (bytes / BUDGET_UNIT).max(1);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(total)),
            total,
        }
    }

    /// Reserves room for a request message of `len` bytes and its reply.
    fn admit(&self, len: usize) -> Result<tokio::sync::OwnedSemaphorePermit, crate::error::Error> {
        let units = (2 * (len + 5)).div_ceil(BUDGET_UNIT).max(1);
        u32::try_from(units)
            .ok()
            .and_then(|n| Arc::clone(&self.permits).try_acquire_many_owned(n).ok())
            .ok_or_else(|| crate::error::Error::Busy {
                in_flight: (self.total.saturating_sub(self.permits.available_permits())
                    * BUDGET_UNIT) as u64,
                needed: (units * BUDGET_UNIT) as u64,
                budget: (self.total * BUDGET_UNIT) as u64,
            })
    }
}

/// Admits unary KeyService calls *before* their message is received:
/// - with a policy, a caller that may not use the method with any key is
///   refused at once with PERMISSION_DENIED (and audited), so it holds no
///   budget;
/// - the in-flight byte budget: the size comes from the 5-byte gRPC message
///   prefix, and a call that does not fit is refused at once with
///   RESOURCE_EXHAUSTED / SIDECAR_BUSY, its body never read. The
///   reservation lasts until the reply has been sent, so the budget bounds
///   the memory of requests being received, handled and answered.
///
/// Streaming calls get a [`RequestReset`] flag that their request body
/// sets if it fails (the client reset the stream), which tonic would
/// otherwise report as a normal end.
#[derive(Debug, Clone)]
struct Admission<S> {
    inner: S,
    budget: Budget,
    access: Arc<Access>,
    peek_timeout: Duration,
}

/// The unary methods the budget applies to, by path; their names and the
/// operations a caller needs (any one of them) to be admitted.
fn budgeted_method(path: &str) -> Option<(&'static str, &'static [Operation])> {
    match path {
        "/kms_sidecar.v1.KeyService/Wrap" => Some(("Wrap", &[Operation::Wrap])),
        "/kms_sidecar.v1.KeyService/Unwrap" => Some(("Unwrap", &[Operation::Unwrap])),
        "/kms_sidecar.v1.KeyService/GenerateDataKey" => Some((
            "GenerateDataKey",
            &[
                Operation::GenerateDataKey,
                Operation::GenerateDataKeyWithoutPlaintext,
            ],
        )),
        _ => None,
    }
}

/// Whether `path` is a streaming KeyService method.
fn streaming_method(path: &str) -> bool {
    matches!(
        path,
        "/kms_sidecar.v1.KeyService/WrapStream" | "/kms_sidecar.v1.KeyService/UnwrapStream"
    )
}

/// A request body that sets its [`RequestReset`] flag when it fails.
struct Watched {
    inner: tonic::body::Body,
    reset: RequestReset,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.reset.set();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, ResB> tower::Service<http::Request<tonic::body::Body>> for Admission<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = http::Response<Guarded<ResB, Option<tokio::sync::OwnedSemaphorePermit>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let wrap = |resp: http::Response<ResB>, permit| {
            resp.map(|inner| Guarded {
                inner,
                _guard: permit,
            })
        };
        let Some((method, needs)) = budgeted_method(req.uri().path()) else {
            let req = if streaming_method(req.uri().path()) {
                let reset = RequestReset::default();
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(reset.clone());
                let body = tonic::body::Body::new(Watched { inner: body, reset });
                http::Request::from_parts(parts, body)
            } else {
                req
            };
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(wrap(fut.await?, None)) });
        };
        let mut req = req;
        if self.access.policy.is_enforced() {
            let caller = Caller::from_extensions(req.extensions());
            if let Err(denied) = self.access.policy.check_any(&caller, needs) {
                self.access.audit_refusal(&caller, method, &denied);
                let status = crate::api::log_failure(&denied, &[]);
                crate::metrics::global().request(method, status.code(), Duration::ZERO);
                return Box::pin(async move { Ok(wrap(status.into_http(), None)) });
            }
            // The handler reads it from here instead of finding it again
            // (for mTLS, parsing the client certificate).
            req.extensions_mut().insert(caller);
        }
        // The inner service was made ready for this call; keep it, leave a
        // clone for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let budget = self.budget.clone();
        let access = Arc::clone(&self.access);
        let peek_timeout = self.peek_timeout;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let peeked = tokio::time::timeout(peek_timeout, peek_prefix(body)).await;
            let Ok((prefix, len, rest)) = peeked else {
                let status = tonic::Status::deadline_exceeded("the request did not arrive in time");
                return Ok(wrap(status.into_http(), None));
            };
            let permit = match len.map(|n| budget.admit(n)) {
                Some(Err(busy)) => {
                    tracing::info!(error = %busy, "unary call refused before reading it");
                    crate::metrics::global().request(
                        method,
                        tonic::Code::ResourceExhausted,
                        Duration::ZERO,
                    );
                    access.audit_refusal(
                        &Caller::from_extensions(&parts.extensions),
                        method,
                        &busy,
                    );
                    return Ok(wrap(to_status(&busy, &[]).into_http(), None));
                }
                Some(Ok(permit)) => Some(permit),
                None => None, // no complete prefix: tonic reports the error
            };
            let body = tonic::body::Body::new(Prefixed {
                prefix: prefix.into(),
                rest,
            });
            let resp = inner.call(http::Request::from_parts(parts, body)).await?;
            Ok(wrap(resp, permit))
        })
    }
}

/// Reads the request body until the 5-byte gRPC message prefix is known;
/// returns the frames read, the message length, and the rest of the body.
async fn peek_prefix(
    mut body: tonic::body::Body,
) -> (
    Vec<http_body::Frame<bytes::Bytes>>,
    Option<usize>,
    tonic::body::Body,
) {
    use http_body::Body as _;
    let mut frames = Vec::new();
    let mut head: Vec<u8> = Vec::with_capacity(5);
    while head.len() < 5 {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let Some(Ok(frame)) = next else { break };
        if let Some(data) = frame.data_ref() {
            let want = 5 - head.len();
            head.extend_from_slice(data.get(..want.min(data.len())).unwrap_or_default());
        }
        frames.push(frame);
    }
    let len = <[u8; 4]>::try_from(head.get(1..5).unwrap_or_default())
        .ok()
        .map(|b| u32::from_be_bytes(b) as usize);
    (frames, len, body)
}

/// A request body that replays the frames read while peeking, then the
/// rest.
struct Prefixed {
    prefix: std::collections::VecDeque<http_body::Frame<bytes::Bytes>>,
    rest: tonic::body::Body,
}

impl http_body::Body for Prefixed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(frame) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }
}

/// KeyService calls in progress and when the last one ended (health and
/// reflection calls are not counted: probes must not keep a drain alive).
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last_end: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_end: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(Arc::clone(self))
    }

    /// Calls in progress.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How long no call has been in progress; `None` while one is.
    pub fn quiet_for(&self) -> Option<Duration> {
        if self.in_flight() > 0 {
            return None;
        }
        let last = *self
            .last_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(last.elapsed())
    }
}

/// Marks one call in progress until dropped (with its response body).
#[derive(Debug)]
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        *self
            .0
            .last_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts KeyService calls from request to the end of the response body
/// (so a stream counts until it ends).
#[derive(Debug, Clone)]
struct TrackActivity<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B, ResB> tower::Service<http::Request<B>> for TrackActivity<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: Send + 'static,
{
    type Response = http::Response<Guarded<ResB, Option<ActivityGuard>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .uri()
            .path()
            .starts_with(concat!("/", "kms_sidecar.v1.KeyService", "/"))
            .then(|| self.activity.begin());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Guarded {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that holds `G` (an activity count, a budget
/// reservation) until the body is dropped, that is until the call ends.
#[derive(Debug)]
pub struct Guarded<B, G> {
    inner: B,
    _guard: G,
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/2 flow-control windows: 1 MiB per stream, and a connection window
/// several times larger, so that one stream whose data is not being read
/// (a stalled WrapStream) cannot starve the other calls that share its
/// connection.
pub fn http2_settings<L>(server: Server<L>) -> Server<L> {
    server
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // Bounds what one connection can hold open at once.
        .max_concurrent_streams(Some(256))
        // Peers that stop answering pings are disconnected.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    String,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection setup failed: {e}"))
}

fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    String,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection setup failed: {e}"))
}

/// Rewrites the statuses tonic itself sends before any handler runs into
/// this service's: an oversized request (tonic: OUT_OF_RANGE) becomes
/// RESOURCE_EXHAUSTED / PAYLOAD_TOO_LARGE naming both sizes, and a request
/// that does not decode (tonic: INTERNAL) becomes INVALID_ARGUMENT /
/// INVALID_REQUEST, each with its ErrorInfo.
#[derive(Debug, Clone)]
pub struct PayloadLimitStatus<S> {
    inner: S,
}

impl<S> PayloadLimitStatus<S> {
    fn new(inner: S) -> Self {
        Self { inner }
    }
}

fn rewrite_too_large(headers: &mut http::HeaderMap) {
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let Some(err) = crate::status::tonic_request_error(&status) else {
        return;
    };
    let ours = to_status(&err, &[]);
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if ours.add_header(headers).is_err() {
        tracing::warn!("could not rewrite a request-decoding status");
    }
}

impl<S, Req, B> tower::Service<Req> for PayloadLimitStatus<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite_too_large(resp.headers_mut());
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    /// Accept errors are passed on after a pause (no busy loop on EMFILE);
    /// connections beyond the slots are dropped, and a dropped connection
    /// frees its slot.
    #[tokio::test]
    async fn accept_errors_pause_and_slots_bound_connections() {
        let emfile = || Err(std::io::Error::from_raw_os_error(24));
        let slots = Arc::new(tokio::sync::Semaphore::new(2));
        let accepted: Vec<Result<(), std::io::Error>> =
            vec![emfile(), emfile(), emfile(), Ok(()), Ok(()), Ok(())];
        let started = tokio::time::Instant::now();
        let out: Vec<_> = limit_connections(tokio_stream::iter(accepted), &slots, 2)
            .collect()
            .await;
        assert!(
            started.elapsed() >= 3 * ACCEPT_ERROR_PAUSE,
            "{:?}",
            started.elapsed()
        );
        let errors = out.iter().filter(|r| r.is_err()).count();
        let conns: Vec<_> = out.into_iter().filter_map(Result::ok).collect();
        assert_eq!(
            (errors, conns.len()),
            (3, 2),
            "the third connection is dropped"
        );
        assert_eq!(slots.available_permits(), 0);
        drop(conns);
        assert_eq!(slots.available_permits(), 2);
    }
}
