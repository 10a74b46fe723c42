"""Field case B09: bytes fields through grpcurl (reflection only, no proto
files), over TCP and over the Unix socket, mixed with a Python client.

grpcurl 1.8.6 (the PyPI build) speaks reflection v1alpha only; the v1
service is covered by the Rust reflection test. Over a Unix socket, grpcurl
before 1.8.10 sends the socket path as :authority, which the Rust HTTP/2
stack rejects, so the documented command passes `-authority localhost`.
"""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl") or str(Path(__import__("sys").executable).parent / "grpcurl")


def grpcurl(sidecar, transport, *args, data=None):
    if transport == "tcp":
        target = ["-plaintext", sidecar.tcp]
    else:
        target = ["-plaintext", "-unix", "-authority", "localhost", sidecar.unix]
    cmd = [GRPCURL, *(["-d", json.dumps(data)] if data is not None else []), *target, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_b09_grpcurl_bytes_are_base64(local_sidecar, pb, transport):
    described = grpcurl(local_sidecar, transport, "describe", "kms_sidecar.v1.WrapRequest")
    assert "bytes plaintext" in described
    described = grpcurl(local_sidecar, transport, "describe", "kms_sidecar.v1.WrapResponse")
    assert "bytes envelope" in described

    wrapped = json.loads(
        grpcurl(
            local_sidecar,
            transport,
            "kms_sidecar.v1.KeyService/Wrap",
            data={"plaintext": "aGVsbG8=", "encryption_context": {"k": "v"}},
        )
    )
    envelope_b64 = wrapped["envelope"]
    opened = json.loads(
        grpcurl(
            local_sidecar,
            transport,
            "kms_sidecar.v1.KeyService/Unwrap",
            data={"envelope": envelope_b64, "encryption_context": {"k": "v"}},
        )
    )
    assert opened["plaintext"] == "aGVsbG8="

    # The same envelope, decoded, through the Python client.
    messages, services = pb
    stub = services.KeyServiceStub(local_sidecar.channel())
    got = stub.Unwrap(
        messages.UnwrapRequest(envelope=base64.b64decode(envelope_b64), encryption_context={"k": "v"})
    )
    assert got.plaintext == b"hello"

    # Binary wrapped by Python, unwrapped by grpcurl.
    binary = b"\x00\xff\xfe bin"
    env = stub.Wrap(messages.WrapRequest(plaintext=binary)).envelope
    opened = json.loads(
        grpcurl(
            local_sidecar,
            transport,
            "kms_sidecar.v1.KeyService/Unwrap",
            data={"envelope": base64.b64encode(env).decode()},
        )
    )
    assert base64.b64decode(opened["plaintext"]) == binary

    # URL-safe, unpadded base64 is valid in the proto3 JSON mapping: a JSON
    # request built with protobuf's own JSON parser is accepted. (grpcurl
    # 1.8.6 itself only takes standard base64; the README says so.)
    from google.protobuf import json_format

    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff\xfe?").decode().rstrip("=")
    assert "-" in urlsafe and "_" in urlsafe
    request = json_format.Parse(json.dumps({"plaintext": urlsafe}), messages.WrapRequest())
    env = stub.Wrap(request).envelope
    opened = json.loads(
        grpcurl(
            local_sidecar,
            transport,
            "kms_sidecar.v1.KeyService/Unwrap",
            data={"envelope": base64.b64encode(env).decode()},
        )
    )
    assert base64.b64decode(opened["plaintext"]) == b"\xfb\xff\xfe?"


def test_b07_grpcurl_empty_plaintext(local_sidecar):
    wrapped = json.loads(
        grpcurl(local_sidecar, "tcp", "kms_sidecar.v1.KeyService/Wrap", data={"plaintext": ""})
    )
    opened = json.loads(
        grpcurl(
            local_sidecar,
            "tcp",
            "kms_sidecar.v1.KeyService/Unwrap",
            data={"envelope": wrapped["envelope"]},
        )
    )
    # proto3 JSON omits empty bytes: no plaintext field means b"".
    assert opened.get("plaintext", "") == ""


def test_grpcurl_lists_services_and_health(local_sidecar):
    listed = grpcurl(local_sidecar, "unix", "list").split()
    assert "kms_sidecar.v1.KeyService" in listed and "grpc.health.v1.Health" in listed
    health = json.loads(
        grpcurl(
            local_sidecar,
            "tcp",
            "grpc.health.v1.Health/Check",
            data={"service": "kms_sidecar.v1.KeyService"},
        )
    )
    assert health["status"] == "SERVING"
