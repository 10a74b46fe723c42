//! Who is calling, and may they: caller identities and the authorization
//! policy.
//!
//! - On a Unix socket the caller is the peer process's uid and gid, from
//!   the kernel (`SO_PEERCRED`), which the caller cannot forge.
//! - On TCP with mutual TLS (`--tls-client-ca`) the caller is named by its
//!   verified client certificate: its SAN URIs (SPIFFE IDs) and DNS names.
//! - Otherwise (plain TCP, TLS without client certificates, or a client
//!   certificate without SAN URI or DNS name) the caller is anonymous (the
//!   remote address is kept for the audit trail only; addresses are not
//!   identities).
//!
//! A policy file (`--policy-file`, TOML) lists what each identity may do:
//!
//! ```toml
//! [[allow]]
//! caller = "uid:1000"                 # uid:N, gid:N, anonymous, or "*";
//!                                     # mTLS: "spiffe://td/ns/app/sa/web",
//!                                     # "spiffe://td/ns/app/*" (path prefix),
//!                                     # or "dns:web.app.svc"
//! operations = ["wrap", "unwrap"]     # or "*"
//! keys = ["arn:aws:kms:…:key/…"]      # configured keys (ID, ARN, alias), or "*"
//! ```
//!
//! With a policy, everything no rule allows is denied. Without one, every
//! caller may do everything, and the sidecar says so at start.

use std::collections::HashSet;
use std::path::Path;

use crate::envelope::EncryptionContext;
use crate::error::Error;
use crate::keyring::Keyring;

/// The identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A local process on a Unix socket.
    Unix {
        /// Its user ID.
        uid: u32,
        /// Its group ID.
        gid: u32,
    },
    /// A TCP client with a verified certificate (mutual TLS).
    Certificate {
        /// Its SAN URIs (SPIFFE IDs).
        uris: Vec<String>,
        /// Its SAN DNS names.
        dns: Vec<String>,
        /// The remote address (for the audit trail).
        peer: Option<String>,
    },
    /// No verified identity (TCP).
    Anonymous {
        /// The remote address, if known (for the audit trail).
        peer: Option<String>,
    },
}

impl Caller {
    /// The caller of `request`, from its connection.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        if let Some(info) = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            && let Some(cred) = info.peer_cred
        {
            return Self::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
            };
        }
        let peer = request.remote_addr().map(|a| a.to_string());
        let leaf = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(tonic::transport::server::TlsConnectInfo::peer_certs);
        if let Some(certs) = leaf
            && let Some(leaf) = certs.first()
        {
            let names = crate::tls::peer_names(leaf);
            if !names.uris.is_empty() || !names.dns.is_empty() {
                return Self::Certificate {
                    uris: names.uris,
                    dns: names.dns,
                    peer,
                };
            }
        }
        Self::Anonymous { peer }
    }

    /// The identity as policies and messages name it: `uid:1000`,
    /// the certificate's first SAN URI, `dns:NAME`, or `anonymous`.
    pub fn label(&self) -> String {
        match self {
            Self::Unix { uid, .. } => format!("uid:{uid}"),
            Self::Certificate { uris, dns, .. } => uris
                .first()
                .cloned()
                .unwrap_or_else(|| format!("dns:{}", dns.first().map_or("", String::as_str))),
            Self::Anonymous { .. } => "anonymous".to_owned(),
        }
    }

    /// The remote address of a TCP caller.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Self::Certificate { peer, .. } | Self::Anonymous { peer } => peer.as_deref(),
            Self::Unix { .. } => None,
        }
    }
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// GenerateDataKey returning the plaintext key.
    GenerateDataKey,
    /// GenerateDataKey with `without_plaintext`.
    GenerateDataKeyWithoutPlaintext,
    /// Wrap and WrapStream.
    Wrap,
    /// Unwrap and UnwrapStream.
    Unwrap,
    /// The AdminService.
    Admin,
}

