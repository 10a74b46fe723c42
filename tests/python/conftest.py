"""Harness for the cross-language tests.

Starts moto's KMS server in-process on a free port, creates KMS keys through
boto3, generates Python gRPC stubs from the repository's proto file, and runs
the real `kms-sidecar` binary (path in KMS_SIDECAR_BIN, set by tests/run.sh)
as a subprocess listening on TCP and on a Unix socket.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aws_encryption_sdk
import boto3
import grpc
import pytest
from aws_encryption_sdk import Algorithm, CommitmentPolicy
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from moto.server import ThreadedMotoServer

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
SUITE = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kms_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # The official SDK and boto3 read these, exactly as a user's app would.
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def kms(kms_endpoint):
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_endpoint)


@pytest.fixture(scope="session")
def kms_key_arn(kms):
    return kms.create_key()["KeyMetadata"]["Arn"]


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Python stubs generated from proto/kms_sidecar/v1/kms_sidecar.proto."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    rc = protoc.main(
        [
            "protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(REPO / "proto/kms_sidecar/v1/kms_sidecar.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    messages = importlib.import_module("kms_sidecar.v1.kms_sidecar_pb2")
    services = importlib.import_module("kms_sidecar.v1.kms_sidecar_pb2_grpc")
    return messages, services


def sidecar_binary() -> str:
    path = os.environ.get("KMS_SIDECAR_BIN", str(REPO / "target/debug/kms-sidecar"))
    assert Path(path).exists(), f"{path} missing: run tests/run.sh (it builds the binary)"
    return path


@dataclass
class Sidecar:
    """A running kms-sidecar process."""

    proc: subprocess.Popen
    tcp: str
    unix: str
    log_path: Path
    channels: list = field(default_factory=list)

    def channel(self, transport: str = "tcp", **options) -> grpc.Channel:
        if transport == "tcp":
            target = self.tcp
        else:
            # grpcio >= 1.57 sends the socket path as :authority, which the
            # Rust HTTP/2 stack rejects; the README documents this option.
            target = f"unix://{self.unix}"
            options.setdefault("grpc.default_authority", "localhost")
        ch = grpc.insecure_channel(target, options=list(options.items()))
        grpc.channel_ready_future(ch).result(timeout=10)
        self.channels.append(ch)
        return ch

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        for ch in self.channels:
            ch.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_sidecar(args: list[str], env: dict | None = None, rust_log: str = "info") -> Sidecar:
    workdir = Path(tempfile.mkdtemp(prefix="kms-sidecar-test-"))
    port = free_port()
    sock = workdir / "kms.sock"
    log_path = workdir / "sidecar.log"
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    full_env["RUST_LOG"] = rust_log
    full_env["NO_COLOR"] = "1"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sidecar_binary(),
            "--listen",
            f"127.0.0.1:{port}",
            "--listen",
            f"unix://{sock}",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited: {log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sidecar did not start: {log_path.read_text()}")
        time.sleep(0.05)
    return Sidecar(proc=proc, tcp=f"127.0.0.1:{port}", unix=str(sock), log_path=log_path)


@pytest.fixture(scope="session")
def local_key(tmp_path_factory) -> tuple[Path, bytes]:
    """A local key file with known bytes, so the official SDK can use it too."""
    path = tmp_path_factory.mktemp("local") / "local-key"
    key = os.urandom(32)
    path.write_bytes(key)
    path.chmod(0o600)
    return path, key


@pytest.fixture(scope="session")
def local_sidecar(local_key):
    sidecar = start_sidecar(
        [
            "--local-key-file",
            str(local_key[0]),
            "--local-key-namespace",
            "interop-ns",
            "--local-key-name",
            "interop-key",
        ]
    )
    yield sidecar
    assert sidecar.stop() == 0


@pytest.fixture(scope="session")
def kms_sidecar(kms_endpoint, kms_key_arn):
    sidecar = start_sidecar(["--keyring", "aws-kms", "--key-id", kms_key_arn])
    yield sidecar
    assert sidecar.stop() == 0


def error_reason(err: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status in {err}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


class StaticRawKeys(RawMasterKeyProvider):
    """The SDK's raw AES keyring (legacy master-key-provider form)."""

    provider_id = "interop-ns"
    key = b""

    def _get_raw_key(self, key_id):
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=self.key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


def esdk_client():
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


@pytest.fixture(scope="module")
def raw_provider(local_key):
    provider = StaticRawKeys()
    provider.key = local_key[1]
    provider.add_master_key(b"interop-key")
    return provider


@pytest.fixture(scope="module")
def kms_provider(kms_key_arn):
    return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key_arn])


