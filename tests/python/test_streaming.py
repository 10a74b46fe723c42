"""WrapStream / UnwrapStream from Python grpcio, with the official SDK's
streaming APIs on the other side, and the `kms-sidecar client` subcommand."""

import io
import os
import random
import subprocess

import grpc
import pytest
from aws_encryption_sdk import Algorithm

from conftest import SUITE, error_reason, esdk_client, sidecar_binary

MIB = 1024 * 1024


@pytest.fixture(params=["local", "kms"])
def keyring(request, local_sidecar, kms_sidecar, raw_provider, kms_provider):
    if request.param == "local":
        return local_sidecar, raw_provider
    return kms_sidecar, kms_provider


def random_chunks(data: bytes, rng: random.Random):
    i = 0
    while i < len(data):
        n = rng.choice([1, 13, 4095, 4096, 4097, 65536, 300_000])
        yield data[i : i + n]
        i += n


def wrap_stream(stub, pb, data, context, frame_length=0, seed=1):
    rng = random.Random(seed)

    def requests():
        yield pb.WrapStreamRequest(encryption_context=context, frame_length=frame_length)
        for piece in random_chunks(data, rng):
            yield pb.WrapStreamRequest(chunk=piece)

    responses = list(stub.WrapStream(requests()))
    assert responses[0].key_id
    return b"".join(r.chunk for r in responses), responses[0].key_id


def unwrap_stream(stub, pb, envelope, context, seed=2):
    rng = random.Random(seed)

    def requests():
        yield pb.UnwrapStreamRequest(encryption_context=context)
        for piece in random_chunks(envelope, rng):
            yield pb.UnwrapStreamRequest(chunk=piece)

    responses = list(stub.UnwrapStream(requests()))
    return b"".join(r.chunk for r in responses), responses[0]


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * MIB + 5])
def test_wrap_stream_then_sdk_streaming_decrypt(keyring, pb, size):
    sidecar, provider = keyring
    messages, services = pb
    stub = services.KeyServiceStub(sidecar.channel("unix"))
    data = os.urandom(size)
    envelope, _ = wrap_stream(stub, messages, data, {"stream": "yes"}, frame_length=4096)
    out = io.BytesIO()
    with esdk_client().stream(mode="d", source=io.BytesIO(envelope), key_provider=provider) as dec:
        for chunk in dec:
            out.write(chunk)
        assert dict(dec.header.encryption_context) == {"stream": "yes"}
    assert out.getvalue() == data


@pytest.mark.parametrize("frame_length", [128, 4096, MIB])
def test_sdk_streaming_encrypt_then_unwrap_stream(keyring, pb, frame_length):
    sidecar, provider = keyring
    messages, services = pb
    stub = services.KeyServiceStub(sidecar.channel())
    data = os.urandom(2 * MIB + 333)
    enc = io.BytesIO()
    with esdk_client().stream(
        mode="e",
        source=io.BytesIO(data),
        key_provider=provider,
        encryption_context={"k": "v"},
        algorithm=SUITE,
        frame_length=frame_length,
    ) as encryptor:
        for chunk in encryptor:
            enc.write(chunk)
    plaintext, first = unwrap_stream(stub, messages, enc.getvalue(), {"k": "v"})
    assert plaintext == data
    assert dict(first.encryption_context) == {"k": "v"}


def test_unwrap_stream_truncated_fails(local_sidecar, pb):
    messages, services = pb
    stub = services.KeyServiceStub(local_sidecar.channel())
    data = os.urandom(100_000)
    envelope, _ = wrap_stream(stub, messages, data, {}, frame_length=4096)
    with pytest.raises(grpc.RpcError) as err:
        unwrap_stream(stub, messages, envelope[:-40], {})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "DECRYPT_AUTH_FAILED"


def test_client_subcommand_files_and_pipes(local_sidecar, raw_provider, tmp_path):
    """`kms-sidecar client wrap|unwrap`: file to file, and stdin to stdout;
    the official SDK reads what it wrote and the other way round."""
    data = os.urandom(5 * MIB + 7)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    wrapped = tmp_path / "plain.bin.enc"
    addr = f"unix://{local_sidecar.unix}"
    subprocess.run(
        [sidecar_binary(), "client", "wrap", "--addr", addr, "-i", str(plain), "-o", str(wrapped), "-c", "f=plain"],
        check=True,
        timeout=120,
    )
    decrypted, header = esdk_client().decrypt(source=wrapped.read_bytes(), key_provider=raw_provider)
    assert decrypted == data and dict(header.encryption_context) == {"f": "plain"}

    sdk_envelope, _ = esdk_client().encrypt(
        source=data, key_provider=raw_provider, algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    )
    out = subprocess.run(
        [sidecar_binary(), "client", "unwrap", "--addr", local_sidecar.tcp],
        input=sdk_envelope,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert out.stdout == data

    # A wrong context: exit code 1, a clear message, and no output file.
    target = tmp_path / "never.bin"
    bad = subprocess.run(
        [sidecar_binary(), "client", "unwrap", "--addr", addr, "-i", str(wrapped), "-o", str(target), "-c", "f=other"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert "DECRYPT_AUTH_FAILED" in bad.stderr
    assert not target.exists() and not (tmp_path / "never.bin.partial").exists()


def test_cancelled_streams_are_neither_sealed_nor_blamed_on_the_data(local_key, pb, tmp_path):
    """A client that cancels (RST_STREAM) a WrapStream midway does not get
    its partial input sealed as a complete envelope, and a cancelled
    UnwrapStream is not reported as a corrupt envelope: both are audited
    (and counted) as CANCELLED / STREAM_ABORTED."""
    import json
    import threading
    import time

    from conftest import start_sidecar

    audit = tmp_path / "audit.jsonl"
    sidecar = start_sidecar(
        ["--local-key-file", str(local_key[0]), "--audit-log", str(audit)]
    )
    try:
        m, services = pb
        stub = services.KeyServiceStub(sidecar.channel())
        envelope = stub.Wrap(m.WrapRequest(plaintext=os.urandom(100_000))).envelope

        def cancel_after_first(first):
            release = threading.Event()

            def requests():
                yield first
                release.wait(10)

            return requests, release

        for method, first in (
            ("WrapStream", m.WrapStreamRequest(chunk=b"x" * 3000)),
            ("UnwrapStream", m.UnwrapStreamRequest(chunk=envelope[: len(envelope) // 2])),
        ):
            requests, release = cancel_after_first(first)
            call = getattr(stub, method)(requests())
            time.sleep(0.3)  # the sidecar has read the first message
            call.cancel()
            release.set()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = [json.loads(l) for l in audit.read_text().splitlines()]
            streams = [e for e in events if e["operation"] in ("WrapStream", "UnwrapStream")]
            if len(streams) == 2:
                break
            time.sleep(0.05)
        assert [(e["operation"], e["code"], e["reason"]) for e in streams] == [
            ("WrapStream", "CANCELLED", "STREAM_ABORTED"),
            ("UnwrapStream", "CANCELLED", "STREAM_ABORTED"),
        ], streams
        assert streams[0]["bytes_in"] == 3000
    finally:
        assert sidecar.stop() == 0