impl Operation {
    const ALL: [Self; 5] = [
        Self::GenerateDataKey,
        Self::GenerateDataKeyWithoutPlaintext,
        Self::Wrap,
        Self::Unwrap,
        Self::Admin,
    ];

    /// The name used in policy files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::GenerateDataKey => "generate-data-key",
            Self::GenerateDataKeyWithoutPlaintext => "generate-data-key-without-plaintext",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Uid(u32),
    Gid(u32),
    /// A SAN URI, exactly.
    Uri(String),
    /// SAN URIs under a path prefix (the rule's `…/*` without the `*`).
    UriPrefix(String),
    /// A SAN DNS name, exactly (ASCII case-insensitive).
    Dns(String),
    Anonymous,
    Anyone,
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    operations: HashSet<Operation>,
    /// Canonical key IDs; `None` = every configured key.
    keys: Option<HashSet<String>>,
}

/// The authorization policy; `None` inside means no policy (allow all).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Option<Vec<Rule>>,
}

impl Policy {
    /// No policy: every caller may do everything.
    pub fn allow_all() -> Self {
        Self { rules: None }
    }

    /// Whether a policy is in force.
    pub fn is_enforced(&self) -> bool {
        self.rules.is_some()
    }

    /// Reads a policy file; key names are resolved against `keyring`.
    ///
    /// # Errors
    /// A one-line message naming the file and what is wrong in it.
    pub fn load(path: &Path, keyring: &Keyring) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        Self::parse(&text, keyring).map_err(|e| format!("policy file {}: {e}", path.display()))
    }

    /// Parses policy text (see the module documentation).
    ///
    /// # Errors
    /// What is wrong, naming the rule.
    pub fn parse(text: &str, keyring: &Keyring) -> Result<Self, String> {
        let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
        let mut rules = Vec::new();
        for (name, value) in &table {
            if name != "allow" {
                return Err(format!("unknown key {name:?}: use [[allow]] tables"));
            }
            let list = value
                .as_array()
                .ok_or("\"allow\" must be a list of tables: write [[allow]]")?;
            for (i, item) in list.iter().enumerate() {
                let n = i + 1;
                let rule = item
                    .as_table()
                    .ok_or_else(|| format!("rule {n} is not a table"))?;
                rules.push(parse_rule(rule, keyring).map_err(|e| format!("rule {n}: {e}"))?);
            }
        }
        Ok(Self { rules: Some(rules) })
    }

    /// May `caller` do `operation` with `key` (canonical ID; `None` for
    /// operations without a key)?
    pub fn allows(&self, caller: &Caller, operation: Operation, key: Option<&str>) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        rules.iter().any(|rule| {
            let who = match (&rule.who, caller) {
                (Who::Anyone, _) => true,
                (Who::Uid(u), Caller::Unix { uid, .. }) => u == uid,
                (Who::Gid(g), Caller::Unix { gid, .. }) => g == gid,
                (Who::Uri(want), Caller::Certificate { uris, .. }) => uris.contains(want),
                (Who::UriPrefix(prefix), Caller::Certificate { uris, .. }) => {
                    uris.iter().any(|u| u.starts_with(prefix.as_str()))
                }
                (Who::Dns(want), Caller::Certificate { dns, .. }) => {
                    dns.iter().any(|d| d.eq_ignore_ascii_case(want))
                }
                (Who::Anonymous, Caller::Anonymous { .. }) => true,
                _ => false,
            };
            let key_ok = match (&rule.keys, key) {
                (None, _) | (Some(_), None) => true,
                (Some(keys), Some(k)) => keys.contains(k),
            };
            who && rule.operations.contains(&operation) && key_ok
        })
    }

    /// [`Self::allows`], as a result.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] naming the caller, the operation and the
    /// key ID.
    pub fn check(
        &self,
        caller: &Caller,
        operation: Operation,
        key: Option<&str>,
    ) -> Result<(), Error> {
        if self.allows(caller, operation, key) {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            caller: caller.label(),
            operation: operation.name(),
            key_id: key.map(str::to_owned),
        })
    }
}

