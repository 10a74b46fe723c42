//! A fault-injecting, call-counting HTTP proxy in front of the real
//! KMS-protocol server (moto). Every request the sidecar sends is recorded
//! (operation, arrival time, signing access key) and forwarded unchanged,
//! unless a fault rule says otherwise. It also plays the parts of STS that
//! moto cannot: short-lived credentials, refusal of stale web-identity
//! tokens, and KMS refusing expired credentials.
//!
//! This is fault injection only: answers that are not faults come from moto.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kms::primitives::{DateTime, DateTimeFormat};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What the proxy does instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// HTTP 400 ThrottlingException.
    Throttle,
    /// HTTP 400 AccessDeniedException.
    AccessDenied,
    /// HTTP 400 DisabledException.
    Disabled,
    /// The given 5xx status with KMSInternalException.
    ServerError(u16),
    /// Forward after this delay.
    Delay(Duration),
    /// Read the request, never answer.
    BlackHole,
}

#[derive(Debug, Clone)]
struct Rule {
    /// "GenerateDataKey", "Decrypt", "AssumeRoleWithWebIdentity"; None = all.
    operation: Option<String>,
    fault: Fault,
    /// How many more requests this rule applies to; None = until cleared.
    remaining: Option<u32>,
}

/// One request the proxy received.
#[derive(Debug, Clone)]
pub struct Call {
    pub operation: String,
    pub at: Instant,
    pub wall: SystemTime,
    /// The access key ID in the SigV4 Authorization header (KMS calls).
    pub access_key: String,
    /// The WebIdentityToken parameter (STS calls).
    pub token: String,
    /// The HTTP status the proxy answered with (0 for a black hole).
    pub status: u16,
}

/// STS emulation for credential-refresh tests.
#[derive(Debug, Clone)]
pub struct StsPolicy {
    /// Lifetime of the credentials handed out.
    pub lifetime: Duration,
    /// Only this file's current content is accepted as the token.
    pub token_file: PathBuf,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    calls: Vec<Call>,
    sts: Option<StsPolicy>,
    /// Access key → expiry, for credentials issued under `sts`.
    issued: HashMap<String, SystemTime>,
}

pub struct KmsProxy {
    pub endpoint: String,
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KmsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KmsProxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to `upstream`
    /// ("http://host:port").
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream host:port");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, upstream, Arc::clone(&state))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            endpoint: format!("http://{addr}"),
            addr,
            state,
            task,
        }
    }

    /// Applies `fault` to `operation` (None = every request), for the next
    /// `times` requests (None = until [`Self::clear`]). Rules are checked in
    /// the order they were added.
    pub fn inject(&self, operation: Option<&str>, fault: Fault, times: Option<u32>) {
        self.state.lock().unwrap().rules.push(Rule {
            operation: operation.map(str::to_owned),
            fault,
            remaining: times,
        });
    }

    /// Removes every fault rule.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Turns on STS emulation.
    pub fn sts(&self, policy: StsPolicy) {
        self.state.lock().unwrap().sts = Some(policy);
    }

    /// Every request received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// How many requests for `operation` were received.
    pub fn count(&self, operation: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.operation == operation)
            .count()
    }

    /// Forgets the recorded calls.
    pub fn reset_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The expiry of credentials issued with `access_key`.
    pub fn expiry_of(&self, access_key: &str) -> Option<SystemTime> {
        self.state.lock().unwrap().issued.get(access_key).copied()
    }
}

fn operation_of(headers: &http::HeaderMap, body: &[u8]) -> String {
    if let Some(target) = headers.get("x-amz-target") {
        let target = target.to_str().unwrap_or_default();
        return target.rsplit('.').next().unwrap_or(target).to_owned();
    }
    form_param(body, "Action").unwrap_or_else(|| "Unknown".into())
}

fn form_param(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn access_key_of(req: &Request<Incoming>) -> String {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    auth.split("Credential=")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

fn json_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-errortype", code)
        .body(Full::new(Bytes::from(format!(
            r#"{{"__type":"{code}","message":"{message}"}}"#
        ))))
        .unwrap()
}

fn sts_error(status: u16, code: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(format!(
            "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
             <Message>{code} from the test proxy</Message></Error>\
             <RequestId>1</RequestId></ErrorResponse>"
        ))))
        .unwrap()
}

