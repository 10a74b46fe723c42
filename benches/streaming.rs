#![allow(
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a benchmark binary: it prints, and aborts on setup failure"
)]

//! Streaming throughput, in one run on one machine:
//!
//! - (a) raw `ring` AES-256-GCM seal, one thread, 64 KiB buffers;
//! - (b) a bare tonic bidirectional echo of the same 64 KiB chunks, served
//!   by a separate process (this binary re-run as `--echo-server`);
//! - (c) WrapStream and UnwrapStream of 1 GiB through the release
//!   `kms-sidecar` binary (local keyring), over its Unix socket and TCP,
//!   with the sidecar's peak RSS growth during (c);
//! - a Python `grpcio` client streaming 64 MiB through the sidecar against
//!   the official Python AWS Encryption SDK encrypting the same 64 MiB
//!   in-process (test venv; `tests/run.sh` creates it).
//!
//! Run: `cargo bench --bench streaming` (`KMS_SIDECAR_BENCH_MIB=256` for a
//! shorter run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapStreamRequest, WrapStreamRequest};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[path = "support/echo.rs"]
mod echo_support;

use echo_support::echo;

const CHUNK: usize = 64 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

fn total_bytes() -> usize {
    std::env::var("KMS_SIDECAR_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
        * 1024
        * 1024
}

fn mbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / MIB / elapsed.as_secs_f64()
}

/// (a) AES-256-GCM seal of 64 KiB buffers on one thread.
fn ring_seal(total: usize) -> f64 {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("key"));
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for i in 0..total / CHUNK {
        let mut iv = [0u8; 12];
        iv[8..].copy_from_slice(&(i as u32).to_be_bytes());
        #[allow(
            clippy::disallowed_methods,
            reason = "benchmark of the primitive; unique per call"
        )]
        let nonce = Nonce::assume_unique_for_key(iv);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(&[1u8; 32]), &mut buf)
            .expect("seal");
        let _ = std::hint::black_box(tag);
    }
    mbps(total, start.elapsed())
}

// ---------------------------------------------------------------- echo --

/// Runs the echo server on a Unix socket and a TCP port (printed).
async fn echo_server(sock: &Path) {
    let uds = tokio::net::UnixListener::bind(sock).expect("bind echo socket");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo tcp");
    println!("{}", tcp.local_addr().expect("addr").port());
    echo_support::serve(uds, Some(tcp)).await;
}

async fn echo_run(channel: Channel, total: usize) -> f64 {
    let mut client = echo::echo_client::EchoClient::new(channel);
    let block = vec![5u8; CHUNK];
    let requests = tokio_stream::iter((0..total / CHUNK).map(move |_| echo::Chunk {
        data: block.clone(),
    }));
    let start = Instant::now();
    let mut responses = client.echo(requests).await.expect("echo").into_inner();
    let mut got = 0;
    while let Some(msg) = responses.next().await {
        got += msg.expect("echo chunk").data.len();
    }
    assert_eq!(got, total / CHUNK * CHUNK);
    mbps(got, start.elapsed())
}

// ------------------------------------------------------------- sidecar --

async fn wrap_run(channel: Channel, total: usize, keep: bool) -> (f64, Vec<u8>) {
    let mut client = KeyServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let block = vec![5u8; CHUNK];
    let first = std::iter::once(WrapStreamRequest::default());
    let requests =
        tokio_stream::iter(
            first.chain((0..total / CHUNK).map(move |_| WrapStreamRequest {
                chunk: block.clone(),
                ..Default::default()
            })),
        );
    let start = Instant::now();
    let mut responses = client
        .wrap_stream(requests)
        .await
        .expect("wrap")
        .into_inner();
    let mut envelope = Vec::with_capacity(if keep {
        total + total / 1000 + 65536
    } else {
        0
    });
    let mut got = 0;
    while let Some(msg) = responses.next().await {
        let chunk = msg.expect("wrap chunk").chunk;
        got += chunk.len();
        if keep {
            envelope.extend_from_slice(&chunk);
        }
    }
    assert!(got > total);
    (mbps(total, start.elapsed()), envelope)
}

