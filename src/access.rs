//! Who is calling, and may they: caller identities and the authorization
//! policy.
//!
//! - On a Unix socket the caller is the peer process's uid and gid, from
//!   the kernel (`SO_PEERCRED`), which the caller cannot forge.
//! - On TCP with mutual TLS (`--tls-client-ca`) the caller is named by its
//!   verified client certificate, by one name ([`CertName`]): its SAN URI
//!   (exactly one `scheme://…` URI, as in a SPIFFE X.509-SVID), else its
//!   first SAN DNS name. The policy, caller binding and the audit trail all
//!   use that one name, and the three namespaces (`uid:`/`gid:`, URIs with
//!   `://`, `dns:`) cannot collide.
//! - Otherwise (plain TCP, TLS without client certificates, or a client
//!   certificate without such a name) the caller is anonymous (the
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
        /// The certificate's identity.
        name: CertName,
        /// The remote address (for the audit trail).
        peer: Option<String>,
    },
    /// No verified identity (TCP).
    Anonymous {
        /// The remote address, if known (for the audit trail).
        peer: Option<String>,
    },
}

/// The one name a client certificate is known by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertName {
    /// Its SAN URI (a SPIFFE ID such as `spiffe://example.org/ns/app/sa/web`).
    Uri(String),
    /// Its first SAN DNS name, lower-cased, without a trailing dot.
    Dns(String),
}

impl CertName {
    /// The identity of a certificate with these SAN names, if it has one:
    /// - its URI, when exactly one SAN URI is an identity URI (`scheme://`
    ///   then a path without `.`/`..` segments, `*`, `%2e` or spaces).
    ///   Other URIs (`uid:1000`, `anonymous`, …) are ignored, so they can
    ///   never pose as Unix or anonymous callers; two identity URIs make
    ///   the certificate ambiguous, hence anonymous (a SPIFFE X.509-SVID
    ///   holds exactly one);
    /// - else its first DNS name, if any.
    pub fn from_names(names: &crate::tls::PeerNames) -> Option<Self> {
        let mut uris = names.uris.iter().filter(|u| is_identity_uri(u));
        match (uris.next(), uris.next()) {
            (Some(uri), None) => return Some(Self::Uri(uri.clone())),
            (Some(_), Some(_)) => return None,
            (None, _) => {}
        }
        names
            .dns
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .find(|d| is_dns_name(d))
            .map(Self::Dns)
    }
}

/// Whether `name` is a DNS name (letters, digits, `-` and `.`, no empty
/// label): anything else in a certificate's DNS SAN is ignored, so a DNS
/// identity's label (`dns:NAME`) can never equal a URI identity's
/// (`dns://…`).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether `uri` can name a caller: `scheme://rest`, with an ASCII scheme,
/// a non-empty rest of printable ASCII without `*`, percent-encoded dots,
/// or `.`/`..` path segments (so a `…/billing/*` rule cannot be escaped
/// with `…/billing/../admin`).
fn is_identity_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    scheme_ok
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_graphic() && b != b'*')
        && !rest.to_ascii_lowercase().contains("%2e")
        && rest
            .split('/')
            .all(|segment| segment != "." && segment != "..")
}

