"""Field case B14: with every crate logging at trace level and the audit
trail on (JSON lines on stdout), no data key, plaintext or credential
appears in the sidecar's output, in any encoding; and the audit trail holds
one well-formed event per key use."""

import base64
import json
import os
import re
import struct

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import start_sidecar

MARKER = b"B14-SECRET-MARKER-7f3a"
SECRET_ACCESS_KEY = "B14SecretAccessKeyDoNotLog0123456789abcd"
SESSION_TOKEN = "B14SessionTokenDoNotLogQWERTYUIOPasdfghjkl"


def forms(secret: bytes) -> list[bytes]:
    """Ways a secret could be written to a log."""
    out = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b64encode(secret).rstrip(b"="),
    ]
    if len(secret) >= 8:
        # Rust's Debug of a byte slice: [12, 34, ...]
        out.append(", ".join(str(b) for b in secret[:8]).encode())
    return out


def unwrap_raw_aes_edk(envelope: bytes, key: bytes) -> bytes:
    """Recovers the data key of a raw-AES-keyring message with its
    wrapping key (test-side, to know what must not be logged)."""
    pos = 1 + 2 + 32
    (aad_len,) = struct.unpack_from(">H", envelope, pos)
    aad = envelope[pos + 2 : pos + 2 + aad_len]
    pos += 2 + aad_len + 2  # EDK count

    def field(p):
        (n,) = struct.unpack_from(">H", envelope, p)
        return envelope[p + 2 : p + 2 + n], p + 2 + n

    _, pos = field(pos)  # provider ID
    info, pos = field(pos)
    ciphertext, pos = field(pos)
    iv = info[-12:]
    return AESGCM(key).decrypt(iv, ciphertext, aad)


def exercise(sidecar, pb, extra_secrets):
    messages, services = pb
    stub = services.KeyServiceStub(sidecar.channel())
    secrets = list(extra_secrets)
    for without in (False, True):
        dk = stub.GenerateDataKey(messages.GenerateDataKeyRequest(without_plaintext=without))
        if dk.plaintext:
            secrets.append(dk.plaintext)
    wrapped = stub.Wrap(messages.WrapRequest(plaintext=MARKER, encryption_context={"k": "v"}))
    opened = stub.Unwrap(messages.UnwrapRequest(envelope=wrapped.envelope, encryption_context={"k": "v"}))
    assert opened.plaintext == MARKER
    for bad in ({"k": "w"}, {}):
        try:
            stub.Unwrap(messages.UnwrapRequest(envelope=wrapped.envelope, encryption_context=bad))
            raise AssertionError("wrong context accepted")
        except grpc.RpcError:
            pass
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_pb2_grpc.HealthStub(sidecar.channel()).Check(health_pb2.HealthCheckRequest())
    return wrapped.envelope, secrets


def assert_clean(log: bytes, secrets):
    assert b"TRACE" in log or b"trace" in log.lower(), "trace logging was not on"
    for secret in secrets:
        for form in forms(secret):
            assert form not in log, f"secret leaked in a log line ({len(secret)}-byte secret)"


def wrap_over_unix_socket(sidecar, pb):
    messages, services = pb
    stub = services.KeyServiceStub(sidecar.channel("unix"))
    stub.Wrap(messages.WrapRequest(plaintext=MARKER, encryption_context={"k": "v"}))


def check_audit(log: bytes, key_id: str):
    """The audit events of exercise() + wrap_over_unix_socket()."""
    lines = [l for l in log.decode(errors="replace").splitlines() if l.startswith('{"time"')]
    events = [json.loads(l) for l in lines]
    ops = [e["operation"] for e in events]
    assert ops == ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Wrap", "Unwrap", "Unwrap", "Unwrap", "Wrap"], ops
    hashed = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")
    for e in events:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", e["time"]), e
        assert e["duration_ms"] >= 0
        assert all(hashed.match(v) for v in e["context"].values()), e
    gdk, gdk_no_plain, wrap, unwrap_ok, bad_value, no_context, unix_wrap = events
    assert gdk["caller"] == "anonymous" and gdk["peer"].startswith("127.0.0.1:")
    assert gdk["key_id"] == key_id and gdk["code"] == "OK" and gdk["bytes_out"] > 32
    assert wrap["key_id"] == key_id and wrap["bytes_in"] == len(MARKER) and wrap["bytes_out"] > len(MARKER)
    assert list(wrap["context"]) == ["k"]
    assert unwrap_ok["code"] == "OK" and unwrap_ok["bytes_out"] == len(MARKER)
    # Same value, same keyed hash; another value, another hash.
    assert unwrap_ok["context"]["k"] == wrap["context"]["k"]
    assert bad_value["context"]["k"] != wrap["context"]["k"]
    for failed in (bad_value, no_context):
        assert failed["code"] == "INVALID_ARGUMENT" and failed["reason"] == "DECRYPT_AUTH_FAILED", failed
        assert failed["key_id"] is None
    assert no_context["context"] == {}
    assert unix_wrap["caller"] == f"uid:{os.getuid()}" and unix_wrap["gid"] == os.getgid()
    assert "peer" not in unix_wrap


def test_b14_local_keyring(local_key, pb):
    path, wrapping_key = local_key
    sidecar = start_sidecar(
        [
            "--local-key-file", str(path), "--local-key-namespace", "interop-ns",
            "--local-key-name", "interop-key", "--audit-log", "stdout",
        ],
        rust_log="trace",
    )
    try:
        envelope, secrets = exercise(sidecar, pb, [wrapping_key, MARKER])
        wrap_over_unix_socket(sidecar, pb)
        secrets.append(unwrap_raw_aes_edk(envelope, wrapping_key))
    finally:
        assert sidecar.stop() == 0
    log = sidecar.log_path.read_bytes()
    assert_clean(log, secrets)
    check_audit(log, "interop-key")


def test_b14_kms_keyring(kms, kms_key_arn, pb):
    env = {
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
    }
    sidecar = start_sidecar(
        ["--keyring", "aws-kms", "--key-id", kms_key_arn, "--audit-log", "stdout"], env=env, rust_log="trace"
    )
    try:
        envelope, secrets = exercise(sidecar, pb, [MARKER, SECRET_ACCESS_KEY.encode(), SESSION_TOKEN.encode()])
        wrap_over_unix_socket(sidecar, pb)
    finally:
        assert sidecar.stop() == 0
    # The envelope's data key, recovered through KMS by the test.
    pos = 1 + 2 + 32
    (aad_len,) = struct.unpack_from(">H", envelope, pos)
    aad = envelope[pos + 4 : pos + 2 + aad_len]
    pos += 2 + aad_len + 2
    (n,) = struct.unpack_from(">H", envelope, pos)
    pos += 2 + n
    (n,) = struct.unpack_from(">H", envelope, pos)
    pos += 2 + n
    (n,) = struct.unpack_from(">H", envelope, pos)
    blob = envelope[pos + 2 : pos + 2 + n]
    data_key = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})["Plaintext"]
    assert len(data_key) == 32 and aad
    secrets.append(data_key)
    log = sidecar.log_path.read_bytes()
    assert b"GenerateDataKey" in log, "the KMS calls were traced"
    assert_clean(log, secrets)
    check_audit(log, kms_key_arn)