async fn unwrap_run(channel: Channel, envelope: &[u8], total: usize) -> f64 {
    let mut client = KeyServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let chunks: Vec<Vec<u8>> = envelope.chunks(CHUNK).map(<[u8]>::to_vec).collect();
    let first = std::iter::once(UnwrapStreamRequest::default());
    let requests =
        tokio_stream::iter(
            first.chain(chunks.into_iter().map(|chunk| UnwrapStreamRequest {
                chunk,
                ..Default::default()
            })),
        );
    let start = Instant::now();
    let mut responses = client
        .unwrap_stream(requests)
        .await
        .expect("unwrap")
        .into_inner();
    let mut got = 0;
    while let Some(msg) = responses.next().await {
        got += msg.expect("unwrap chunk").chunk.len();
    }
    assert_eq!(got, total);
    mbps(total, start.elapsed())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn python_compare(sock: &Path, key_file: &Path) -> Option<Vec<f64>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        eprintln!("(no .venv: run tests/run.sh once for the Python comparison)");
        return None;
    }
    let out = Command::new(python)
        .arg(root.join("benches/compare_python.py"))
        .arg(sock)
        .arg(key_file)
        .output()
        .expect("run compare_python.py");
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    match nums.len() {
        4 => Some(nums),
        _ => {
            eprintln!(
                "compare_python.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(i) = args.iter().position(|a| a == "--echo-server") {
        let sock = PathBuf::from(args.get(i + 1).expect("socket path"));
        runtime.block_on(echo_server(&sock));
        return;
    }
    let total = total_bytes();
    let dir = std::env::temp_dir().join(format!("kms-sidecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");

    let seal = ring_seal(total);

    // Echo server: this binary, in its own process.
    let echo_sock = dir.join("echo.sock");
    let mut echo = Command::new(std::env::current_exe().expect("exe"))
        .args(["--echo-server", echo_sock.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start echo server");
    let echo_port = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(echo.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("echo port");
        line.trim().parse::<u16>().expect("port")
    };
    let _echo = Reaper(echo);
    wait_for(&echo_sock);

    // The sidecar: the release binary, local keyring.
    let sock = dir.join("kms.sock");
    let key_file = dir.join("local-key");
    let port = free_port();
    let sidecar = Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
        .args([
            "--listen",
            &format!("unix://{}", sock.display()),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--local-key-file",
            key_file.to_str().expect("utf-8"),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start kms-sidecar");
    let pid = sidecar.id();
    let _sidecar = Reaper(sidecar);
    wait_for(&sock);

    let uds = format!("unix://{}", sock.display());
    let tcp = format!("127.0.0.1:{port}");
    let echo_uds = format!("unix://{}", echo_sock.display());
    let echo_tcp = format!("127.0.0.1:{echo_port}");
    let connect = |t: &str| {
        let t = t.to_owned();
        runtime.block_on(async move { kms_sidecar::client::connect(&t).await.expect("connect") })
    };

    // The envelope to unwrap, made by an untimed run.
    let rss_before = status_kib(pid, "VmRSS:");
    let (_, envelope) = runtime.block_on(wrap_run(connect(&uds), total, true));
    // Interleaved rounds, best of each: the machine's noise hits all alike.
    let rounds: usize = std::env::var("KMS_SIDECAR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut best = [0f64; 6];
    for _ in 0..rounds {
        let round = [
            runtime.block_on(echo_run(connect(&echo_uds), total)),
            runtime.block_on(wrap_run(connect(&uds), total, false)).0,
            runtime.block_on(unwrap_run(connect(&uds), &envelope, total)),
            runtime.block_on(echo_run(connect(&echo_tcp), total)),
            runtime.block_on(wrap_run(connect(&tcp), total, false)).0,
            runtime.block_on(unwrap_run(connect(&tcp), &envelope, total)),
        ];
        for (b, r) in best.iter_mut().zip(round) {
            *b = b.max(r);
        }
    }
    let [
        echo_uds_mbps,
        wrap_uds,
        unwrap_uds,
        echo_tcp_mbps,
        wrap_tcp,
        unwrap_tcp,
    ] = best;
    let rss_peak = status_kib(pid, "VmHWM:");
    drop(envelope);

    let python = python_compare(&sock, &key_file);

    let gib = total as f64 / MIB / 1024.0;
    println!();
    println!(
        "kms-sidecar streaming benchmark ({gib:.2} GiB per run, 64 KiB chunks, 64 KiB frames, best of {rounds} interleaved rounds)"
    );
    println!("{:<44} {:>10} {:>8} {:>8}", "path", "MB/s", "c/b", "c/a");
    println!(
        "{:<44} {:>10.0}",
        "(a) ring AES-256-GCM seal, 1 thread", seal
    );
    println!(
        "{:<44} {:>10.0}",
        "(b) bare tonic bidi echo, Unix socket", echo_uds_mbps
    );
    println!(
        "{:<44} {:>10.0}",
        "(b') bare tonic bidi echo, TCP", echo_tcp_mbps
    );
    for (name, value, base) in [
        ("(c) WrapStream, Unix socket", wrap_uds, echo_uds_mbps),
        ("(c) UnwrapStream, Unix socket", unwrap_uds, echo_uds_mbps),
        ("(c) WrapStream, TCP (ratio to b')", wrap_tcp, echo_tcp_mbps),
        (
            "(c) UnwrapStream, TCP (ratio to b')",
            unwrap_tcp,
            echo_tcp_mbps,
        ),
    ] {
        println!(
            "{name:<44} {value:>10.0} {:>8.2} {:>8.3}",
            value / base,
            value / seal
        );
    }
    println!(
        "sidecar RSS: {:.1} MiB before (c), peak {:.1} MiB during (c): growth {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_peak.saturating_sub(rss_before) as f64 / 1024.0
    );
    if let Some(r) = python {
        let (sdk_default, sdk_64k, grpc_64k, grpc_1m) = (r[0], r[1], r[2], r[3]);
        println!("64 MiB from Python (test venv):");
        println!("  official ESDK in-process, default 4 KiB frames  {sdk_default:>8.0} MB/s");
        println!("  official ESDK in-process, 64 KiB frames         {sdk_64k:>8.0} MB/s");
        println!(
            "  grpcio WrapStream via sidecar, 64 KiB chunks    {grpc_64k:>8.0} MB/s  ({:.1}x / {:.1}x)",
            grpc_64k / sdk_default,
            grpc_64k / sdk_64k
        );
        println!(
            "  grpcio WrapStream via sidecar, 1 MiB chunks     {grpc_1m:>8.0} MB/s  ({:.1}x / {:.1}x)",
            grpc_1m / sdk_default,
            grpc_1m / sdk_64k
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