fn strings<'a>(rule: &'a toml::Table, field: &str) -> Result<Vec<&'a str>, String> {
    let value = rule
        .get(field)
        .ok_or_else(|| format!("missing {field:?}"))?;
    match value {
        toml::Value::String(s) => Ok(vec![s.as_str()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{field:?} must hold strings"))
            })
            .collect(),
        _ => Err(format!("{field:?} must be a string or a list of strings")),
    }
}

fn parse_rule(rule: &toml::Table, keyring: &Keyring) -> Result<Rule, String> {
    for field in rule.keys() {
        if !matches!(field.as_str(), "caller" | "operations" | "keys") {
            return Err(format!(
                "unknown field {field:?}: use caller, operations and keys"
            ));
        }
    }
    let caller = strings(rule, "caller")?;
    let [caller] = caller.as_slice() else {
        return Err("\"caller\" must be one identity".into());
    };
    let who = match *caller {
        "*" => Who::Anyone,
        "anonymous" => Who::Anonymous,
        other => {
            let parse_id = |s: &str| {
                s.parse::<u32>().map_err(|_| {
                    format!("invalid caller {other:?}: use uid:N, gid:N, anonymous or *")
                })
            };
            if let Some(n) = other.strip_prefix("uid:") {
                Who::Uid(parse_id(n)?)
            } else if let Some(n) = other.strip_prefix("gid:") {
                Who::Gid(parse_id(n)?)
            } else if let Some(name) = other.strip_prefix("dns:") {
                if name.is_empty() || name.contains('*') {
                    return Err(format!(
                        "invalid caller {other:?}: dns: needs one exact DNS name"
                    ));
                }
                Who::Dns(name.to_owned())
            } else if let Some((scheme, rest)) = other.split_once("://") {
                if scheme.is_empty() || rest.is_empty() {
                    return Err(format!(
                        "invalid caller {other:?}: a URI needs a scheme and a path"
                    ));
                }
                match other.strip_suffix('*') {
                    Some(prefix) if prefix.ends_with('/') && !prefix.contains('*') => {
                        Who::UriPrefix(prefix.to_owned())
                    }
                    None if !other.contains('*') => Who::Uri(other.to_owned()),
                    _ => {
                        return Err(format!(
                            "invalid caller {other:?}: a URI may end in /* (path prefix) but hold no other *"
                        ));
                    }
                }
            } else {
                return Err(format!(
                    "invalid caller {other:?}: use uid:N, gid:N, a SAN URI (spiffe://…), dns:NAME, anonymous or *"
                ));
            }
        }
    };
    let mut operations = HashSet::new();
    for name in strings(rule, "operations")? {
        if name == "*" {
            operations.extend(Operation::ALL);
            continue;
        }
        let op = Operation::ALL
            .into_iter()
            .find(|op| op.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown operation {name:?}: use {} or *",
                    Operation::ALL.map(Operation::name).join(", ")
                )
            })?;
        operations.insert(op);
    }
    let keys = strings(rule, "keys")?;
    let keys = if keys.contains(&"*") {
        None
    } else {
        Some(
            keys.into_iter()
                .map(|k| {
                    keyring
                        .resolve(k)
                        .map(str::to_owned)
                        .map_err(|_| format!("key {k:?} is not one of the configured keys"))
                })
                .collect::<Result<HashSet<_>, _>>()?,
        )
    };
    Ok(Rule {
        who,
        operations,
        keys,
    })
}

/// The encryption-context key that carries the caller's identity in
/// envelopes wrapped with caller binding (`--bind-caller`). Reserved:
/// callers may never set it on Wrap.
pub const CALLER_CONTEXT_KEY: &str = "kms-sidecar:caller";

