"""A Node.js caller: @grpc/grpc-js over TCP and over the Unix socket, cross-
checked with the official AWS Encryption SDK for JavaScript (tests/node,
installed by tests/run.sh with `npm ci`). Node reports what it saw; this
file computes the expected values itself and decides."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.rpc import error_details_pb2, status_pb2

from conftest import REPO, esdk_client

NODE_DIR = REPO / "tests/node"
SUITE_0478 = 0x0478


@pytest.fixture(scope="module")
def node():
    node = shutil.which("node")
    assert node, "node is required (Node.js >= 18); tests/run.sh installs tests/node"
    assert (NODE_DIR / "node_modules/@grpc/grpc-js").is_dir(), (
        "tests/node/node_modules missing: run tests/run.sh (it runs npm ci in tests/node)"
    )
    return node


def reason(details_b64: str) -> str:
    status = status_pb2.Status.FromString(base64.b64decode(details_b64))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_node_grpc_js_and_js_esdk(node, local_sidecar, local_key, raw_provider, transport, tmp_path):
    # Several frames of every size used below, and not a multiple of any.
    payload = os.urandom(200_003)
    (tmp_path / "payload").write_bytes(payload)
    target = local_sidecar.tcp if transport == "tcp" else f"unix://{local_sidecar.unix}"
    args = {
        "target": target,
        "keyFile": str(local_key[0]),
        "keyNamespace": "interop-ns",
        "keyName": "interop-key",
        "payloadFile": str(tmp_path / "payload"),
        "outDir": str(tmp_path),
    }
    run = subprocess.run(
        [node, str(NODE_DIR / "client.mjs"), json.dumps(args)],
        capture_output=True,
        timeout=120,
        cwd=NODE_DIR,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    report = json.loads(run.stdout)
    digest = hashlib.sha256(payload).hexdigest()
    context = {"lang": "node", "purpose": "interop"}

    assert report["health"] == {"": "SERVING", "kms_sidecar.v1.KeyService": "SERVING"}
    assert report["generate"] == {"key_id": "interop-key", "plaintext_len": 32}

    # Sidecar Wrap, opened by the JS SDK and by the Python SDK.
    assert report["wrap"]["key_id"] == "interop-key"
    assert report["wrap"]["js_decrypt_sha256"] == digest
    assert report["wrap"]["js_suite_id"] == SUITE_0478
    assert report["wrap"]["js_context"] == context
    for name in ("wrap.esdk", "wrapstream.esdk"):
        plaintext, _ = esdk_client().decrypt(
            source=(tmp_path / name).read_bytes(), key_provider=raw_provider
        )
        assert plaintext == payload, name

    # JS SDK envelope, opened by the sidecar (unary and streaming).
    assert report["unwrap"] == {
        "key_id": "interop-key",
        "plaintext_sha256": digest,
        "context": context,
    }
    assert report["unwrap_stream"] == {"key_id": "interop-key", "plaintext_sha256": digest}
    assert report["wrap_stream"]["key_id"] == "interop-key"
    assert report["wrap_stream"]["js_decrypt_sha256"] == digest

    # Failures arrive as the documented status and reason, readable from Node.
    expected = {
        "wrong_context": ("INVALID_ARGUMENT", "DECRYPT_AUTH_FAILED"),
        "wrong_context_stream": ("INVALID_ARGUMENT", "DECRYPT_AUTH_FAILED"),
        "tampered": ("INVALID_ARGUMENT", "DECRYPT_AUTH_FAILED"),
        "unknown_key": ("NOT_FOUND", "KEY_NOT_CONFIGURED"),
    }
    for name, (code, why) in expected.items():
        seen = report["errors"][name]
        assert seen["code"] == code, (name, seen)
        assert seen["status_details_b64"], (name, seen)
        assert reason(seen["status_details_b64"]) == why, (name, seen)
    # Authentication failures name no context value (only key names).
    for name in ("wrong_context", "wrong_context_stream", "tampered"):
        message = report["errors"][name]["message"]
        assert "node" not in message and "interop" not in message and "golang" not in message, message
