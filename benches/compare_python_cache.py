"""Python side of `cargo bench --bench cache`: the official AWS Encryption
SDK doing the same work as the sidecar's Wrap (1 KiB messages, suite
0x0478, one KMS key, one encryption context), in-process and single
threaded, first without and then with its caching materials manager
(local cache, max age 300 s, 10,000 messages, as the sidecar's defaults).

Prints two lines: `no-cache OPS` and `cache OPS` (messages per second).

Usage: compare_python_cache.py KMS_ENDPOINT KEY_ARN SECONDS_PER_RUN
(dummy credentials and the Region come from the environment).
"""

import os
import sys
import time

import aws_encryption_sdk
import botocore.session
from aws_encryption_sdk import Algorithm, CommitmentPolicy


def rate(client, provider, seconds):
    payload = b"\x07" * 1024
    context = {"tenant": "bench"}
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.encrypt(
            source=payload,
            encryption_context=context,
            algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
            frame_length=65536,
            **provider,
        )
        done += 1
    return done / (time.perf_counter() - start)


def main():
    endpoint, arn, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    session = botocore.session.Session()
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    keys = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[arn], botocore_session=session
    )
    print(f"no-cache {rate(client, {'key_provider': keys}, seconds):.1f}", flush=True)
    cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
        master_key_provider=keys,
        cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=1000),
        max_age=300.0,
        max_messages_encrypted=10000,
    )
    print(f"cache {rate(client, {'materials_manager': cmm}, seconds):.1f}", flush=True)


if __name__ == "__main__":
    main()
