//! Command-line flags and `KMS_SIDECAR_*` environment variables, parsed
//! once into a typed [`Config`] before anything binds or calls KMS.
//! A flag wins over its environment variable, which wins over the default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::audit::AuditSink;
use crate::cache::CacheConfig;
use crate::envelope::EnvelopeLimits;
use crate::keyring::kms_client::KmsSettings;
use crate::streaming::StreamConfig;

/// Default gRPC address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The gRPC message size a stock client accepts, and our default limit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest frame length, for Wrap and WrapStream alike: a sealed frame plus
/// a batch of output must fit one gRPC message.
pub const MAX_FRAME_LENGTH: u32 = 1 << 20;
/// Room kept in a unary reply for everything but the plaintext: header
/// (context, encrypted data key), frame overhead, protobuf framing.
pub const UNARY_REPLY_RESERVE: usize = 64 * 1024;

/// Which keyring provides data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyringKind {
    /// A local AES-256 wrapping key in a file (ESDK raw AES keyring).
    Local,
    /// AWS KMS keys (ESDK AWS KMS keyring, strict mode).
    AwsKms,
}

/// kms-sidecar: envelope encryption as a gRPC sidecar.
///
/// Serves kms_sidecar.v1.KeyService (GenerateDataKey, Wrap, Unwrap,
/// WrapStream, UnwrapStream), grpc.health.v1 and server reflection. With no
/// options it listens on 127.0.0.1:50051 and uses a local key file, created
/// on first start. `kms-sidecar client wrap|unwrap` streams files through a
/// running sidecar.
#[derive(Debug, Parser)]
#[command(
    name = "kms-sidecar",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a subcommand, the sidecar runs (as `serve`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server options, when no subcommand is given.
    #[command(flatten)]
    pub serve: Args,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (the default when no subcommand is given).
    Serve(Args),
    /// Stream a file or stdin through a running sidecar.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Ask a running sidecar for its grpc.health.v1 status: exit 0 when
    /// SERVING, 1 otherwise (for exec probes and HEALTHCHECK).
    Health(HealthArgs),
    /// Permission preflight: with the server's configuration, find the AWS
    /// credentials, try each KMS action the sidecar needs on each key, print
    /// a table and a minimal IAM policy. Exit 0 when the sidecar can serve.
    Check(Args),
    /// Print the effective configuration (flags, environment, file and
    /// defaults merged; nothing secret) as a configuration file.
    Config(Args),
}

/// `health` options.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Sidecar address: HOST:PORT or unix:///path.sock. Default: the first
    /// address in KMS_SIDECAR_LISTEN, else 127.0.0.1:50051.
    #[arg(long, env = "KMS_SIDECAR_ADDR")]
    pub addr: Option<String>,
    /// Service to check: "" (the process; for liveness) or
    /// kms_sidecar.v1.KeyService (for readiness).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl HealthArgs {
    /// The address to probe.
    pub fn target(&self) -> String {
        self.addr.clone().unwrap_or_else(|| {
            std::env::var("KMS_SIDECAR_LISTEN")
                .ok()
                .and_then(|l| l.split(',').next().map(|a| a.trim().to_owned()))
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| DEFAULT_LISTEN.to_owned())
        })
    }
}

/// Client subcommands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Encrypt a file (or stdin) into an envelope with WrapStream.
    Wrap(ClientWrapArgs),
    /// Decrypt an envelope file (or stdin) with UnwrapStream. Writing to a
    /// file, the output appears only once the whole envelope verified; on
    /// stdout, discard everything if the exit code is not 0.
    Unwrap(ClientIo),
}

/// Where the client connects and what it reads and writes.
#[derive(Debug, clap::Args)]
pub struct ClientIo {
    /// Sidecar address: HOST:PORT or unix:///path.sock.
    #[arg(long, env = "KMS_SIDECAR_ADDR", default_value = DEFAULT_LISTEN)]
    pub addr: String,
    /// Input file; `-` reads stdin.
    #[arg(short, long, default_value = "-")]
    pub input: PathBuf,
    /// Output file; `-` writes stdout.
    #[arg(short, long, default_value = "-")]
    pub output: PathBuf,
    /// Encryption context pair KEY=VALUE; repeat for several.
    #[arg(short = 'c', long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
}

/// `client wrap` options.
#[derive(Debug, clap::Args)]
pub struct ClientWrapArgs {
    /// Input, output, address and context.
    #[command(flatten)]
    pub io: ClientIo,
    /// Wrapping key (ARN, key ID, alias); empty = the sidecar's default.
    #[arg(long, default_value = "")]
    pub key_id: String,
    /// Plaintext bytes per frame; 0 = the sidecar's default.
    #[arg(long, default_value_t = 0)]
    pub frame_length: u32,
}

