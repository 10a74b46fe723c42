//! WrapStream / UnwrapStream end to end over gRPC (local keyring): frame
//! boundaries and arbitrary chunkings, compatibility with the unary RPCs,
//! damage of every kind ends in an error (never OK), limits and timers,
//! and a 1 GiB round trip compared by hash.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::time::{Duration, Instant};

use common::{Sidecar, ctx, local_keyring, reason};
use kms_sidecar::config::ServiceConfig;
use kms_sidecar::proto::key_service_client::KeyServiceClient;
use kms_sidecar::proto::{UnwrapRequest, UnwrapStreamRequest, WrapRequest, WrapStreamRequest};
use kms_sidecar::streaming::StreamConfig;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const MIB: usize = 1024 * 1024;

fn wrap_requests(
    frame_length: u32,
    context: &[(&str, &str)],
    data: &[u8],
    chunk: usize,
) -> Vec<WrapStreamRequest> {
    let mut msgs = vec![WrapStreamRequest {
        frame_length,
        encryption_context: ctx(context),
        ..Default::default()
    }];
    for piece in data.chunks(chunk.max(1)) {
        msgs.push(WrapStreamRequest {
            chunk: piece.to_vec(),
            ..Default::default()
        });
    }
    msgs
}

fn unwrap_requests(
    context: &[(&str, &str)],
    envelope: &[u8],
    chunk: usize,
) -> Vec<UnwrapStreamRequest> {
    let mut msgs = vec![UnwrapStreamRequest {
        encryption_context: ctx(context),
        chunk: Vec::new(),
    }];
    for piece in envelope.chunks(chunk.max(1)) {
        msgs.push(UnwrapStreamRequest {
            chunk: piece.to_vec(),
            ..Default::default()
        });
    }
    msgs
}

async fn wrap_stream(
    client: &mut KeyServiceClient<Channel>,
    msgs: Vec<WrapStreamRequest>,
) -> Vec<u8> {
    let mut responses = client
        .wrap_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut first = true;
    while let Some(msg) = responses.next().await {
        let msg = msg.unwrap();
        assert_eq!(
            !msg.key_id.is_empty(),
            first,
            "key_id only in the first response"
        );
        first = false;
        out.extend_from_slice(&msg.chunk);
    }
    out
}

/// Runs UnwrapStream to its end: the plaintext received and the final status.
async fn unwrap_stream(
    client: &mut KeyServiceClient<Channel>,
    msgs: Vec<UnwrapStreamRequest>,
) -> (Vec<u8>, Result<(), tonic::Status>) {
    let mut out = Vec::new();
    let mut responses = match client.unwrap_stream(tokio_stream::iter(msgs)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (out, Err(status)),
    };
    while let Some(msg) = responses.next().await {
        match msg {
            Ok(m) => out.extend_from_slice(&m.chunk),
            Err(status) => return (out, Err(status)),
        }
    }
    (out, Ok(()))
}

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

