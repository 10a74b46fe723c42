//! Caller identity and the authorization policy (issue: who may call, and
//! with which key): a Unix-socket caller identified by its uid and gid
//! (SO_PEERCRED), an anonymous TCP caller, allowed and denied paths for
//! every RPC, and no policy at all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::calls::{denied, flush, generate, unwrap, unwrap_stream, wrap, wrap_stream};
use common::{Sidecar, ctx, local_keyring, reason};
use kms_sidecar::access::{Access, Policy};
use kms_sidecar::config::{ListenAddr, ServiceConfig};
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{GenerateDataKeyRequest, UnwrapRequest, WrapRequest, WrapStreamRequest};
use tonic::Code;
use tonic::transport::Channel;

/// This process's uid and gid, as the kernel reports them for a file it
/// creates.
fn my_ids() -> (u32, u32) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let meta = file.as_file().metadata().unwrap();
    (meta.uid(), meta.gid())
}

struct Rig {
    sidecar: Sidecar,
    _dir: tempfile::TempDir,
    unix: Channel,
    tcp: Channel,
}

async fn rig(policy: Option<&str>) -> Rig {
    rig_with(policy, false).await
}

async fn rig_with(policy: Option<&str>, bind_caller: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let keyring_for_policy = local_keyring(3);
    let policy = match policy {
        Some(text) => Policy::parse(text, &keyring_for_policy).unwrap(),
        None => Policy::allow_all(),
    };
    let access = Access {
        policy,
        audit: None,
        bind_caller,
    };
    let sidecar = Sidecar::start_with_access(
        local_keyring(3),
        ServiceConfig::default(),
        &[ListenAddr::Unix(sock.clone())],
        access,
    )
    .await;
    let unix = kms_sidecar::client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let tcp = sidecar.channel().await;
    Rig {
        sidecar,
        _dir: dir,
        unix,
        tcp,
    }
}

/// A Unix-socket caller allowed to wrap and unwrap, an anonymous TCP caller
/// allowed only keys without plaintext: every RPC, both ways.
#[tokio::test]
async fn policy_allows_and_denies_every_rpc_per_identity() {
    let (uid, _) = my_ids();
    let policy = format!(
        r#"
[[allow]]
caller = "uid:{uid}"
operations = ["wrap", "unwrap", "generate-data-key-without-plaintext"]
keys = ["*"]

[[allow]]
caller = "anonymous"
operations = ["generate-data-key-without-plaintext"]
keys = ["local-key"]
"#
    );
    let r = rig(Some(&policy)).await;
    let me = format!("uid:{uid}");

    // The local user.
    let envelope = wrap(&r.unix).await.expect("uid may wrap");
    assert_eq!(unwrap(&r.unix, &envelope).await.unwrap(), b"data");
    let streamed = wrap_stream(&r.unix).await.expect("uid may WrapStream");
    assert_eq!(
        unwrap_stream(&r.unix, &streamed).await.unwrap(),
        b"streamed"
    );
    generate(&r.unix, true)
        .await
        .expect("without plaintext allowed");
    denied(generate(&r.unix, false).await, &me, "generate-data-key");
    denied(flush(&r.unix).await, &me, "admin");

    // The anonymous TCP caller.
    generate(&r.tcp, true)
        .await
        .expect("anonymous: without plaintext allowed");
    denied(
        generate(&r.tcp, false).await,
        "anonymous",
        "generate-data-key",
    );
    denied(wrap(&r.tcp).await, "anonymous", "wrap");
    denied(unwrap(&r.tcp, &envelope).await, "anonymous", "unwrap");
    denied(wrap_stream(&r.tcp).await, "anonymous", "wrap");
    denied(
        unwrap_stream(&r.tcp, &streamed).await,
        "anonymous",
        "unwrap",
    );
    denied(flush(&r.tcp).await, "anonymous", "admin");
    r.sidecar.stop().await;
}

/// The decision follows the uid and gid the kernel reports: a policy for
/// another uid denies this process; one for its gid allows it.
#[tokio::test]
async fn identity_is_the_peer_uid_and_gid() {
    let (uid, gid) = my_ids();
    let other = uid.wrapping_add(1);
    let r = rig(Some(&format!(
        "[[allow]]\ncaller = \"uid:{other}\"\noperations = \"*\"\nkeys = \"*\"\n"
    )))
    .await;
    denied(wrap(&r.unix).await, &format!("uid:{uid}"), "wrap");
    r.sidecar.stop().await;

    let r = rig(Some(&format!(
        "[[allow]]\ncaller = \"gid:{gid}\"\noperations = [\"wrap\"]\nkeys = [\"local-key\"]\n"
    )))
    .await;
    wrap(&r.unix).await.expect("gid rule allows");
    denied(wrap(&r.tcp).await, "anonymous", "wrap");
    r.sidecar.stop().await;
}