/// Subcommands that take the server's configuration (and so the file).
const CONFIGURED_COMMANDS: [&str; 3] = ["serve", "check", "config"];

/// Returns `argv` with the settings of the configuration file (from
/// `--config` or `KMS_SIDECAR_CONFIG`) inserted for every option that
/// neither the command line nor the environment sets, so that clap applies
/// the documented precedence: command line, environment, file, defaults.
///
/// # Errors
/// A one-line message for an unreadable or invalid file, or an unknown key.
pub fn argv_with_config_file(
    argv: Vec<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, String> {
    use std::ffi::OsString;
    let text: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let sub = text.get(1).map(String::as_str);
    let insert_at = match sub {
        Some(s) if CONFIGURED_COMMANDS.contains(&s) => 2,
        Some(s) if !s.starts_with('-') => return Ok(argv), // client, health, help
        _ => 1,
    };
    let from_args = text.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            text.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_owned)
        }
    });
    let Some(path) = from_args.or_else(|| {
        std::env::var("KMS_SIDECAR_CONFIG")
            .ok()
            .filter(|p| !p.is_empty())
    }) else {
        return Ok(argv);
    };
    let content = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read configuration file {path}: {e}"))?;
    let table: toml::Table = content.parse().map_err(|e: toml::de::Error| {
        format!("invalid configuration file {path}: {}", e.message())
    })?;
    let command = <Args as clap::Args>::augment_args(clap::Command::new("kms-sidecar"));
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            return Err(format!(
                "unknown setting {key:?} in {path}; see kms-sidecar --help"
            ));
        };
        let on_command_line = text
            .iter()
            .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        let in_environment = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|v| !v.is_empty());
        if on_command_line || in_environment {
            continue;
        }
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<_, _>>(),
            other => scalar(other).map(|v| vec![v]),
        }
        .map_err(|what| format!("setting {key:?} in {path}: {what}"))?;
        for v in values {
            injected.push(format!("--{long}").into());
            injected.push(v.into());
        }
    }
    let mut out = argv;
    let tail = out.split_off(insert_at.min(out.len()));
    out.extend(injected);
    out.extend(tail);
    Ok(out)
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("use a string, a number or a list of them".into()),
    }
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("invalid context pair {s:?}: use KEY=VALUE"))
}

