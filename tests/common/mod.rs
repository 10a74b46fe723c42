//! Test harness: a real KMS-protocol server (moto, from the test venv) and
//! in-process sidecars on port 0, reached through real gRPC clients.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};

pub mod calls;
pub mod kms_proxy;

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use kms_sidecar::config::{ListenAddr, ServiceConfig};
use kms_sidecar::keyring::kms_client::KmsSettings;
use kms_sidecar::keyring::{AwsKmsKeyring, Keyring, LocalKeyring};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::secret::WrappingKey;
use tonic::transport::Channel;

pub const REGION: &str = "us-east-1";

/// The moto server shared by every test of one test binary. Its stdin pipe
/// lives in this static; when the test process exits the pipe closes and
/// the server stops.
pub struct KmsServer {
    pub endpoint: String,
    _child: Child,
}

/// The Python interpreter of the test venv (made by tests/run.sh).
pub fn python() -> PathBuf {
    let path = std::env::var_os("KMS_SIDECAR_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "the test venv is missing ({}): run tests/run.sh, which installs it",
        path.display()
    );
    path
}

pub fn kms_server() -> &'static KmsServer {
    static SERVER: OnceLock<KmsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/kms_server.py");
        let mut child = Command::new(python())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start moto KMS server");
        let stdout = child.stdout.take().expect("moto stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read moto port");
        let port: u16 = line.trim().parse().expect("moto printed its port");
        KmsServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    })
}

/// An aws-sdk-kms client for the moto server, with dummy credentials.
pub fn kms_client() -> aws_sdk_kms::Client {
    kms_client_for(&kms_server().endpoint)
}

pub fn kms_client_for(endpoint: &str) -> aws_sdk_kms::Client {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(kms_sidecar::keyring::aws_kms::https_client())
        .timeout_config(
            aws_sdk_kms::config::timeout::TimeoutConfig::builder()
                .operation_timeout(std::time::Duration::from_secs(3))
                .build(),
        )
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// A KMS keyring built the way the sidecar builds it (SDK retries, timeouts,
/// credential refresh from [`KmsSettings`]), for `endpoint` with dummy
/// credentials.
pub async fn production_keyring(
    endpoint: &str,
    settings: &KmsSettings,
    key_ids: &[String],
) -> Keyring {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(kms_sidecar::keyring::aws_kms::https_client())
        .load()
        .await;
    let client = kms_sidecar::keyring::kms_client::build(&shared, settings, None);
    Keyring::AwsKms(
        AwsKmsKeyring::resolve(client, key_ids)
            .await
            .expect("resolve keys"),
    )
}

/// Creates a symmetric KMS key and returns its ARN.
pub async fn create_key(client: &aws_sdk_kms::Client) -> String {
    let out = client.create_key().send().await.expect("CreateKey");
    out.key_metadata.unwrap().arn.unwrap()
}

pub async fn kms_keyring(key_ids: &[String]) -> Keyring {
    Keyring::AwsKms(
        AwsKmsKeyring::resolve(kms_client(), key_ids)
            .await
            .expect("resolve keys"),
    )
}

pub fn local_keyring(byte: u8) -> Keyring {
    let key = WrappingKey::take_from(&mut [byte; 32]).unwrap();
    Keyring::Local(Box::new(
        LocalKeyring::new("kms-sidecar".into(), "local-key".into(), &key).unwrap(),
    ))
}

/// An in-process sidecar serving on its own listeners.
pub struct Sidecar {
    pub addrs: Vec<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Sidecar {
    pub async fn start(keyring: Keyring) -> Self {
        Self::start_with(keyring, ServiceConfig::default(), &[]).await
    }

    /// Serves on 127.0.0.1:0 plus any extra addresses.
    pub async fn start_with(keyring: Keyring, config: ServiceConfig, extra: &[ListenAddr]) -> Self {
        Self::start_with_access(
            keyring,
            config,
            extra,
            kms_sidecar::access::Access::default(),
        )
        .await
    }

    /// [`Self::start_with`] with a policy and an audit trail.
    pub async fn start_with_access(
        keyring: Keyring,
        config: ServiceConfig,
        extra: &[ListenAddr],
        access: kms_sidecar::access::Access,
    ) -> Self {
        let mut addrs = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
        addrs.extend_from_slice(extra);
        let listeners = kms_sidecar::server::bind(&addrs, 0o600, None)
            .await
            .unwrap();
        let addrs = listeners.iter().map(|l| l.local_addr()).collect();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kms_sidecar::server::serve_with(
            listeners,
            Arc::new(keyring),
            access,
            config,
            kms_sidecar::config::ShutdownConfig {
                drain_window: std::time::Duration::ZERO,
                ..Default::default()
            },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addrs,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addrs[0])
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A client with stock settings (4 MiB receive limit).
    pub async fn client(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel().await)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

pub fn ctx(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
