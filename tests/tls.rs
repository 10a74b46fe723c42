//! TLS and mutual TLS on the TCP listener of the real binary
//! (`--tls-cert`, `--tls-key`, `--tls-client-ca`), with certificates made
//! by openssl here: two client certificates (a SPIFFE ID and a DNS name)
//! allowed and denied per RPC by the policy, clients without a
//! certificate or with one from another CA refused, a plaintext client
//! refused, the client CA rotated without a restart, and the caller's
//! identity in the audit trail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::calls::{denied, flush, generate, unwrap, unwrap_stream, wrap, wrap_stream};
use common::{ctx, reason};
use kms_sidecar::proto::GenerateDataKeyRequest;
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const BILLING: &str = "spiffe://example.org/ns/billing/sa/api";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl on PATH");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: `name.pem` and `name.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

/// A leaf certificate `name.pem`/`name.key` issued by `ca`, with `san`
/// (openssl syntax) and the given extended key usage.
fn make_leaf(dir: &Path, ca: &str, name: &str, san: &str, usage: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        make_leaf(
            d,
            "ca",
            "server",
            "DNS:localhost,IP:127.0.0.1",
            "serverAuth",
        );
        make_leaf(d, "ca", "billing", &format!("URI:{BILLING}"), "clientAuth");
        make_leaf(d, "ca", "reports", "DNS:reports.internal", "clientAuth");
        make_leaf(d, "ca", "nameless", "email:x@example.org", "clientAuth");
        // Names a CA that lets tenants pick their SANs might sign.
        make_leaf(
            d,
            "ca",
            "posing",
            "DNS:Reports.Internal.,URI:uid:1000,URI:anonymous",
            "clientAuth",
        );
        make_leaf(
            d,
            "ca",
            "two-uris",
            &format!("URI:spiffe://example.org/ns/victim/sa/x,URI:{BILLING}"),
            "clientAuth",
        );
        make_leaf(
            d,
            "ca",
            "dot-dot",
            "URI:spiffe://example.org/ns/billing/../admin/sa/x",
            "clientAuth",
        );
        make_leaf(
            d,
            "other-ca",
            "rogue",
            &format!("URI:{BILLING}"),
            "clientAuth",
        );
        // The file the sidecar trusts for client certificates (rotated
        // below); clients keep trusting ca.pem for the server.
        std::fs::copy(d.join("ca.pem"), d.join("client-ca.pem")).unwrap();
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn endpoint(&self, port: u16, client: Option<&str>) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.dir.path(), "ca.pem")))
            .domain_name("localhost");
        if let Some(name) = client {
            tls = tls.identity(Identity::from_pem(
                read(self.dir.path(), &format!("{name}.pem")),
                read(self.dir.path(), &format!("{name}.key")),
            ));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .tls_config(tls)
            .unwrap()
    }

    /// A new connection as `client` (each call makes its own, so CA
    /// reloads apply).
    async fn channel(&self, port: u16, client: Option<&str>) -> Result<Channel, String> {
        self.endpoint(port, client)
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sidecar {
    _child: KillOnDrop,
    port: u16,
    audit: PathBuf,
}

async fn start(pki: &Pki, policy: &str) -> Sidecar {
    start_with(pki, policy, &[]).await
}

async fn start_with(pki: &Pki, policy: &str, extra: &[&str]) -> Sidecar {
    let port = free_port();
    let policy_file = pki.path("policy.toml");
    std::fs::write(&policy_file, policy).unwrap();
    let audit = pki.path("audit.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
        .env_clear()
        .env("RUST_LOG", "kms_sidecar=info")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--local-key-file")
        .arg(pki.path("local-key"))
        .arg("--tls-cert")
        .arg(pki.path("server.pem"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .arg("--tls-client-ca")
        .arg(pki.path("client-ca.pem"))
        .args(["--tls-reload-interval", "200ms"])
        .arg("--policy-file")
        .arg(&policy_file)
        .arg("--audit-log")
        .arg(&audit)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(pki.path("sidecar.log")).unwrap())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let started = std::time::Instant::now();
    loop {
        if let Ok(channel) = pki.channel(port, Some("billing")).await {
            let health = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await;
            if health.is_ok() {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sidecar not ready: {}",
            std::fs::read_to_string(pki.path("sidecar.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Sidecar {
        _child: child,
        port,
        audit,
    }
}

/// No connection, or a connection on which no call succeeds.
async fn refused(pki: &Pki, port: u16, client: Option<&str>) {
    match pki.channel(port, client).await {
        Err(_) => {}
        Ok(channel) => {
            // TLS 1.3: the client finishes its side before the server has
            // checked its certificate; the refusal arrives with the first
            // call.
            let status = wrap(&channel).await.expect_err("a refused client's call");
            assert_ne!(status.code(), Code::Ok);
            assert_ne!(status.code(), Code::PermissionDenied, "{status:?}");
        }
    }
}

#[tokio::test]
async fn mtls_identities_policy_refusals_ca_rotation_and_audit() {
    let pki = Pki::new();
    let policy = r#"
[[allow]]
caller = "spiffe://example.org/ns/billing/*"
operations = ["wrap", "unwrap", "generate-data-key-without-plaintext"]
keys = "*"

[[allow]]
caller = "dns:reports.internal"
operations = ["unwrap", "generate-data-key", "admin"]
keys = ["local-key"]
"#;
    let sidecar = start(&pki, policy).await;
    let port = sidecar.port;

    // The SPIFFE identity (matched by path prefix).
    let billing = pki.channel(port, Some("billing")).await.unwrap();
    let envelope = wrap(&billing).await.expect("billing may wrap");
    assert_eq!(unwrap(&billing, &envelope).await.unwrap(), b"data");
    let streamed = wrap_stream(&billing).await.expect("billing may WrapStream");
    assert_eq!(
        unwrap_stream(&billing, &streamed).await.unwrap(),
        b"streamed"
    );
    generate(&billing, true).await.expect("without plaintext");
    denied(
        generate(&billing, false).await,
        BILLING,
        "generate-data-key",
    );
    denied(flush(&billing).await, BILLING, "admin");

    // The DNS identity.
    let reports = pki.channel(port, Some("reports")).await.unwrap();
    let me = "dns:reports.internal";
    assert_eq!(unwrap(&reports, &envelope).await.unwrap(), b"data");
    assert_eq!(
        unwrap_stream(&reports, &streamed).await.unwrap(),
        b"streamed"
    );
    generate(&reports, false)
        .await
        .expect("reports may generate");
    flush(&reports).await.expect("reports may flush");
    denied(wrap(&reports).await, me, "wrap");
    denied(wrap_stream(&reports).await, me, "wrap");
    denied(
        generate(&reports, true).await,
        me,
        "generate-data-key-without-plaintext",
    );

    // A verified certificate without SAN URI or DNS name is anonymous.
    let nameless = pki.channel(port, Some("nameless")).await.unwrap();
    denied(wrap(&nameless).await, "anonymous", "wrap");

    // No certificate, another CA's certificate (same SPIFFE ID), plaintext
    // HTTP/2: refused before any call is served.
    refused(&pki, port, None).await;
    refused(&pki, port, Some("rogue")).await;
    let log = std::fs::read_to_string(pki.path("sidecar.log")).unwrap();
    assert!(
        log.matches("TLS handshake failed").count() >= 2,
        "the server refused both in the handshake: {log}"
    );
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(plain) = plain {
        let status = wrap(&plain).await.expect_err("plaintext client");
        assert_ne!(status.code(), Code::PermissionDenied, "{status:?}");
    }

    // The audit trail names the certificate identity and the peer.
    let audit = std::fs::read_to_string(&sidecar.audit).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains("\"operation\":\"Wrap\"") && l.contains("\"code\":\"OK\""))
        .unwrap_or_else(|| panic!("an audited wrap in {audit}"));
    assert!(
        line.contains(&format!("\"caller\":\"{BILLING}\"")),
        "{line}"
    );
    assert!(line.contains("\"peer\":\"127.0.0.1:"), "{line}");
    assert!(
        audit.contains("\"caller\":\"dns:reports.internal\""),
        "{audit}"
    );

    // Rotation: the client CA file is replaced by the other CA; new
    // connections follow within the reload interval, without a restart.
    let ca = pki.path("client-ca.pem");
    let staged = pki.path("client-ca.pem.new");
    std::fs::copy(pki.path("other-ca.pem"), &staged).unwrap();
    std::fs::rename(&staged, &ca).unwrap();
    let rotated = std::time::Instant::now();
    loop {
        let ok = match pki.channel(port, Some("rogue")).await {
            Ok(c) => wrap(&c).await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(10),
            "the new client CA was not loaded: {}",
            std::fs::read_to_string(pki.path("sidecar.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused(&pki, port, Some("billing")).await;

    // A broken file keeps the previous configuration in use.
    std::fs::write(&ca, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rogue = pki.channel(port, Some("rogue")).await.unwrap();
    wrap(&rogue).await.expect("previous CA still in use");
    let log = std::fs::read_to_string(pki.path("sidecar.log")).unwrap();
    assert!(
        log.contains("TLS files changed but do not load"),
        "the broken file is reported: {log}"
    );
}

/// `--bind-caller` with certificate identities: an envelope wrapped by the
/// SPIFFE identity opens for it and not for the DNS identity, although the
/// policy lets both unwrap with the key.
#[tokio::test]
async fn bind_caller_separates_certificate_identities() {
    let pki = Pki::new();
    let policy = r#"
[[allow]]
caller = "*"
operations = "*"
keys = "*"
"#;
    let sidecar = start_with(&pki, policy, &["--bind-caller"]).await;
    let billing = pki.channel(sidecar.port, Some("billing")).await.unwrap();
    let reports = pki.channel(sidecar.port, Some("reports")).await.unwrap();
    let envelope = wrap(&billing).await.unwrap();
    let streamed = wrap_stream(&billing).await.unwrap();
    assert_eq!(unwrap(&billing, &envelope).await.unwrap(), b"data");
    assert_eq!(
        unwrap_stream(&billing, &streamed).await.unwrap(),
        b"streamed"
    );
    for result in [
        unwrap(&reports, &envelope).await,
        unwrap_stream(&reports, &streamed).await,
    ] {
        let status = result.expect_err("another tenant");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(reason(&status), "CALLER_BINDING_MISMATCH");
        assert!(
            status
                .message()
                .contains("dns:reports.internal may not unwrap"),
            "{}",
            status.message()
        );
    }
    // The reports identity's own envelopes are its own.
    let theirs = wrap(&reports).await.unwrap();
    assert_eq!(unwrap(&reports, &theirs).await.unwrap(), b"data");
    assert_eq!(
        unwrap(&billing, &theirs).await.map_err(|s| reason(&s)),
        Err("CALLER_BINDING_MISMATCH".to_owned())
    );
}

/// TLS flags that do not go together are refused at start with a message
/// that says what is missing.
#[test]
fn tls_flag_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
            .env_clear()
            .arg("--local-key-file")
            .arg(dir.path().join("local-key"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--tls-cert".as_ref(), missing.as_os_str()]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = run(&[
        "--tls-cert".as_ref(),
        missing.as_os_str(),
        "--tls-key".as_ref(),
        missing.as_os_str(),
    ]);
    assert!(
        err.contains("cannot read TLS certificate") && err.contains("missing.pem"),
        "{err}"
    );
}

/// A certificate has one identity, the same for the policy, caller binding
/// and the audit trail: URIs that are not `scheme://` identities (`uid:1000`,
/// `anonymous`) are ignored, so they never pose as Unix or anonymous
/// callers; DNS names are compared lower-case; two identity URIs, or a URI
/// with `..` segments, leave the certificate without identity (anonymous).
#[tokio::test]
async fn a_certificate_has_one_unambiguous_identity() {
    let pki = Pki::new();
    let policy = format!(
        r#"
[[allow]]
caller = "dns:reports.internal"
operations = ["wrap", "unwrap"]
keys = "*"

[[allow]]
caller = "spiffe://example.org/ns/billing/*"
operations = ["wrap", "unwrap"]
keys = "*"

[[allow]]
caller = "{BILLING}"
operations = ["generate-data-key"]
keys = "*"
"#
    );
    let sidecar = start_with(&pki, &policy, &["--bind-caller"]).await;
    let posing = pki.channel(sidecar.port, Some("posing")).await.unwrap();
    let reports = pki.channel(sidecar.port, Some("reports")).await.unwrap();

    // "posing" is dns:reports.internal (its URIs are not identities): it
    // binds as that name, and "reports" opens what it wrapped.
    let envelope = wrap(&posing).await.unwrap();
    let parsed = kms_sidecar::envelope::parse_header(&envelope, &Default::default())
        .unwrap()
        .unwrap();
    assert_eq!(
        parsed.header.context.get("kms-sidecar:caller"),
        Some("dns:reports.internal")
    );
    assert_eq!(unwrap(&reports, &envelope).await.unwrap(), b"data");

    // Ambiguous or path-escaping URIs: anonymous, denied by name.
    for cert in ["two-uris", "dot-dot"] {
        let channel = pki.channel(sidecar.port, Some(cert)).await.unwrap();
        denied(wrap(&channel).await, "anonymous", "wrap");
    }

    // The reserved context key cannot be set through GenerateDataKey
    // either: a data key made with it would let its holder build an
    // envelope bound to another identity.
    let billing = pki.channel(sidecar.port, Some("billing")).await.unwrap();
    let status = KeyServiceClient::new(billing)
        .generate_data_key(GenerateDataKeyRequest {
            encryption_context: ctx(&[("kms-sidecar:caller", "dns:reports.internal")]),
            ..Default::default()
        })
        .await
        .expect_err("reserved key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_REQUEST");

    let audit = std::fs::read_to_string(&sidecar.audit).unwrap();
    let callers: Vec<&str> = audit
        .lines()
        .filter_map(|l| l.split("\"caller\":\"").nth(1)?.split('"').next())
        .collect();
    assert!(callers.contains(&"dns:reports.internal"), "{callers:?}");
    assert!(
        !callers.contains(&"uid:1000"),
        "no certificate is audited as a Unix caller: {callers:?}"
    );
}