/// Options of the sidecar server.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Optional TOML configuration file: option names as keys
    /// (`key-id = ["arn:..."]`, `kms-timeout = "5s"`). Precedence: command
    /// line, then environment, then this file, then defaults.
    #[arg(long = "config", env = "KMS_SIDECAR_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Address to serve on: IP:PORT for TCP, or unix:///path/to.sock for a
    /// Unix socket. Repeat (or comma-separate) for several; any --listen
    /// replaces the default.
    #[arg(long, env = "KMS_SIDECAR_LISTEN", value_delimiter = ',', default_value = DEFAULT_LISTEN)]
    pub listen: Vec<String>,

    /// Where data keys come from.
    #[arg(long, env = "KMS_SIDECAR_KEYRING", value_enum, default_value_t = KeyringKind::Local)]
    pub keyring: KeyringKind,

    /// KMS key to use (key ARN, key ID, alias name or alias ARN); repeat or
    /// comma-separate for several. The first is the default key. Key ARNs
    /// are recommended: aliases and key IDs are resolved once at start with
    /// kms:DescribeKey.
    #[arg(long = "key-id", env = "KMS_SIDECAR_KEY_ID", value_delimiter = ',')]
    pub key_ids: Vec<String>,

    /// Local keyring: file holding the 32-byte AES-256 wrapping key; created
    /// (mode 0600) if missing. Default: $XDG_DATA_HOME/kms-sidecar/local-key,
    /// else ~/.local/share/kms-sidecar/local-key.
    #[arg(long, env = "KMS_SIDECAR_LOCAL_KEY_FILE")]
    pub local_key_file: Option<PathBuf>,

    /// Local keyring: key namespace (the ESDK raw AES keyring's provider ID).
    #[arg(
        long,
        env = "KMS_SIDECAR_LOCAL_KEY_NAMESPACE",
        default_value = "kms-sidecar"
    )]
    pub local_key_namespace: String,

    /// Local keyring: key name (the raw AES keyring's key name; also the
    /// key_id the API reports).
    #[arg(long, env = "KMS_SIDECAR_LOCAL_KEY_NAME", default_value = "local-key")]
    pub local_key_name: String,

    /// Plaintext bytes per frame in envelopes that Wrap and WrapStream
    /// write, 1024 to 1048576 (a stream may ask for its own, 1 to 1048576).
    #[arg(long, env = "KMS_SIDECAR_FRAME_LENGTH", default_value_t = 65536)]
    pub frame_length: u32,

    /// Largest gRPC message accepted or sent, in bytes. Unary Wrap accepts
    /// plaintext up to this minus 64 KiB so its reply fits. Clients must
    /// accept replies this large (stock clients accept 4 MiB).
    #[arg(long, env = "KMS_SIDECAR_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Bytes of unary requests (and their replies) in progress at once,
    /// reserved from each request's gRPC length prefix before its body is
    /// read; calls beyond it are refused at once with RESOURCE_EXHAUSTED
    /// (SIDECAR_BUSY) instead of queueing. At least twice
    /// --max-message-bytes.
    #[arg(long, env = "KMS_SIDECAR_MAX_INFLIGHT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_inflight_bytes: usize,

    /// Client connections open at once, over all listeners (each idle
    /// HTTP/2 connection holds about 20 KB); a connection beyond it is
    /// closed as soon as it is accepted, so clients see a refusal at once
    /// instead of a hang.
    #[arg(long, env = "KMS_SIDECAR_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Bound on a unary call, from its first request byte to its reply
    /// (DEADLINE_EXCEEDED after it); a client's shorter grpc-timeout wins.
    #[arg(long, env = "KMS_SIDECAR_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Interval of the deep health probe: one real GenerateDataKey + Decrypt
    /// on the default key, whatever the probe rate; a failure turns the
    /// kms_sidecar.v1.KeyService status (readiness) NOT_SERVING, a success
    /// turns it back. The overall "" status (liveness) is not affected.
    /// 0 disables the probe.
    #[arg(long, env = "KMS_SIDECAR_HEALTH_PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub health_probe_interval: Duration,

    /// Most encrypted data keys an envelope may hold for Unwrap to try it.
    #[arg(long, env = "KMS_SIDECAR_MAX_ENCRYPTED_DATA_KEYS", default_value_t = 4)]
    pub max_encrypted_data_keys: usize,

    /// Largest serialized encryption context, in bytes (at most 16384).
    #[arg(
        long,
        env = "KMS_SIDECAR_MAX_ENCRYPTION_CONTEXT_BYTES",
        default_value_t = 8192
    )]
    pub max_encryption_context_bytes: usize,

    /// Timeout of one KMS operation, retries included (e.g. 5s, 500ms).
    #[arg(long, env = "KMS_SIDECAR_KMS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub kms_timeout: Duration,

    /// Attempts per KMS operation, the first included (1 = no retries).
    /// Retries use the AWS SDK's exponential backoff with full jitter and
    /// its retry budget.
    #[arg(long, env = "KMS_SIDECAR_KMS_MAX_ATTEMPTS", default_value_t = 4)]
    pub kms_max_attempts: u32,

    /// Upper bound of the first KMS retry's jittered delay; it doubles for
    /// each further retry (up to --kms-timeout).
    #[arg(long, env = "KMS_SIDECAR_KMS_INITIAL_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub kms_initial_backoff: Duration,

    /// Temporary AWS credentials (web identity / IRSA, SSO, container) are
    /// refreshed this long before they expire. Keep it well under their
    /// lifetime (STS issues at least 15 minutes).
    #[arg(long, env = "KMS_SIDECAR_CREDENTIALS_REFRESH_MARGIN", default_value = "5m", value_parser = parse_duration)]
    pub credentials_refresh_margin: Duration,

    /// Data-key cache (aws-kms keyring): how long a data key is reused, for
    /// Wrap (same key, same encryption context) and for Unwrap (same
    /// encrypted data key and context). 0 turns the cache off.
    #[arg(long, env = "KMS_SIDECAR_CACHE_MAX_AGE", default_value = "5m", value_parser = parse_duration)]
    pub cache_max_age: Duration,

    /// Data-key cache: most messages one cached data key may encrypt.
    #[arg(long, env = "KMS_SIDECAR_CACHE_MAX_MESSAGES", default_value_t = 10_000)]
    pub cache_max_messages: u64,

    /// Data-key cache: most plaintext bytes one cached data key may
    /// encrypt.
    #[arg(long, env = "KMS_SIDECAR_CACHE_MAX_BYTES", default_value_t = 1 << 30)]
    pub cache_max_bytes: u64,

    /// Data-key cache: most entries on each side (encrypt, decrypt); the
    /// least recently used entry is evicted first.
    #[arg(long, env = "KMS_SIDECAR_CACHE_CAPACITY", default_value_t = 1000)]
    pub cache_capacity: usize,

    /// Export traces and metrics over OpenTelemetry OTLP/gRPC; endpoint,
    /// sampling and interval from the standard OTEL_* variables
    /// (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, ...).
    #[arg(
        long,
        env = "KMS_SIDECAR_OTEL",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub otel: bool,

    /// Admin listener for Prometheus metrics (HTTP GET /metrics), as
    /// IP:PORT; off when unset.
    #[arg(long, env = "KMS_SIDECAR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Authorization policy (TOML): which callers (uid:N, gid:N on Unix
    /// sockets; SAN URI or dns:NAME with mTLS; anonymous) may use which
    /// keys for which operations.
    /// Without it every caller may do everything (a warning at start).
    #[arg(long, env = "KMS_SIDECAR_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Audit trail, one JSON line per key use: off, stdout, stderr, or a
    /// file path (appended, created with mode 0600).
    #[arg(long, env = "KMS_SIDECAR_AUDIT_LOG", default_value = "off")]
    pub audit_log: String,

    /// Key (32 bytes or more) for the keyed hash of encryption-context
    /// values in audit events; default: a random key per start (hashes
    /// then compare only within one run).
    #[arg(long, env = "KMS_SIDECAR_AUDIT_HASH_KEY_FILE")]
    pub audit_hash_key_file: Option<PathBuf>,

    /// Caller binding: Wrap adds the caller's identity (uid:N, SAN URI,
    /// dns:NAME, anonymous) to the envelope's encryption context as
    /// "kms-sidecar:caller", and Unwrap opens only envelopes bound to the
    /// calling identity, so one tenant's envelope cannot be unwrapped
    /// through another's.
    #[arg(
        long,
        env = "KMS_SIDECAR_BIND_CALLER",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub bind_caller: bool,

    /// TLS on the TCP listeners: server certificate chain (PEM, leaf
    /// first). Needs --tls-key. Unix sockets are never wrapped in TLS.
    #[arg(long, env = "KMS_SIDECAR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "KMS_SIDECAR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: CA certificates (PEM) that TCP clients' certificates
    /// must chain to; clients without one are refused. Their SAN URI
    /// (SPIFFE ID) and DNS names identify them to the policy.
    #[arg(long, env = "KMS_SIDECAR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes; changed files are
    /// loaded without a restart (a file that does not load keeps the
    /// previous ones in use).
    #[arg(long, env = "KMS_SIDECAR_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// Group (numeric gid) that owns Unix sockets; default: the process's.
    #[arg(long, env = "KMS_SIDECAR_UNIX_SOCKET_GROUP")]
    pub unix_socket_group: Option<u32>,

    /// Permission bits of Unix sockets, in octal.
    #[arg(long, env = "KMS_SIDECAR_UNIX_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    pub unix_socket_mode: u32,

    /// Most WrapStream/UnwrapStream calls in progress at once; more are
    /// refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "KMS_SIDECAR_MAX_CONCURRENT_STREAMS", default_value_t = 64)]
    pub max_concurrent_streams: usize,

    /// Streaming: longest wait for the first request message.
    #[arg(long, env = "KMS_SIDECAR_STREAM_FIRST_MESSAGE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub stream_first_message_timeout: Duration,

    /// Streaming: longest wait for each further request message.
    #[arg(long, env = "KMS_SIDECAR_STREAM_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,

    /// Streaming: longest wait for the client to read pending output; a
    /// client that writes everything before reading gets RESOURCE_EXHAUSTED
    /// after this.
    #[arg(long, env = "KMS_SIDECAR_STREAM_STALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub stream_stall_timeout: Duration,

    /// After SIGTERM/SIGINT: how long to keep serving (readiness already
    /// NOT_SERVING) so that the application can finish its own shutdown.
    #[arg(long, env = "KMS_SIDECAR_DRAIN_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub drain_window: Duration,

    /// The drain ends early once no KeyService call has been in progress
    /// for this long (the application is gone).
    #[arg(long, env = "KMS_SIDECAR_DRAIN_QUIET_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub drain_quiet_period: Duration,

    /// How long to wait for in-flight calls after the drain, before exiting.
    #[arg(long, env = "KMS_SIDECAR_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// One address to serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix domain socket at this path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// The keyring to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyringConfig {
    /// Local raw AES keyring.
    Local {
        /// Key file path.
        key_file: PathBuf,
        /// Provider namespace.
        namespace: String,
        /// Key name.
        name: String,
    },
    /// AWS KMS keyring over these keys (default first).
    AwsKms {
        /// As configured (ARN, key ID or alias).
        key_ids: Vec<String>,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to serve.
    pub listen: Vec<ListenAddr>,
    /// Which keys.
    pub keyring: KeyringConfig,
    /// Service limits and envelope parameters.
    pub service: ServiceConfig,
    /// KMS timeout, retries and credential refresh.
    pub kms: KmsSettings,
    /// Unix socket permission bits.
    pub unix_socket_mode: u32,
    /// Unix socket group.
    pub unix_socket_group: Option<u32>,
    /// Shutdown phases.
    pub shutdown: ShutdownConfig,
    /// Authorization policy file.
    pub policy_file: Option<PathBuf>,
    /// Where to serve /metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Export over OTLP.
    pub otel: bool,
    /// Where audit events go.
    pub audit: AuditSink,
    /// Key of the audit trail's keyed hash.
    pub audit_hash_key_file: Option<PathBuf>,
    /// Bind envelopes to the identity of the caller that wrapped them.
    pub bind_caller: bool,
    /// TLS (and mTLS) on TCP listeners.
    pub tls: Option<crate::tls::TlsFiles>,
    /// How often the TLS files are checked for changes.
    pub tls_reload_interval: Duration,
}