#[tokio::test]
async fn frame_boundaries_and_chunkings_roundtrip() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    for frame in [128usize, 4096] {
        for len in [0, 1, frame - 1, frame, frame + 1, 7 * frame + 3] {
            let plaintext = data(len);
            for chunk in [1, 7, frame - 1, frame, frame + 1, 3 * frame + 5, MIB] {
                if chunk == 1 && len > 2 * frame {
                    continue; // one-byte chunks: covered by the shorter inputs
                }
                let envelope = wrap_stream(
                    &mut client,
                    wrap_requests(frame as u32, &[("k", "v")], &plaintext, chunk),
                )
                .await;
                let (out, status) = unwrap_stream(
                    &mut client,
                    unwrap_requests(&[("k", "v")], &envelope, chunk),
                )
                .await;
                status.unwrap();
                assert_eq!(out, plaintext, "frame {frame} len {len} chunk {chunk}");
            }
        }
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn streamed_and_unary_envelopes_are_interchangeable() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let plaintext = data(300_000);
    let streamed = wrap_stream(
        &mut client,
        wrap_requests(0, &[("a", "b")], &plaintext, 10_000),
    )
    .await;
    let opened = client
        .unwrap(UnwrapRequest {
            envelope: streamed,
            encryption_context: ctx(&[("a", "b")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, plaintext);

    let unary = client
        .wrap(WrapRequest {
            plaintext: plaintext.clone(),
            encryption_context: ctx(&[("a", "b")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .envelope;
    let (out, status) =
        unwrap_stream(&mut client, unwrap_requests(&[("a", "b")], &unary, 777)).await;
    status.unwrap();
    assert_eq!(out, plaintext);
    sidecar.stop().await;
}

/// Frames of an envelope written with `frame` bytes per frame: the header
/// length and the byte ranges of every frame.
fn frame_ranges(envelope: &[u8], frame: usize) -> (usize, Vec<std::ops::Range<usize>>) {
    let limits = kms_sidecar::envelope::EnvelopeLimits::default();
    let header = kms_sidecar::envelope::parse_header(envelope, &limits)
        .unwrap()
        .unwrap()
        .len;
    let mut ranges = Vec::new();
    let mut pos = header;
    let regular = 4 + 12 + frame + 16;
    while envelope[pos..pos + 4] != [0xff; 4] {
        ranges.push(pos..pos + regular);
        pos += regular;
    }
    ranges.push(pos..envelope.len());
    (header, ranges)
}

#[tokio::test]
async fn truncation_extension_and_reordering_never_end_ok() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let frame = 256;
    let plaintext = data(frame * 6 + 10);
    let envelope = wrap_stream(
        &mut client,
        wrap_requests(frame as u32, &[], &plaintext, 1000),
    )
    .await;
    let (header, frames) = frame_ranges(&envelope, frame);
    assert_eq!(frames.len(), 7);

    let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncation at every frame boundary, and inside the header.
    damaged.push(("header cut".into(), envelope[..header - 1].to_vec()));
    for f in &frames {
        damaged.push((format!("cut at {}", f.start), envelope[..f.start].to_vec()));
    }
    damaged.push((
        "last byte cut".into(),
        envelope[..envelope.len() - 1].to_vec(),
    ));
    // One appended byte.
    let mut appended = envelope.clone();
    appended.push(0);
    damaged.push(("appended byte".into(), appended));
    // Two regular frames swapped.
    let mut swapped = envelope[..frames[1].start].to_vec();
    swapped.extend_from_slice(&envelope[frames[2].clone()]);
    swapped.extend_from_slice(&envelope[frames[1].clone()]);
    swapped.extend_from_slice(&envelope[frames[3].start..]);
    damaged.push(("swapped frames".into(), swapped));
    // The final frame duplicated.
    let mut duplicated = envelope.clone();
    duplicated.extend_from_slice(&envelope[frames[6].clone()]);
    damaged.push(("duplicated final frame".into(), duplicated));
    // A regular frame duplicated.
    let mut dup_regular = envelope[..frames[2].end].to_vec();
    dup_regular.extend_from_slice(&envelope[frames[2].start..]);
    damaged.push(("duplicated regular frame".into(), dup_regular));

    for (what, bytes) in damaged {
        for chunk in [1usize, 100, frame + 32, 1 << 20] {
            let (out, status) =
                unwrap_stream(&mut client, unwrap_requests(&[], &bytes, chunk)).await;
            let status = status.expect_err(&what);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert_eq!(reason(&status), "DECRYPT_AUTH_FAILED", "{what}");
            // Whatever was released is a verified prefix of the plaintext.
            assert!(
                plaintext.starts_with(&out),
                "{what}: unverified bytes released"
            );
            assert!(
                out.len() < plaintext.len(),
                "{what}: all plaintext released before failing"
            );
        }
    }
    sidecar.stop().await;
}

fn small_stream_config(streams: StreamConfig) -> ServiceConfig {
    ServiceConfig {
        streams,
        ..ServiceConfig::default()
    }
}

/// Field case B12 (streaming): a client that writes 64 MiB before reading
/// anything gets RESOURCE_EXHAUSTED once the server's buffer stays full for
/// the stall timeout, well before its own deadline; a client that reads
/// while it writes completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_naive_writer_fails_fast_and_polite_one_completes() {
    let stall = Duration::from_secs(1);
    let sidecar = Sidecar::start_with(
        local_keyring(1),
        small_stream_config(StreamConfig {
            stall_timeout: stall,
            ..StreamConfig::default()
        }),
        &[],
    )
    .await;
    let mut client = sidecar.client().await;

    // Naive: send all 64 MiB first, only then look at the responses.
    let (tx, rx) = tokio::sync::mpsc::channel::<WrapStreamRequest>(1);
    let started = Instant::now();
    let call = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request.set_timeout(Duration::from_secs(10));
            client.wrap_stream(request).await
        })
    };
    let writer = tokio::spawn(async move {
        let _ = tx.send(WrapStreamRequest::default()).await;
        for _ in 0..64 {
            if tx
                .send(WrapStreamRequest {
                    chunk: vec![0u8; MIB],
                    ..Default::default()
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut responses = call.await.unwrap().unwrap().into_inner();
    // Naive: wait until everything is written before reading anything. The
    // writer stops when the server gives up on the call.
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer is released when the server ends the call")
        .unwrap();
    let mut status = None;
    while let Some(msg) = responses.next().await {
        if let Err(s) = msg {
            status = Some(s);
            break;
        }
    }
    let status = status.expect("the naive call must fail");
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "STREAM_NOT_READ");
    assert!(
        elapsed < Duration::from_secs(8),
        "failed fast ({elapsed:?}), not at the deadline"
    );

    // Polite: reads while writing (tonic drives both directions).
    let plaintext = data(64 * MIB);
    let envelope = wrap_stream(&mut client, wrap_requests(0, &[], &plaintext, MIB)).await;
    assert!(envelope.len() > plaintext.len());
    sidecar.stop().await;
}

#[tokio::test]
async fn stream_slots_and_timers() {
    let sidecar = Sidecar::start_with(
        local_keyring(1),
        small_stream_config(StreamConfig {
            max_concurrent: 1,
            first_message_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            stall_timeout: Duration::from_secs(5),
        }),
        &[],
    )
    .await;
    let mut client = sidecar.client().await;

    // A stream that sends nothing holds the only slot until its first
    // message timer fires.
    let (idle_tx, idle_rx) = tokio::sync::mpsc::channel::<UnwrapStreamRequest>(1);
    let mut idle = client
        .unwrap_stream(tokio_stream::wrappers::ReceiverStream::new(idle_rx))
        .await
        .unwrap()
        .into_inner();
    let refused = client
        .wrap_stream(tokio_stream::iter(wrap_requests(0, &[], b"x", 1)))
        .await;
    let status = match refused {
        Err(s) => s,
        Ok(r) => r.into_inner().next().await.unwrap().unwrap_err(),
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "TOO_MANY_STREAMS");

    let status = idle.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&status), "STREAM_IDLE_TIMEOUT");
    drop(idle_tx);

    // The slot is free again.
    let envelope = wrap_stream(&mut client, wrap_requests(0, &[], b"again", 2)).await;
    assert!(!envelope.is_empty());

    // An empty request stream is a caller error.
    let mut responses = client
        .wrap_stream(tokio_stream::iter(Vec::<WrapStreamRequest>::new()))
        .await
        .unwrap()
        .into_inner();
    let status = responses.next().await.unwrap().unwrap_err();
    assert_eq!(reason(&status), "INVALID_REQUEST");

    // Frame length out of range.
    let mut responses = client
        .wrap_stream(tokio_stream::iter(wrap_requests(
            2 * MIB as u32,
            &[],
            b"x",
            1,
        )))
        .await
        .unwrap()
        .into_inner();
    let status = responses.next().await.unwrap().unwrap_err();
    assert_eq!(reason(&status), "INVALID_REQUEST");
    assert!(status.message().contains("1048576"));
    sidecar.stop().await;
}

/// Field case B02 (streaming): one request message over the limit is
/// refused with RESOURCE_EXHAUSTED naming both sizes, as in unary calls.
#[tokio::test]
async fn b02_oversized_stream_message() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let msgs = vec![
        WrapStreamRequest::default(),
        WrapStreamRequest {
            chunk: vec![0; 4 * MIB + 1],
            ..Default::default()
        },
    ];
    let mut status = None;
    match client.wrap_stream(tokio_stream::iter(msgs)).await {
        Err(s) => status = Some(s),
        Ok(r) => {
            let mut responses = r.into_inner();
            while let Some(msg) = responses.next().await {
                if let Err(s) = msg {
                    status = Some(s);
                }
            }
        }
    }
    let status = status.expect("must fail");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "PAYLOAD_TOO_LARGE");
    assert!(status.message().contains(&(4 * MIB).to_string()));
    // A message of exactly the limit's payload fits (chunk field overhead aside).
    let envelope = wrap_stream(
        &mut client,
        wrap_requests(0, &[], &vec![1u8; 4 * MIB - 64], 4 * MIB),
    )
    .await;
    assert!(envelope.len() > 4 * MIB - 64);
    sidecar.stop().await;
}

/// 1 GiB through WrapStream piped straight into UnwrapStream, compared by
/// SHA-256; nothing of that size is ever held in memory by the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streamed_roundtrip() {
    use ring::digest::{Context, SHA256};
    const TOTAL: usize = 1 << 30;
    const CHUNK: usize = MIB;
    let sidecar = Sidecar::start(local_keyring(1)).await;
    // One connection per direction, as two processes in a pipe would have.
    let client = sidecar.client().await;
    let unwrap_connection = sidecar.client().await;

    let (plain_tx, plain_rx) = tokio::sync::mpsc::channel::<WrapStreamRequest>(4);
    let producer = tokio::spawn(async move {
        let mut hash = Context::new(&SHA256);
        plain_tx
            .send(WrapStreamRequest {
                encryption_context: ctx(&[("size", "1GiB")]),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut block = data(CHUNK);
        for i in 0..TOTAL / CHUNK {
            block[0] = i as u8;
            block[CHUNK - 1] = (i >> 8) as u8;
            hash.update(&block);
            plain_tx
                .send(WrapStreamRequest {
                    chunk: block.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        hash.finish()
    });

    let (env_tx, env_rx) = tokio::sync::mpsc::channel::<UnwrapStreamRequest>(4);
    let mut wrap_client = client.clone();
    let relay = tokio::spawn(async move {
        let mut responses = wrap_client
            .wrap_stream(tokio_stream::wrappers::ReceiverStream::new(plain_rx))
            .await
            .unwrap()
            .into_inner();
        env_tx
            .send(UnwrapStreamRequest {
                encryption_context: ctx(&[("size", "1GiB")]),
                chunk: Vec::new(),
            })
            .await
            .unwrap();
        let mut envelope_bytes = 0u64;
        while let Some(msg) = responses.next().await {
            let chunk = msg.unwrap().chunk;
            envelope_bytes += chunk.len() as u64;
            env_tx
                .send(UnwrapStreamRequest {
                    chunk,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        envelope_bytes
    });

    let mut unwrap_client = unwrap_connection;
    let mut responses = unwrap_client
        .unwrap_stream(tokio_stream::wrappers::ReceiverStream::new(env_rx))
        .await
        .unwrap()
        .into_inner();
    let mut hash = Context::new(&SHA256);
    let mut received = 0usize;
    while let Some(msg) = responses.next().await {
        let chunk = msg.unwrap().chunk;
        received += chunk.len();
        hash.update(&chunk);
    }
    let sent = producer.await.unwrap();
    let envelope_bytes = relay.await.unwrap();
    assert_eq!(received, TOTAL);
    assert!(envelope_bytes > TOTAL as u64);
    assert_eq!(
        hash.finish().as_ref(),
        sent.as_ref(),
        "SHA-256 of 1 GiB matches"
    );
    sidecar.stop().await;
}

/// Every single-bit flip in the header gets the same status from
/// UnwrapStream as from unary Unwrap (damage is damage, whichever path).
#[tokio::test]
async fn header_damage_reads_the_same_in_both_paths() {
    let sidecar = Sidecar::start(local_keyring(1)).await;
    let mut client = sidecar.client().await;
    let envelope = wrap_stream(
        &mut client,
        wrap_requests(16, &[("tenant", "acme")], b"0123456789abcdefXYZ", 7),
    )
    .await;
    let limits = kms_sidecar::envelope::EnvelopeLimits::default();
    let header_len = kms_sidecar::envelope::parse_header(&envelope, &limits)
        .unwrap()
        .unwrap()
        .len;
    for i in 0..header_len {
        for bit in 0..8 {
            let mut damaged = envelope.clone();
            damaged[i] ^= 1 << bit;
            let unary = client
                .unwrap(UnwrapRequest {
                    envelope: damaged.clone(),
                    encryption_context: ctx(&[("tenant", "acme")]),
                })
                .await
                .unwrap_err();
            let (_, streamed) = unwrap_stream(
                &mut client,
                unwrap_requests(&[("tenant", "acme")], &damaged, 64),
            )
            .await;
            let streamed = streamed.unwrap_err();
            assert_eq!(
                (streamed.code(), reason(&streamed)),
                (unary.code(), reason(&unary)),
                "byte {i} bit {bit}"
            );
        }
    }
    sidecar.stop().await;
}