fn fault_response(fault: Fault, is_sts: bool) -> Response<Full<Bytes>> {
    match (fault, is_sts) {
        (Fault::ServerError(code), true) => sts_error(code, "ServiceUnavailable"),
        (Fault::Throttle, true) => sts_error(400, "Throttling"),
        (Fault::AccessDenied, true) => sts_error(403, "AccessDenied"),
        (Fault::Throttle, false) => json_error(400, "ThrottlingException", "Rate exceeded"),
        (Fault::AccessDenied, false) => json_error(
            400,
            "AccessDeniedException",
            "User is not authorized to perform this operation",
        ),
        (Fault::Disabled, _) => json_error(400, "DisabledException", "The key is disabled"),
        (Fault::ServerError(code), false) => {
            json_error(code, "KMSInternalException", "internal error")
        }
        (Fault::Delay(_) | Fault::BlackHole, _) => unreachable!("not an answer"),
    }
}

fn take_fault(state: &mut State, operation: &str) -> Option<Fault> {
    let rule = state
        .rules
        .iter_mut()
        .find(|r| r.operation.as_deref().is_none_or(|o| o == operation))?;
    let fault = rule.fault;
    if let Some(n) = rule.remaining.as_mut() {
        *n -= 1;
    }
    state.rules.retain(|r| r.remaining != Some(0));
    Some(fault)
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let wall = SystemTime::now();
    let access_key = access_key_of(&req);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let operation = operation_of(&parts.headers, &body);
    let token = form_param(&body, "WebIdentityToken").unwrap_or_default();
    let is_sts = operation == "AssumeRoleWithWebIdentity";
    let (fault, sts) = {
        let mut s = state.lock().unwrap();
        (take_fault(&mut s, &operation), s.sts.clone())
    };
    let record = |status: u16| {
        state.lock().unwrap().calls.push(Call {
            operation: operation.clone(),
            at,
            wall,
            access_key: access_key.clone(),
            token: token.clone(),
            status,
        });
    };
    match fault {
        Some(Fault::BlackHole) => {
            record(0);
            std::future::pending::<()>().await;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(f) => {
            let resp = fault_response(f, is_sts);
            record(resp.status().as_u16());
            return Ok(resp);
        }
        None => {}
    }
    // STS emulation: refuse a token that is not the file's current content;
    // KMS emulation: refuse credentials past their expiry.
    if let Some(policy) = &sts {
        if is_sts {
            let current = std::fs::read_to_string(&policy.token_file).unwrap_or_default();
            if current.trim() != token {
                record(400);
                return Ok(sts_error(400, "InvalidIdentityToken"));
            }
        } else {
            let expiry = state.lock().unwrap().issued.get(&access_key).copied();
            if expiry.is_some_and(|e| e <= SystemTime::now()) {
                record(400);
                return Ok(json_error(
                    400,
                    "ExpiredTokenException",
                    "The security token included in the request is expired",
                ));
            }
        }
    }
    let mut resp = forward(&parts, body, upstream).await;
    if let (Some(policy), true) = (&sts, is_sts) {
        resp = shorten_credentials(resp, policy.lifetime, &state).await;
    }
    record(resp.status().as_u16());
    Ok(resp)
}

async fn forward(
    parts: &http::request::Parts,
    body: Bytes,
    upstream: SocketAddr,
) -> Response<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(upstream).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone());
    for (name, value) in &parts.headers {
        builder = builder.header(name, value);
    }
    let resp = sender
        .send_request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut out = Response::from_parts(parts, Full::new(body.clone()));
    out.headers_mut().remove("transfer-encoding");
    out.headers_mut()
        .insert("content-length", body.len().to_string().parse().unwrap());
    out
}

/// Rewrites the Expiration of an AssumeRoleWithWebIdentity answer to
/// `lifetime` from now and remembers the access key's expiry.
async fn shorten_credentials(
    resp: Response<Full<Bytes>>,
    lifetime: Duration,
    state: &Mutex<State>,
) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let between = |s: &str, tag: &str| -> Option<(usize, usize)> {
        let open = format!("<{tag}>");
        let start = s.find(&open)? + open.len();
        let end = start + s[start..].find(&format!("</{tag}>"))?;
        Some((start, end))
    };
    let (Some((es, ee)), Some((ks, ke))) =
        (between(&text, "Expiration"), between(&text, "AccessKeyId"))
    else {
        return Response::from_parts(parts, Full::new(Bytes::from(text)));
    };
    let expiry = SystemTime::now() + lifetime;
    let stamp = DateTime::from(expiry)
        .fmt(DateTimeFormat::DateTime)
        .unwrap();
    state
        .lock()
        .unwrap()
        .issued
        .insert(text[ks..ke].to_owned(), expiry);
    let text = format!("{}{stamp}{}", &text[..es], &text[ee..]);
    parts
        .headers
        .insert("content-length", text.len().to_string().parse().unwrap());
    Response::from_parts(parts, Full::new(Bytes::from(text)))
}