impl std::fmt::Display for Config {
    /// The effective configuration as a configuration file (nothing in it
    /// is secret: the local key file's path is shown, never its content).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list(items: impl Iterator<Item = String>) -> String {
            let quoted: Vec<String> = items.map(|i| format!("{i:?}")).collect();
            format!("[{}]", quoted.join(", "))
        }
        fn dur(d: Duration) -> String {
            format!("\"{}ms\"", d.as_millis())
        }
        writeln!(f, "# kms-sidecar effective configuration")?;
        writeln!(
            f,
            "listen = {}",
            list(self.listen.iter().map(ToString::to_string))
        )?;
        match &self.keyring {
            KeyringConfig::Local {
                key_file,
                namespace,
                name,
            } => {
                writeln!(f, "keyring = \"local\"")?;
                writeln!(f, "local-key-file = {:?}", key_file.display().to_string())?;
                writeln!(f, "local-key-namespace = {namespace:?}")?;
                writeln!(f, "local-key-name = {name:?}")?;
            }
            KeyringConfig::AwsKms { key_ids } => {
                writeln!(f, "keyring = \"aws-kms\"")?;
                writeln!(f, "key-id = {}", list(key_ids.iter().cloned()))?;
            }
        }
        let svc = &self.service;
        writeln!(f, "frame-length = {}", svc.frame_length)?;
        writeln!(f, "max-message-bytes = {}", svc.max_message_bytes)?;
        writeln!(f, "max-inflight-bytes = {}", svc.max_inflight_bytes)?;
        writeln!(f, "max-connections = {}", svc.max_connections)?;
        writeln!(
            f,
            "health-probe-interval = {}",
            dur(svc.health_probe_interval.unwrap_or(Duration::ZERO))
        )?;
        writeln!(
            f,
            "max-encrypted-data-keys = {}",
            svc.limits.max_encrypted_data_keys
        )?;
        writeln!(
            f,
            "max-encryption-context-bytes = {}",
            svc.limits.max_context_bytes
        )?;
        writeln!(f, "kms-timeout = {}", dur(self.kms.timeout))?;
        writeln!(f, "kms-max-attempts = {}", self.kms.max_attempts)?;
        writeln!(f, "kms-initial-backoff = {}", dur(self.kms.initial_backoff))?;
        writeln!(
            f,
            "credentials-refresh-margin = {}",
            dur(self.kms.credentials_refresh_margin)
        )?;
        let cache = &svc.cache;
        writeln!(f, "cache-max-age = {}", dur(cache.max_age))?;
        writeln!(f, "cache-max-messages = {}", cache.max_messages)?;
        writeln!(f, "cache-max-bytes = {}", cache.max_bytes)?;
        writeln!(f, "cache-capacity = {}", cache.capacity)?;
        writeln!(f, "request-timeout = {}", dur(svc.request_timeout))?;
        writeln!(f, "unix-socket-mode = \"{:o}\"", self.unix_socket_mode)?;
        if let Some(g) = self.unix_socket_group {
            writeln!(f, "unix-socket-group = {g}")?;
        }
        writeln!(f, "max-concurrent-streams = {}", svc.streams.max_concurrent)?;
        writeln!(
            f,
            "stream-first-message-timeout = {}",
            dur(svc.streams.first_message_timeout)
        )?;
        writeln!(f, "stream-idle-timeout = {}", dur(svc.streams.idle_timeout))?;
        writeln!(
            f,
            "stream-stall-timeout = {}",
            dur(svc.streams.stall_timeout)
        )?;
        writeln!(f, "drain-window = {}", dur(self.shutdown.drain_window))?;
        writeln!(
            f,
            "drain-quiet-period = {}",
            dur(self.shutdown.drain_quiet_period)
        )?;
        writeln!(f, "shutdown-timeout = {}", dur(self.shutdown.timeout))?;
        writeln!(f, "otel = {}", self.otel)?;
        if let Some(a) = &self.metrics_listen {
            writeln!(f, "metrics-listen = \"{a}\"")?;
        }
        if let Some(p) = &self.policy_file {
            writeln!(f, "policy-file = {:?}", p.display().to_string())?;
        }
        let audit = match &self.audit {
            AuditSink::Off => "off".to_owned(),
            AuditSink::Stdout => "stdout".to_owned(),
            AuditSink::Stderr => "stderr".to_owned(),
            AuditSink::File(p) => p.display().to_string(),
        };
        writeln!(f, "audit-log = {audit:?}")?;
        if let Some(p) = &self.audit_hash_key_file {
            writeln!(f, "audit-hash-key-file = {:?}", p.display().to_string())?;
        }
        writeln!(f, "bind-caller = {}", self.bind_caller)?;
        if let Some(tls) = &self.tls {
            writeln!(f, "tls-cert = {:?}", tls.cert.display().to_string())?;
            writeln!(f, "tls-key = {:?}", tls.key.display().to_string())?;
            if let Some(ca) = &tls.client_ca {
                writeln!(f, "tls-client-ca = {:?}", ca.display().to_string())?;
            }
            writeln!(f, "tls-reload-interval = {}", dur(self.tls_reload_interval))?;
        }
        Ok(())
    }
}

