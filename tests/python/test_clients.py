"""A real gRPC client in another language (Python grpcio, stubs generated
from the repository's proto) over TCP and over the Unix socket."""

import base64
import os

import boto3
import grpc
import pytest

from conftest import error_reason, start_sidecar

MIB = 1024 * 1024
MAX_WRAP_PLAINTEXT = 4 * MIB - 64 * 1024


@pytest.fixture(params=["tcp", "unix"])
def transport(request):
    return request.param


def client(sidecar, pb, transport="tcp"):
    messages, services = pb
    return messages, services.KeyServiceStub(sidecar.channel(transport))


def test_generate_wrap_unwrap_over_kms(kms_sidecar, kms_key_arn, pb, transport, kms):
    m, c = client(kms_sidecar, pb, transport)
    dk = c.GenerateDataKey(m.GenerateDataKeyRequest(encryption_context={"svc": "py"}))
    assert dk.key_id == kms_key_arn
    assert len(dk.plaintext) == 32
    assert kms.decrypt(CiphertextBlob=dk.ciphertext_blob, EncryptionContext={"svc": "py"})[
        "Plaintext"
    ] == dk.plaintext

    wp = c.GenerateDataKey(m.GenerateDataKeyRequest(without_plaintext=True, number_of_bytes=24))
    assert wp.plaintext == b""
    assert len(kms.decrypt(CiphertextBlob=wp.ciphertext_blob)["Plaintext"]) == 24

    payload = b"\x00\xff\xfe bin" + os.urandom(100)
    wrapped = c.Wrap(m.WrapRequest(plaintext=payload, encryption_context={"k": "v"}))
    opened = c.Unwrap(m.UnwrapRequest(envelope=wrapped.envelope, encryption_context={"k": "v"}))
    assert opened.plaintext == payload
    assert opened.key_id == kms_key_arn


def test_generate_wrap_unwrap_over_local(local_sidecar, pb, transport):
    m, c = client(local_sidecar, pb, transport)
    dk = c.GenerateDataKey(m.GenerateDataKeyRequest(number_of_bytes=48))
    assert len(dk.plaintext) == 48 and dk.key_id == "interop-key"
    wrapped = c.Wrap(m.WrapRequest(plaintext=b"hello"))
    assert c.Unwrap(m.UnwrapRequest(envelope=wrapped.envelope)).plaintext == b"hello"


def test_b01_context_mismatch_same_reason(kms_sidecar, pb):
    m, c = client(kms_sidecar, pb)
    original = {"tenant": "acme", "purpose": "invoice"}
    env = c.Wrap(m.WrapRequest(plaintext=b"B01-probe", encryption_context=original)).envelope
    for supplied in (
        {"tenant": "acme", "purpose": "Invoice"},
        {"tenant": "acme"},
        {**original, "extra": "1"},
        {},
    ):
        with pytest.raises(grpc.RpcError) as err:
            c.Unwrap(m.UnwrapRequest(envelope=env, encryption_context=supplied))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err.value) == "DECRYPT_AUTH_FAILED"
        assert "acme" not in err.value.details() and "Invoice" not in err.value.details()
    reversed_ctx = dict(reversed(list(original.items())))
    ok = c.Unwrap(m.UnwrapRequest(envelope=env, encryption_context=reversed_ctx))
    assert ok.plaintext == b"B01-probe"


def test_b02_stock_client_sizes(local_sidecar, pb):
    """The stock Python client (4 MiB receive limit) never gets a reply it
    rejects: the largest accepted payload round-trips, larger ones are
    refused by the server with both sizes named."""
    m, c = client(local_sidecar, pb)
    payload = os.urandom(MAX_WRAP_PLAINTEXT)
    env = c.Wrap(m.WrapRequest(plaintext=payload)).envelope
    assert c.Unwrap(m.UnwrapRequest(envelope=env)).plaintext == payload
    for size in (MAX_WRAP_PLAINTEXT + 1, 4 * MIB - 1024, 4 * MIB, 4 * MIB + 1):
        with pytest.raises(grpc.RpcError) as err:
            c.Wrap(m.WrapRequest(plaintext=b"\0" * size))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, size
        assert error_reason(err.value) == "PAYLOAD_TOO_LARGE"
        assert str(size) in err.value.details() or str(size + 5) in err.value.details()
    # Still usable afterwards.
    assert c.Wrap(m.WrapRequest(plaintext=b"x")).envelope