impl Caller {
    /// The caller of `request`, from its connection.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Self::from_extensions(request.extensions())
    }

    /// The caller of a request with these (HTTP) extensions, where the
    /// server put its connection's details.
    pub fn from_extensions(extensions: &http::Extensions) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
        // Found already by the server's admission layer.
        if let Some(caller) = extensions.get::<Self>() {
            return caller.clone();
        }
        if let Some(info) = extensions.get::<UdsConnectInfo>()
            && let Some(cred) = info.peer_cred
        {
            return Self::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
            };
        }
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .or_else(|| tls.map(TlsConnectInfo::get_ref))
            .and_then(TcpConnectInfo::remote_addr)
            .map(|a| a.to_string());
        if let Some(certs) = tls.and_then(TlsConnectInfo::peer_certs)
            && let Some(leaf) = certs.first()
            && let Some(name) = CertName::from_names(&crate::tls::peer_names(leaf))
        {
            return Self::Certificate { name, peer };
        }
        Self::Anonymous { peer }
    }

    /// The identity as policies, caller binding, the audit trail and
    /// messages name it: `uid:1000`, the certificate's SAN URI,
    /// `dns:NAME`, or `anonymous`.
    pub fn label(&self) -> String {
        match self {
            Self::Unix { uid, .. } => format!("uid:{uid}"),
            Self::Certificate {
                name: CertName::Uri(uri),
                ..
            } => uri.clone(),
            Self::Certificate {
                name: CertName::Dns(dns),
                ..
            } => format!("dns:{dns}"),
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
    /// A SAN DNS name, exactly (stored lower-case; identities are too).
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

impl Rule {
    /// Whether the rule's `caller` names this caller.
    fn names(&self, caller: &Caller) -> bool {
        match (&self.who, caller) {
            (Who::Anyone, _) | (Who::Anonymous, Caller::Anonymous { .. }) => true,
            (Who::Uid(u), Caller::Unix { uid, .. }) => u == uid,
            (Who::Gid(g), Caller::Unix { gid, .. }) => g == gid,
            (
                Who::Uri(want),
                Caller::Certificate {
                    name: CertName::Uri(uri),
                    ..
                },
            ) => uri == want,
            (
                Who::UriPrefix(prefix),
                Caller::Certificate {
                    name: CertName::Uri(uri),
                    ..
                },
            ) => uri.starts_with(prefix.as_str()),
            (
                Who::Dns(want),
                Caller::Certificate {
                    name: CertName::Dns(dns),
                    ..
                },
            ) => dns == want,
            _ => false,
        }
    }
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
            let key_ok = match (&rule.keys, key) {
                (None, _) | (Some(_), None) => true,
                (Some(keys), Some(k)) => keys.contains(k),
            };
            rule.names(caller) && rule.operations.contains(&operation) && key_ok
        })
    }

    /// May `caller` do any of `operations` with at least one key? Checked
    /// before a call is read, a stream slot is taken or a key is looked
    /// up, so callers without any right hold no resources and learn
    /// nothing about the configured keys.
    pub fn allows_any(&self, caller: &Caller, operations: &[Operation]) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        rules.iter().any(|rule| {
            rule.names(caller)
                && operations.iter().any(|op| rule.operations.contains(op))
                && rule.keys.as_ref().is_none_or(|keys| !keys.is_empty())
        })
    }

    /// [`Self::allows_any`], as a result.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] naming the caller and the (first)
    /// operation.
    pub fn check_any(&self, caller: &Caller, operations: &[Operation]) -> Result<(), Error> {
        if self.allows_any(caller, operations) {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            caller: caller.label(),
            operation: operations.first().map_or("call", |op| op.name()),
            key_id: None,
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
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if !is_dns_name(&name) {
                    return Err(format!(
                        "invalid caller {other:?}: dns: needs one exact DNS name \
                         (letters, digits, - and .)"
                    ));
                }
                Who::Dns(name)
            } else if let Some((scheme, rest)) = other.split_once("://") {
                if scheme.is_empty() || rest.is_empty() {
                    return Err(format!(
                        "invalid caller {other:?}: a URI needs a scheme and a path"
                    ));
                }
                match other.strip_suffix('*') {
                    Some(prefix)
                        if prefix.ends_with('/')
                            && !prefix.contains('*')
                            && is_identity_uri(prefix) =>
                    {
                        Who::UriPrefix(prefix.to_owned())
                    }
                    None if is_identity_uri(other) => Who::Uri(other.to_owned()),
                    _ => {
                        return Err(format!(
                            "invalid caller {other:?}: a URI may end in /* (path prefix) but hold no \
                             other *, no spaces and no . or .. path segments"
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
    // Every entry is checked, also next to "*", so a typo never hides.
    let resolved = keys
        .iter()
        .filter(|k| **k != "*")
        .map(|k| {
            if k.is_empty() {
                // Requests use "" for the default key; a policy names keys.
                return Err("an empty key name: name the key (or \"*\")".to_owned());
            }
            keyring
                .resolve(k)
                .map(str::to_owned)
                .map_err(|_| format!("key {k:?} is not one of the configured keys"))
        })
        .collect::<Result<HashSet<_>, _>>()?;
    if keys.is_empty() {
        return Err("\"keys\" is empty: name the keys (or \"*\")".into());
    }
    let keys = (!keys.contains(&"*")).then_some(resolved);
    Ok(Rule {
        who,
        operations,
        keys,
    })
}

/// The encryption-context key that carries the caller's identity in
/// envelopes wrapped with caller binding (`--bind-caller`). Reserved:
/// callers may never set it on Wrap or GenerateDataKey.
pub const CALLER_CONTEXT_KEY: &str = "kms-sidecar:caller";

/// Refuses a context that sets [`CALLER_CONTEXT_KEY`], with or without
/// binding: a data key or envelope made with it could claim another
/// caller's identity (a data key from GenerateDataKey is enough to build an
/// envelope offline).
///
/// # Errors
/// [`Error::InvalidRequest`] naming the key.
pub fn refuse_reserved(context: &std::collections::HashMap<String, String>) -> Result<(), Error> {
    if context.contains_key(CALLER_CONTEXT_KEY) {
        return Err(Error::InvalidRequest(format!(
            "encryption context key {CALLER_CONTEXT_KEY:?} is reserved: the sidecar sets it \
             to the caller's identity when caller binding (--bind-caller) is on"
        )));
    }
    Ok(())
}

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

    /// Records a call refused before it started (policy, stream slots, the
    /// in-flight budget) in the audit trail, if on.
    pub fn audit_refusal(&self, caller: &Caller, operation: &'static str, err: &Error) {
        if let Some(audit) = &self.audit {
            let pending = audit.begin(caller, operation, None);
            audit.finish(
                pending,
                crate::audit::Outcome {
                    error: Some(err),
                    ..crate::audit::Outcome::default()
                },
            );
        }
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
        refuse_reserved(&context)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerNames;

    fn name(uris: &[&str], dns: &[&str]) -> Option<CertName> {
        CertName::from_names(&PeerNames {
            uris: uris.iter().map(|s| (*s).to_owned()).collect(),
            dns: dns.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    #[test]
    fn a_certificate_is_known_by_one_name() {
        let svid = "spiffe://example.org/ns/billing/sa/api";
        assert_eq!(name(&[svid], &["x.svc"]), Some(CertName::Uri(svid.into())));
        // Not identity URIs: ignored, never a Unix or anonymous caller.
        for other in ["uid:1000", "anonymous", "gid:0", "dns:x", "://x", "1a://x"] {
            assert_eq!(
                name(&[other], &["Web.Example.", "b.example"]),
                Some(CertName::Dns("web.example".into())),
                "{other}"
            );
            assert_eq!(name(&[other], &[]), None, "{other}");
        }
        // Path tricks a prefix rule could be fooled by.
        for tricky in [
            "spiffe://example.org/ns/billing/../admin",
            "spiffe://example.org/ns/billing/./x",
            "spiffe://example.org/ns/billing/%2E%2E/admin",
            "spiffe://example.org/ns/billing/*",
            "spiffe://example.org/ns/bill ing",
        ] {
            assert_eq!(name(&[tricky], &[]), None, "{tricky}");
        }
        // Two identity URIs: ambiguous, so no identity at all.
        assert_eq!(
            name(&[svid, "spiffe://example.org/ns/victim/sa/x"], &["a"]),
            None
        );
        // One identity URI among other URIs is still the one.
        assert_eq!(
            name(&["uid:1000", svid], &[]),
            Some(CertName::Uri(svid.into()))
        );
        assert_eq!(name(&[], &["*.example", ""]), None);
        // Not DNS names: never a `dns:` label that could equal a URI's.
        assert_eq!(name(&[], &["//example.org/ns/app", "a..b", "a_b.c"]), None);
    }

    #[test]
    fn labels_never_collide_across_kinds() {
        let cert = |name| Caller::Certificate { name, peer: None };
        assert_eq!(cert(CertName::Dns("a.b".into())).label(), "dns:a.b");
        assert_eq!(
            cert(CertName::Uri("spiffe://t/x".into())).label(),
            "spiffe://t/x"
        );
        assert_eq!(Caller::Unix { uid: 1, gid: 2 }.label(), "uid:1");
        assert_eq!(Caller::Anonymous { peer: None }.label(), "anonymous");
    }
}