/// What happens after SIGTERM: serve on through the drain (readiness
/// NOT_SERVING), stop accepting, wait for in-flight calls, exit.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownConfig {
    /// Longest drain.
    pub drain_window: Duration,
    /// Quiet time that ends the drain early.
    pub drain_quiet_period: Duration,
    /// Bound on waiting for in-flight calls after the drain.
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_window: Duration::from_secs(30),
            drain_quiet_period: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the gRPC service needs to know.
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfig {
    /// Bounds on untrusted envelopes and contexts.
    pub limits: EnvelopeLimits,
    /// Frame length of written envelopes.
    pub frame_length: u32,
    /// Largest gRPC message in either direction.
    pub max_message_bytes: usize,
    /// Streaming call limits.
    pub streams: StreamConfig,
    /// Unary request bytes in progress at once.
    pub max_inflight_bytes: usize,
    /// Client connections open at once, over all listeners.
    pub max_connections: usize,
    /// Bound on a unary call, from its first byte to its reply.
    pub request_timeout: Duration,
    /// Interval of the deep health probe (a real data key round trip on
    /// the default key) that drives the KeyService health status; `None`
    /// disables it.
    pub health_probe_interval: Option<Duration>,
    /// Data-key cache limits (used with the aws-kms keyring).
    pub cache: CacheConfig,
}