def test_b07_empty_plaintext(local_sidecar, pb, transport):
    m, c = client(local_sidecar, pb, transport)
    for ctx in ({"k": "v"}, {}):
        wrapped = c.Wrap(m.WrapRequest(encryption_context=ctx))
        opened = c.Unwrap(m.UnwrapRequest(envelope=wrapped.envelope, encryption_context=ctx))
        assert opened.plaintext == b""
        tampered = bytearray(wrapped.envelope)
        tampered[-1] ^= 1
        with pytest.raises(grpc.RpcError) as err:
            c.Unwrap(m.UnwrapRequest(envelope=bytes(tampered), encryption_context=ctx))
        assert error_reason(err.value) == "DECRYPT_AUTH_FAILED"


def test_health_over_unix_socket(local_sidecar):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(local_sidecar.channel("unix"))
    for service in ("", "kms_sidecar.v1.KeyService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_credentials_unavailable_is_named(kms_endpoint, kms_key_arn, pb, tmp_path):
    """No credentials anywhere in the chain: the call fails with
    AWS_CREDENTIALS_UNAVAILABLE, not a generic error."""
    env = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    sidecar = start_sidecar(["--keyring", "aws-kms", "--key-id", kms_key_arn], env=env)
    try:
        m, c = client(sidecar, pb)
        with pytest.raises(grpc.RpcError) as err:
            c.Wrap(m.WrapRequest(plaintext=b"x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(err.value) == "AWS_CREDENTIALS_UNAVAILABLE"
    finally:
        assert sidecar.stop() == 0


def test_invalid_configuration_fails_fast_with_one_line(tmp_path):
    import subprocess

    from conftest import sidecar_binary

    for args, needle in (
        (["--keyring", "aws-kms"], "--key-id"),
        (["--listen", "unix://relative.sock"], "absolute"),
        (["--frame-length", "12"], "1024 to 1048576"),
    ):
        out = subprocess.run(
            [sidecar_binary(), "--local-key-file", str(tmp_path / "k"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], out.stderr


def test_zero_config_start_creates_key_file(pb, tmp_path):
    """With no options but a data directory, the sidecar creates its key
    file (mode 0600) and logs where it is."""
    env = {"XDG_DATA_HOME": str(tmp_path)}
    sidecar = start_sidecar([], env=env)
    try:
        m, c = client(sidecar, pb)
        assert c.Unwrap(m.UnwrapRequest(envelope=c.Wrap(m.WrapRequest(plaintext=b"z")).envelope)).plaintext == b"z"
        key_file = tmp_path / "kms-sidecar" / "local-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.stat().st_size == 32
        assert str(key_file) in sidecar.log()
    finally:
        assert sidecar.stop() == 0


def test_malformed_requests_are_invalid_argument(local_sidecar):
    """Bytes that are not a valid request message, or no message at all:
    INVALID_ARGUMENT / INVALID_REQUEST, never INTERNAL."""
    channel = local_sidecar.channel()
    wrap = channel.unary_unary(
        "/kms_sidecar.v1.KeyService/Wrap",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    for raw in (b"\x0a\x02\xff\xfe", b"\x12\x05ab", b"\x1a\x03\x0a\x01"):
        with pytest.raises(grpc.RpcError) as err:
            wrap(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw
        assert error_reason(err.value) == "INVALID_REQUEST"
    no_message = channel.stream_unary(
        "/kms_sidecar.v1.KeyService/Wrap",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        no_message(iter(()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "INVALID_REQUEST"


def test_unfinished_unary_request_times_out(local_key, pb):
    """A unary call whose request never completes is ended by
    --request-timeout instead of holding its buffer forever."""
    import threading
    import time

    sidecar = start_sidecar(["--local-key-file", str(local_key[0]), "--request-timeout", "1s"])
    try:
        messages, _ = pb
        call = sidecar.channel().stream_unary(
            "/kms_sidecar.v1.KeyService/Wrap",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        release = threading.Event()

        def never_half_close():
            yield messages.WrapRequest(plaintext=b"\xaa" * 1_000_000).SerializeToString()
            release.wait(30)

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(never_half_close(), timeout=20)
        release.set()
        assert time.monotonic() - started < 10
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    finally:
        assert sidecar.stop() == 0
