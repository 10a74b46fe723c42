//! TLS and mutual TLS on the TCP listeners (rustls on ring), with the
//! certificate, key and client CA re-read when their files change, so a
//! rotated certificate (cert-manager, SPIRE) needs no restart.
//!
//! With a client CA, every TCP client must present a certificate issued by
//! it; the caller's identity is then the certificate's SAN URI (a SPIFFE
//! ID) or DNS name (see [`peer_names`]). Unix sockets are never wrapped in
//! TLS: their callers are identified by the kernel.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// Where the TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; with
    /// it, clients must present one (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// The current server configuration, rebuilt when the files change.
#[derive(Debug, Clone)]
pub struct TlsServer {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

/// Longest TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsServer {
    /// Loads the files.
    ///
    /// # Errors
    /// A one-line message naming the file that is missing or invalid.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let config = build(&files)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }

    /// Checks the files every `every` and rebuilds the configuration when
    /// one changed; a broken file keeps the previous configuration in use
    /// (and is logged), so a half-written rotation never takes TLS down.
    pub fn spawn_reloader(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = stamps(&this.files);
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let now = stamps(&this.files);
                if now == seen {
                    continue;
                }
                match build(&this.files) {
                    Ok(config) => {
                        if let Ok(mut slot) = this.current.write() {
                            *slot = Arc::new(config);
                        }
                        seen = now;
                        tracing::info!("TLS certificate, key or client CA reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                    }
                }
            }
        })
    }

    /// Accepts TCP connections on `listener` and yields those whose TLS
    /// handshake succeeds (each handshake in its own task, bounded in
    /// time, so a slow client holds up no one else).
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => break,
                };
                let _ = tcp.set_nodelay(true);
                let Some(config) = this.config() else {
                    continue;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    let mut out = vec![stamp(&files.cert), stamp(&files.key)];
    if let Some(ca) = &files.client_ca {
        out.push(stamp(ca));
    }
    out
}

fn build(files: &TlsFiles) -> Result<rustls::ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate in {} (PEM expected)",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("cannot read TLS key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(Iterator::collect)
                .map_err(|e| format!("cannot read client CA {}: {e}", ca.display()))?;
            for c in cas {
                roots.add(c).map_err(|e| {
                    format!("invalid client CA certificate in {}: {e}", ca.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not match or are invalid: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The names in a certificate's subject alternative name extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerNames {
    /// URIs (SPIFFE IDs such as `spiffe://example.org/ns/app/sa/web`).
    pub uris: Vec<String>,
    /// DNS names.
    pub dns: Vec<String>,
}

/// Reads the SAN URIs and DNS names of a DER certificate (already verified
/// by the TLS handshake). Anything it cannot parse yields no names, never
/// a panic.
pub fn peer_names(cert: &[u8]) -> PeerNames {
    san(cert).unwrap_or_default()
}

/// One DER element: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (value, rest) = rest.split_at_checked(len)?;
    Some((tag, value, rest))
}

/// The elements of a constructed value.
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = tlv(input)?;
        input = rest;
        Some((tag, value))
    })
}

const SEQUENCE: u8 = 0x30;
const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT, constructed
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const SAN_OID: [u8; 3] = [0x55, 0x1d, 0x11]; // 2.5.29.17
const DNS_NAME: u8 = 0x82; // [2] IMPLICIT IA5String
const URI: u8 = 0x86; // [6] IMPLICIT IA5String

fn san(cert: &[u8]) -> Option<PeerNames> {
    let (SEQUENCE, certificate, _) = tlv(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(certificate)? else {
        return None;
    };
    let (_, extensions) = elements(tbs).find(|(tag, _)| *tag == EXTENSIONS)?;
    let (SEQUENCE, list, _) = tlv(extensions)? else {
        return None;
    };
    for (_, extension) in elements(list).filter(|(tag, _)| *tag == SEQUENCE) {
        let mut parts = elements(extension);
        let Some((OID, oid)) = parts.next() else {
            continue;
        };
        if oid != SAN_OID {
            continue;
        }
        let (_, value) = parts.find(|(tag, _)| *tag == OCTET_STRING)?;
        let (SEQUENCE, names, _) = tlv(value)? else {
            return None;
        };
        let mut out = PeerNames::default();
        for (tag, name) in elements(names) {
            let Ok(text) = std::str::from_utf8(name) else {
                continue;
            };
            match tag {
                DNS_NAME => out.dns.push(text.to_owned()),
                URI => out.uris.push(text.to_owned()),
                _ => {}
            }
        }
        return Some(out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_der_yields_no_names() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x82, 0xff, 0xff],
            &[0x30, 0x03, 0x30, 0x01, 0xa3],
        ] {
            assert_eq!(peer_names(input), PeerNames::default());
        }
    }

    proptest::proptest! {
        /// Whatever the bytes (truncated, nested, oversized lengths), the
        /// parser returns without panicking.
        #[test]
        fn any_bytes_are_safe(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = peer_names(&bytes);
            let mut wrapped = vec![0x30, 0x82];
            wrapped.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
            wrapped.extend_from_slice(&bytes);
            let _ = peer_names(&wrapped);
        }
    }
}