impl ServiceConfig {
    /// Largest plaintext unary Wrap accepts.
    ///
    /// The 64 KiB reserve covers the largest header and the frame overhead
    /// of frames of 4 KiB or more (32 bytes per frame); smaller frames cost
    /// proportionally more room.
    pub fn max_wrap_plaintext(&self) -> usize {
        let room = self.max_message_bytes.saturating_sub(UNARY_REPLY_RESERVE);
        let frame = self.frame_length as usize;
        if frame >= 4096 {
            room
        } else {
            room / (frame + 32) * frame
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            limits: EnvelopeLimits::default(),
            frame_length: 65536,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            streams: StreamConfig::default(),
            max_inflight_bytes: 64 * 1024 * 1024,
            max_connections: 1024,
            health_probe_interval: Some(Duration::from_secs(30)),
            request_timeout: Duration::from_secs(30),
            cache: CacheConfig::default(),
        }
    }
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("invalid duration {s:?}: use e.g. 500ms, 5s or 2m")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("invalid mode {s:?}: use octal permission bits such as 660"))
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(format!(
                "invalid listen address {s:?}: use unix:///absolute/path.sock"
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!(
            "invalid listen address {s:?}: use IP:PORT (e.g. 127.0.0.1:50051; host names are not \
             resolved) or unix:///absolute/path.sock"
        )
    })
}

