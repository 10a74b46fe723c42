"""Python side of `cargo bench --bench streaming`: 64 MiB encrypted by the
official AWS Encryption SDK in-process (its default 4 KiB frames, and 64 KiB
frames), and streamed by a grpcio client through the sidecar's WrapStream
(64 KiB and 1 MiB request chunks). Prints four rates in MB/s, in that order.

Usage: compare_python.py SOCKET_PATH LOCAL_KEY_FILE
"""

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aws_encryption_sdk
import grpc
from aws_encryption_sdk import Algorithm, CommitmentPolicy
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
SIZE = 64 * 1024 * 1024
CHUNK = 64 * 1024
MIB = 1024 * 1024


def stubs():
    out = tempfile.mkdtemp()
    protoc.main(
        [
            "protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(REPO / "proto/kms_sidecar/v1/kms_sidecar.proto"),
        ]
    )
    sys.path.insert(0, out)
    return (
        importlib.import_module("kms_sidecar.v1.kms_sidecar_pb2"),
        importlib.import_module("kms_sidecar.v1.kms_sidecar_pb2_grpc"),
    )


def main():
    sock, key_file = sys.argv[1], sys.argv[2]
    data = os.urandom(SIZE)
    key = Path(key_file).read_bytes()

    class Local(RawMasterKeyProvider):
        provider_id = "kms-sidecar"

        def _get_raw_key(self, key_id):
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=key,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = Local()
    provider.add_master_key(b"local-key")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    sdk = []
    for frame_length in (4096, CHUNK):
        start = time.perf_counter()
        client.encrypt(
            source=data,
            key_provider=provider,
            algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            frame_length=frame_length,
        )
        sdk.append(SIZE / MIB / (time.perf_counter() - start))

    pb, services = stubs()
    channel = grpc.insecure_channel(
        f"unix://{sock}",
        options=[
            ("grpc.default_authority", "localhost"),
            ("grpc.max_receive_message_length", 8 * MIB),
        ],
    )
    stub = services.KeyServiceStub(channel)
    view = memoryview(data)
    rates = []
    for chunk in (CHUNK, MIB):

        def requests():
            yield pb.WrapStreamRequest()
            for i in range(0, SIZE, chunk):
                yield pb.WrapStreamRequest(chunk=bytes(view[i : i + chunk]))

        start = time.perf_counter()
        total = sum(len(r.chunk) for r in stub.WrapStream(requests()))
        rates.append(SIZE / MIB / (time.perf_counter() - start))
        assert total > SIZE
    print(" ".join(f"{r:.1f}" for r in sdk + rates))


if __name__ == "__main__":
    main()