/// Without a policy, every caller may do everything (the current
/// behaviour; the sidecar warns at start).
#[tokio::test]
async fn without_a_policy_every_caller_is_allowed() {
    let r = rig(None).await;
    let envelope = wrap(&r.tcp).await.expect("anonymous may wrap");
    unwrap(&r.unix, &envelope).await.unwrap();
    generate(&r.tcp, false).await.unwrap();
    flush(&r.tcp).await.unwrap();
    r.sidecar.stop().await;
}

/// The envelope's context as the official format stores it (the header
/// is public), read through the sidecar's own parser.
fn header_context(envelope: &[u8]) -> Vec<(String, String)> {
    let parsed = kms_sidecar::envelope::parse_header(envelope, &Default::default())
        .unwrap()
        .unwrap();
    let mut pairs: Vec<_> = parsed.header.context.to_hash_map().into_iter().collect();
    pairs.sort();
    pairs
}

/// Caller binding (`--bind-caller`): Wrap records the caller's identity in
/// the envelope; only that identity unwraps it, on both paths; the
/// reserved key cannot be forged; an unbound envelope does not open.
#[tokio::test]
async fn bound_envelopes_open_only_for_their_caller() {
    let (uid, _) = my_ids();
    let me = format!("uid:{uid}");
    // Made without binding, by the same key.
    let plain = rig(None).await;
    let unbound = wrap(&plain.unix).await.unwrap();
    plain.sidecar.stop().await;

    let r = rig_with(None, true).await;
    let envelope = wrap(&r.unix).await.unwrap();
    assert_eq!(
        header_context(&envelope),
        [
            ("app".to_owned(), "a".to_owned()),
            ("kms-sidecar:caller".to_owned(), me.clone())
        ]
    );
    // The caller supplies only its own pairs.
    let reply = KeyServiceClient::new(r.unix.clone())
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("app", "a")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.plaintext, b"data");
    assert_eq!(
        reply.encryption_context.get("kms-sidecar:caller"),
        Some(&me)
    );
    let streamed = wrap_stream(&r.unix).await.unwrap();
    assert_eq!(
        unwrap_stream(&r.unix, &streamed).await.unwrap(),
        b"streamed"
    );

    // Another identity (the anonymous TCP caller): refused, both paths,
    // with a message that names the caller and not the owner.
    for result in [
        unwrap(&r.tcp, &envelope).await,
        unwrap_stream(&r.tcp, &streamed).await,
    ] {
        let status = result.expect_err("another identity");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(reason(&status), "CALLER_BINDING_MISMATCH");
        assert!(
            status.message().contains("anonymous may not unwrap")
                && status.message().contains("bound to another caller")
                && !status.message().contains(&me),
            "{}",
            status.message()
        );
    }
    // Supplying the owner's pair does not help.
    let forged = KeyServiceClient::new(r.tcp.clone())
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("app", "a"), ("kms-sidecar:caller", &me)]),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&forged), "CALLER_BINDING_MISMATCH");
    // The owner may not supply it either (the sidecar does).
    let owner = KeyServiceClient::new(r.unix.clone())
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("app", "a"), ("kms-sidecar:caller", &me)]),
        })
        .await
        .unwrap_err();
    assert_eq!(owner.code(), Code::InvalidArgument);
    assert!(owner.message().contains("reserved"), "{}", owner.message());
    // An envelope made without binding does not open.
    let status = unwrap(&r.unix, &unbound).await.unwrap_err();
    assert_eq!(reason(&status), "CALLER_BINDING_MISMATCH");
    assert!(
        status.message().contains("not bound"),
        "{}",
        status.message()
    );
    // Nobody may claim an identity on Wrap.
    let claim = KeyServiceClient::new(r.tcp.clone())
        .wrap(WrapRequest {
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[("kms-sidecar:caller", &me)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(claim.code(), Code::InvalidArgument);
    assert_eq!(reason(&claim), "INVALID_REQUEST");
    r.sidecar.stop().await;

    // Without binding, a bound envelope opens like any other: with its full
    // context supplied; and the key stays reserved on Wrap.
    let r = rig(None).await;
    let reply = KeyServiceClient::new(r.tcp.clone())
        .unwrap(UnwrapRequest {
            envelope: envelope.clone(),
            encryption_context: ctx(&[("app", "a"), ("kms-sidecar:caller", &me)]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.plaintext, b"data");
    let claim = KeyServiceClient::new(r.tcp.clone())
        .wrap(WrapRequest {
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[("kms-sidecar:caller", &me)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(claim.code(), Code::InvalidArgument);
    r.sidecar.stop().await;
}

/// Policy files with mistakes are refused at start with a message that
/// says what to write instead.
#[test]
fn policy_file_mistakes_are_explained() {
    let keyring = local_keyring(3);
    let cases = [
        (
            "[[allow]]\ncaller = \"*\"\noperations = [\"encrypt\"]\nkeys = \"*\"\n",
            "unknown operation \"encrypt\": use generate-data-key",
        ),
        (
            "[[allow]]\ncaller = \"*\"\noperations = \"*\"\nkeys = [\"other-key\"]\n",
            "key \"other-key\" is not one of the configured keys",
        ),
        (
            "[[allow]]\ncaller = \"user:1\"\noperations = \"*\"\nkeys = \"*\"\n",
            "invalid caller \"user:1\": use uid:N, gid:N, a SAN URI (spiffe://…), dns:NAME, anonymous or *",
        ),
        (
            "[[allow]]\ncaller = \"spiffe://td/ns/*/sa/x\"\noperations = \"*\"\nkeys = \"*\"\n",
            "a URI may end in /* (path prefix) but hold no other *",
        ),
        (
            "[[allow]]\ncaller = \"dns:*.svc\"\noperations = \"*\"\nkeys = \"*\"\n",
            "dns: needs one exact DNS name",
        ),
        (
            "[[allow]]\ncaller = \"*\"\noperations = \"*\"\nkey = \"*\"\n",
            "unknown field \"key\"",
        ),
        (
            "[[allow]]\ncaller = \"*\"\noperations = \"*\"\nkeys = [\"\"]\n",
            "an empty key name",
        ),
        (
            // A typo next to "*" is still a typo.
            "[[allow]]\ncaller = \"*\"\noperations = \"*\"\nkeys = [\"*\", \"lcoal-key\"]\n",
            "key \"lcoal-key\" is not one of the configured keys",
        ),
        (
            "[[allow]]\ncaller = \"*\"\noperations = \"*\"\nkeys = []\n",
            "\"keys\" is empty",
        ),
        (
            "[[allow]]\ncaller = \"spiffe://td/ns/app/../*\"\noperations = \"*\"\nkeys = \"*\"\n",
            "no . or .. path segments",
        ),
        ("[allow]\ncaller = \"*\"\n", "write [[allow]]"),
        ("[[deny]]\ncaller = \"*\"\n", "unknown key \"deny\""),
    ];
    for (text, expected) in cases {
        let err = Policy::parse(text, &keyring).unwrap_err();
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
}

/// The audit trail's events, parsed just enough: (caller, operation, code,
/// reason) of each line.
fn audit_events(path: &std::path::Path) -> Vec<(String, String, String, String)> {
    let field = |line: &str, name: &str| -> String {
        line.split(&format!("\"{name}\":\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_owned()
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            (
                field(l, "caller"),
                field(l, "operation"),
                field(l, "code"),
                field(l, "reason"),
            )
        })
        .collect()
}

/// Callers without any right are refused before they hold anything: no
/// stream slot (one slot here, and the allowed caller still gets it), no
/// look-up of the requested key (so the refusal lists no configured keys),
/// and every refusal is in the audit trail.
#[tokio::test]
async fn callers_without_rights_hold_nothing_and_learn_nothing() {
    let (uid, _) = my_ids();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let audit_file = dir.path().join("audit.jsonl");
    let keyring = local_keyring(3);
    let policy = Policy::parse(
        &format!(
            "[[allow]]\ncaller = \"uid:{uid}\"\noperations = [\"wrap\", \"unwrap\"]\nkeys = \"*\"\n"
        ),
        &keyring,
    )
    .unwrap();
    let access = Access {
        policy,
        audit: kms_sidecar::audit::Audit::open(
            &kms_sidecar::audit::AuditSink::File(audit_file.clone()),
            None,
        )
        .unwrap(),
        bind_caller: false,
    };
    let mut config = ServiceConfig::default();
    config.streams.max_concurrent = 1;
    let sidecar =
        Sidecar::start_with_access(keyring, config, &[ListenAddr::Unix(sock.clone())], access)
            .await;
    let unix = kms_sidecar::client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let tcp = sidecar.channel().await;

    // The anonymous TCP caller opens a WrapStream and sends nothing: refused
    // at once, so the one slot stays free for the allowed caller.
    let (_hold, rx) = tokio::sync::mpsc::channel::<WrapStreamRequest>(1);
    let refused = KeyServiceClient::new(tcp.clone())
        .wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    denied(refused, "anonymous", "wrap");
    assert!(wrap_stream(&unix).await.is_ok(), "the slot is free");

    // Asking for an unknown key: denied before the key is looked up.
    for key_id in ["no-such-key", ""] {
        let status = KeyServiceClient::new(tcp.clone())
            .wrap(WrapRequest {
                key_id: key_id.into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            !status.message().contains("local-key"),
            "no configured key named: {}",
            status.message()
        );
    }
    let status = KeyServiceClient::new(tcp.clone())
        .generate_data_key(GenerateDataKeyRequest {
            key_id: "no-such-key".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!status.message().contains("local-key"));
    denied(
        unwrap(&tcp, b"not even an envelope").await,
        "anonymous",
        "unwrap",
    );
    sidecar.stop().await;

    let events = audit_events(&audit_file);
    let anonymous: Vec<_> = events
        .iter()
        .filter(|e| e.0 == "anonymous")
        .map(|e| (e.1.as_str(), e.2.as_str(), e.3.as_str()))
        .collect();
    assert_eq!(
        anonymous,
        [
            ("WrapStream", "PERMISSION_DENIED", "CALLER_NOT_AUTHORIZED"),
            ("Wrap", "PERMISSION_DENIED", "CALLER_NOT_AUTHORIZED"),
            ("Wrap", "PERMISSION_DENIED", "CALLER_NOT_AUTHORIZED"),
            (
                "GenerateDataKey",
                "PERMISSION_DENIED",
                "CALLER_NOT_AUTHORIZED"
            ),
            ("Unwrap", "PERMISSION_DENIED", "CALLER_NOT_AUTHORIZED"),
        ]
    );
    assert!(
        events
            .iter()
            .any(|e| e.0 == format!("uid:{uid}") && e.1 == "WrapStream" && e.2 == "OK"),
        "{events:?}"
    );
}

/// A unary call dropped before it finished (here: the client's deadline
/// passed while KMS did not answer) still leaves its audit event, marked
/// CANCELLED / CALL_ABANDONED, although KMS was called.
#[tokio::test]
async fn abandoned_unary_calls_are_audited() {
    use common::kms_proxy::{Fault, KmsProxy};
    let arn = common::create_key(&common::kms_client()).await;
    let proxy = KmsProxy::start(&common::kms_server().endpoint).await;
    let keyring = common::production_keyring(
        &proxy.endpoint,
        &kms_sidecar::keyring::kms_client::KmsSettings::default(),
        std::slice::from_ref(&arn),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let audit_file = dir.path().join("audit.jsonl");
    let access = Access {
        policy: Policy::allow_all(),
        audit: kms_sidecar::audit::Audit::open(
            &kms_sidecar::audit::AuditSink::File(audit_file.clone()),
            None,
        )
        .unwrap(),
        bind_caller: false,
    };
    let sidecar = Sidecar::start_with_access(keyring, ServiceConfig::default(), &[], access).await;
    // KMS receives the call (the proxy records it) and never answers.
    proxy.inject(Some("GenerateDataKey"), Fault::BlackHole, None);
    let mut request = tonic::Request::new(WrapRequest {
        plaintext: b"x".to_vec(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = KeyServiceClient::new(sidecar.channel().await)
        .wrap(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    // The handler was dropped when the deadline passed; give the write a
    // moment, then look.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let events = loop {
        let events = audit_events(&audit_file);
        if !events.is_empty() || std::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        events,
        [(
            "anonymous".to_owned(),
            "Wrap".to_owned(),
            "CANCELLED".to_owned(),
            "CALL_ABANDONED".to_owned()
        )]
    );
    // (The deep health probe may have made one more.)
    assert!(
        proxy.count("GenerateDataKey") >= 1,
        "KMS was called: the event matters"
    );
    sidecar.stop().await;
}