fn default_key_file() -> Result<PathBuf, String> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .ok_or("no HOME or XDG_DATA_HOME to keep the local key in: set --local-key-file")?;
    Ok(base.join("kms-sidecar").join("local-key"))
}

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(a: Args) -> Result<Self, String> {
        let listen = a
            .listen
            .iter()
            .map(|s| parse_listen(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err("at least one --listen address is needed".into());
        }
        let keyring = match a.keyring {
            KeyringKind::Local => {
                if !a.key_ids.is_empty() {
                    return Err("--key-id needs --keyring aws-kms (the local keyring has one key, named by --local-key-name)".into());
                }
                if a.local_key_namespace.is_empty() || a.local_key_name.is_empty() {
                    return Err(
                        "--local-key-namespace and --local-key-name must not be empty".into(),
                    );
                }
                KeyringConfig::Local {
                    key_file: match a.local_key_file {
                        Some(p) => p,
                        None => default_key_file()?,
                    },
                    namespace: a.local_key_namespace,
                    name: a.local_key_name,
                }
            }
            KeyringKind::AwsKms => {
                let key_ids: Vec<String> = a
                    .key_ids
                    .into_iter()
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .collect();
                if key_ids.is_empty() {
                    return Err(
                        "--keyring aws-kms needs at least one --key-id (a key ARN is best)".into(),
                    );
                }
                KeyringConfig::AwsKms { key_ids }
            }
        };
        if !(1024..=MAX_FRAME_LENGTH).contains(&a.frame_length) {
            return Err(format!(
                "--frame-length {} is out of range: use 1024 to {MAX_FRAME_LENGTH}",
                a.frame_length
            ));
        }
        if a.max_message_bytes < DEFAULT_MAX_MESSAGE_BYTES {
            return Err(format!(
                "--max-message-bytes {} is too small: use at least {DEFAULT_MAX_MESSAGE_BYTES} \
                 (streamed replies carry up to about 2 MiB)",
                a.max_message_bytes
            ));
        }
        if a.max_encrypted_data_keys == 0 || a.max_encrypted_data_keys > 65535 {
            return Err("--max-encrypted-data-keys must be 1 to 65535".into());
        }
        if a.max_encryption_context_bytes > 16 * 1024 {
            // Keeps the worst-case header inside UNARY_REPLY_RESERVE.
            return Err("--max-encryption-context-bytes must be at most 16384".into());
        }
        for (name, d) in [
            ("--kms-timeout", a.kms_timeout),
            ("--request-timeout", a.request_timeout),
            (
                "--stream-first-message-timeout",
                a.stream_first_message_timeout,
            ),
            ("--stream-idle-timeout", a.stream_idle_timeout),
            ("--stream-stall-timeout", a.stream_stall_timeout),
            ("--tls-reload-interval", a.tls_reload_interval),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        if a.max_inflight_bytes < 2 * a.max_message_bytes + 64 * 1024 {
            return Err(format!(
                "--max-inflight-bytes {} must be at least twice --max-message-bytes {} plus \
                 64 KiB (a call reserves room for its request and its reply)",
                a.max_inflight_bytes, a.max_message_bytes
            ));
        }
        if a.kms_max_attempts == 0 || a.kms_max_attempts > 10 {
            return Err("--kms-max-attempts must be 1 to 10".into());
        }
        if a.cache_capacity == 0 || a.cache_max_messages == 0 || a.cache_max_bytes == 0 {
            return Err(
                "--cache-capacity, --cache-max-messages and --cache-max-bytes must be positive \
                 (turn the cache off with --cache-max-age 0)"
                    .into(),
            );
        }
        if a.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        if a.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(Self {
            listen,
            keyring,
            service: ServiceConfig {
                limits: EnvelopeLimits {
                    max_encrypted_data_keys: a.max_encrypted_data_keys,
                    max_context_bytes: a.max_encryption_context_bytes,
                },
                frame_length: a.frame_length,
                max_message_bytes: a.max_message_bytes,
                max_inflight_bytes: a.max_inflight_bytes,
                max_connections: a.max_connections,
                request_timeout: a.request_timeout,
                health_probe_interval: (!a.health_probe_interval.is_zero())
                    .then_some(a.health_probe_interval),
                streams: StreamConfig {
                    max_concurrent: a.max_concurrent_streams,
                    first_message_timeout: a.stream_first_message_timeout,
                    idle_timeout: a.stream_idle_timeout,
                    stall_timeout: a.stream_stall_timeout,
                },
                cache: CacheConfig {
                    max_age: a.cache_max_age,
                    max_messages: a.cache_max_messages,
                    max_bytes: a.cache_max_bytes,
                    capacity: a.cache_capacity,
                },
            },
            kms: KmsSettings {
                timeout: a.kms_timeout,
                max_attempts: a.kms_max_attempts,
                initial_backoff: a.kms_initial_backoff,
                credentials_refresh_margin: a.credentials_refresh_margin,
            },
            unix_socket_mode: a.unix_socket_mode,
            unix_socket_group: a.unix_socket_group,
            shutdown: ShutdownConfig {
                drain_window: a.drain_window,
                drain_quiet_period: a.drain_quiet_period,
                timeout: a.shutdown_timeout,
            },
            policy_file: a.policy_file,
            metrics_listen: a.metrics_listen,
            otel: a.otel,
            audit: match a.audit_log.trim() {
                "off" | "" => AuditSink::Off,
                "stdout" => AuditSink::Stdout,
                "stderr" => AuditSink::Stderr,
                path if path.starts_with('/') => AuditSink::File(PathBuf::from(path)),
                other => {
                    return Err(format!(
                        "invalid --audit-log {other:?}: use off, stdout, stderr or an absolute file path"
                    ));
                }
            },
            audit_hash_key_file: a.audit_hash_key_file,
            bind_caller: a.bind_caller,
            tls: match (a.tls_cert, a.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: a.tls_client_ca,
                }),
                (None, None) if a.tls_client_ca.is_none() => None,
                _ => {
                    return Err(
                        "--tls-cert and --tls-key go together (and --tls-client-ca needs both)"
                            .into(),
                    );
                }
            },
            tls_reload_interval: a.tls_reload_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration table lists every flag with its
    /// environment variable, and nothing else.
    #[test]
    fn readme_documents_every_flag() {
        use clap::CommandFactory;
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let mut documented = 0;
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version" | "config") {
                continue;
            }
            let env = arg
                .get_env()
                .and_then(|e| e.to_str())
                .unwrap_or_else(|| panic!("--{long} has no environment variable"));
            let row = format!("| `--{long}` | `{env}` |");
            assert!(
                readme.contains(&row),
                "README configuration table lacks {row}"
            );
            documented += 1;
        }
        let rows = readme.lines().filter(|l| l.starts_with("| `--")).count();
        assert_eq!(rows, documented, "README lists flags that do not exist");
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["kms-sidecar", "--local-key-file", "/tmp/k"];
        full.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(full).map_err(|e| e.to_string())?.serve)
    }

    #[test]
    fn defaults_are_zero_config() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.listen,
            vec![ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())]
        );
        assert!(matches!(c.keyring, KeyringConfig::Local { .. }));
        assert_eq!(c.service.max_wrap_plaintext(), 4_128_768);
    }

    #[test]
    fn listen_addresses_and_errors() {
        let c = parse(&["--listen", "127.0.0.1:1", "--listen", "unix:///run/k.sock"]).unwrap();
        assert_eq!(c.listen[1], ListenAddr::Unix("/run/k.sock".into()));
        assert!(
            parse(&["--listen", "unix://relative"])
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            parse(&["--listen", "nonsense"])
                .unwrap_err()
                .contains("IP:PORT")
        );
        assert!(
            parse(&["--keyring", "aws-kms"])
                .unwrap_err()
                .contains("--key-id")
        );
        assert!(
            parse(&["--frame-length", "10"])
                .unwrap_err()
                .contains("1024 to 1048576")
        );
    }

    #[test]
    fn client_subcommand_parses() {
        let cli = Cli::try_parse_from([
            "kms-sidecar",
            "client",
            "wrap",
            "-i",
            "in",
            "-o",
            "out",
            "-c",
            "a=b=c",
            "--frame-length",
            "128",
        ])
        .unwrap();
        let Some(Command::Client(ClientCommand::Wrap(w))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(w.io.context, vec![("a".to_owned(), "b=c".to_owned())]);
        assert_eq!(w.frame_length, 128);
        assert!(Cli::try_parse_from(["kms-sidecar", "client", "unwrap", "-c", "novalue"]).is_err());
    }

    #[test]
    fn config_file_fills_what_flags_and_env_leave_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kms-sidecar.toml");
        std::fs::write(
            &file,
            "frame-length = 8192\nlisten = [\"127.0.0.1:1\", \"unix:///tmp/x.sock\"]\nkms_timeout = \"2s\"\n",
        )
        .unwrap();
        let argv: Vec<std::ffi::OsString> = [
            "kms-sidecar",
            "--config",
            file.to_str().unwrap(),
            "--frame-length",
            "4096",
            "--local-key-file",
            "/tmp/k",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let merged = argv_with_config_file(argv).unwrap();
        let c = Config::try_from(Cli::try_parse_from(merged).unwrap().serve).unwrap();
        assert_eq!(c.service.frame_length, 4096, "the command line wins");
        assert_eq!(c.listen.len(), 2, "the file fills the rest");
        assert_eq!(c.kms.timeout, Duration::from_secs(2));
        // The effective configuration reads back as an equivalent file.
        let printed = c.to_string();
        std::fs::write(&file, &printed).unwrap();
        let again = argv_with_config_file(
            ["kms-sidecar", "--config", file.to_str().unwrap()]
                .iter()
                .map(Into::into)
                .collect(),
        )
        .unwrap();
        let c2 = Config::try_from(Cli::try_parse_from(again).unwrap().serve).unwrap();
        assert_eq!(c2.to_string(), printed);

        std::fs::write(&file, "no-such-option = 1\n").unwrap();
        let err = argv_with_config_file(
            ["kms-sidecar", "--config", file.to_str().unwrap()]
                .iter()
                .map(Into::into)
                .collect(),
        )
        .unwrap_err();
        assert!(err.contains("unknown setting \"no-such-option\""), "{err}");
        std::fs::write(&file, "frame-length = [[1]]\n").unwrap();
        assert!(
            argv_with_config_file(
                ["kms-sidecar", "check", "--config", file.to_str().unwrap()]
                    .iter()
                    .map(Into::into)
                    .collect(),
            )
            .is_err()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5h").is_err());
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("999").is_err());
    }
}