/// What the service checks and records for each call: the policy, the
/// audit trail, and whether envelopes are bound to their caller.
#[derive(Debug, Default)]
pub struct Access {
    /// Who may do what.
    pub policy: Policy,
    /// Where key uses are recorded, if anywhere.
    pub audit: Option<crate::audit::Audit>,
    /// Caller binding: Wrap records the caller's identity in the envelope's
    /// encryption context ([`CALLER_CONTEXT_KEY`]), and Unwrap opens only
    /// envelopes bound to the calling identity.
    pub bind_caller: bool,
}

impl Access {
    /// Loads the policy file and opens the audit trail of `config`.
    ///
    /// # Errors
    /// A one-line message for the operator.
    pub fn from_config(config: &crate::config::Config, keyring: &Keyring) -> Result<Self, String> {
        let policy = match &config.policy_file {
            Some(path) => {
                let policy = Policy::load(path, keyring)?;
                tracing::info!(path = %path.display(), "authorization policy loaded");
                policy
            }
            None => {
                tracing::warn!(
                    "no --policy-file: every process that can reach the sidecar's sockets may use \
                     every configured key for every operation"
                );
                Policy::allow_all()
            }
        };
        let audit =
            crate::audit::Audit::open(&config.audit, config.audit_hash_key_file.as_deref())?;
        if config.bind_caller {
            tracing::info!(
                context_key = CALLER_CONTEXT_KEY,
                "caller binding on: envelopes open only for the identity that wrapped them"
            );
        }
        Ok(Self {
            policy,
            audit,
            bind_caller: config.bind_caller,
        })
    }

    /// The context of a new envelope: the caller's pairs, plus its identity
    /// when caller binding is on.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when the caller sets the reserved
    /// [`CALLER_CONTEXT_KEY`] (refused with or without binding, so that no
    /// envelope can claim another caller's identity).
    pub fn bind_for_wrap(
        &self,
        caller: &Caller,
        mut context: std::collections::HashMap<String, String>,
    ) -> Result<std::collections::HashMap<String, String>, Error> {
        if context.contains_key(CALLER_CONTEXT_KEY) {
            return Err(Error::InvalidRequest(format!(
                "encryption context key {CALLER_CONTEXT_KEY:?} is reserved: the sidecar sets it \
                 to the caller's identity when caller binding (--bind-caller) is on"
            )));
        }
        if self.bind_caller {
            context.insert(CALLER_CONTEXT_KEY.to_owned(), caller.label());
        }
        Ok(context)
    }

    /// The context to compare with an envelope's: with caller binding, the
    /// envelope must be bound to this caller, whose identity is added to the
    /// supplied pairs. Without binding, the supplied pairs as they are (a
    /// bound envelope then opens with its `kms-sidecar:caller` pair
    /// supplied like any other).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when, with binding, the caller supplies the
    /// reserved key; [`Error::CallerBindingMismatch`] when the envelope is
    /// bound to another identity or to none. (The context is in the clear
    /// in every envelope header, so saying so reveals nothing new.)
    pub fn bind_for_unwrap(
        &self,
        caller: &Caller,
        envelope: &EncryptionContext,
        mut supplied: EncryptionContext,
    ) -> Result<EncryptionContext, Error> {
        if !self.bind_caller {
            return Ok(supplied);
        }
        let me = caller.label();
        match envelope.get(CALLER_CONTEXT_KEY) {
            Some(bound) if bound == me => {}
            bound => {
                return Err(Error::CallerBindingMismatch {
                    caller: me,
                    bound: bound.is_some(),
                });
            }
        }
        if !supplied.insert_new(CALLER_CONTEXT_KEY.to_owned(), me) {
            return Err(Error::InvalidRequest(format!(
                "encryption context key {CALLER_CONTEXT_KEY:?} is reserved: with caller binding \
                 (--bind-caller) the sidecar supplies it; leave it out"
            )));
        }
        Ok(supplied)
    }
}
