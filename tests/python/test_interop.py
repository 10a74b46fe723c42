"""Cross-implementation tests with the official AWS Encryption SDK for Python.

Both directions, both keyrings: what the sidecar wraps, the SDK decrypts;
what the SDK encrypts (suite 0x0478, several frame lengths and non-framed),
the sidecar unwraps, byte for byte.
"""

import io
import os

import pytest

from conftest import SUITE, esdk_client

MIB = 1024 * 1024

CONTEXTS = {
    "empty": {},
    "ascii": {"tenant": "acme", "purpose": "invoice"},
    "non-ascii": {"région": "Île-de-France", "名前": "値", "emoji": "🔐"},
}
PAYLOADS = {
    "empty": b"",
    "small": b"interop \x00\xff payload",
    "3MiB": os.urandom(3 * MIB),
}
# 0 = non-framed
FRAME_LENGTHS = [128, 4096, MIB, 0]


@pytest.fixture(params=["local", "kms"])
def keyring(request, local_sidecar, kms_sidecar, raw_provider, kms_provider, kms_key_arn):
    if request.param == "local":
        return local_sidecar, raw_provider, "interop-key"
    return kms_sidecar, kms_provider, kms_key_arn


def stub(sidecar, pb):
    messages, services = pb
    return messages, services.KeyServiceStub(sidecar.channel())


@pytest.mark.parametrize("ctx_name", CONTEXTS)
@pytest.mark.parametrize("payload_name", PAYLOADS)
def test_sidecar_wrap_then_sdk_decrypt(keyring, pb, ctx_name, payload_name):
    sidecar, provider, key_id = keyring
    messages, client = stub(sidecar, pb)
    context, payload = CONTEXTS[ctx_name], PAYLOADS[payload_name]
    wrapped = client.Wrap(messages.WrapRequest(plaintext=payload, encryption_context=context))
    assert wrapped.key_id == key_id
    plaintext, header = esdk_client().decrypt(source=wrapped.envelope, key_provider=provider)
    assert plaintext == payload
    assert header.algorithm == SUITE
    assert dict(header.encryption_context) == context


@pytest.mark.parametrize("frame_length", FRAME_LENGTHS)
@pytest.mark.parametrize("ctx_name", CONTEXTS)
@pytest.mark.parametrize("payload_name", PAYLOADS)
def test_sdk_encrypt_then_sidecar_unwrap(keyring, pb, frame_length, ctx_name, payload_name):
    sidecar, provider, key_id = keyring
    messages, client = stub(sidecar, pb)
    context, payload = CONTEXTS[ctx_name], PAYLOADS[payload_name]
    envelope, _ = esdk_client().encrypt(
        source=payload,
        key_provider=provider,
        encryption_context=context,
        algorithm=SUITE,
        frame_length=frame_length,
    )
    opened = client.Unwrap(messages.UnwrapRequest(envelope=envelope, encryption_context=context))
    assert opened.plaintext == payload
    assert opened.key_id == key_id
    assert dict(opened.encryption_context) == context


def test_sdk_streaming_decryptor_reads_sidecar_envelope(keyring, pb):
    sidecar, provider, _ = keyring
    messages, client = stub(sidecar, pb)
    payload = os.urandom(MIB + 17)
    wrapped = client.Wrap(messages.WrapRequest(plaintext=payload, encryption_context={"a": "b"}))
    out = io.BytesIO()
    with esdk_client().stream(
        mode="d", source=io.BytesIO(wrapped.envelope), key_provider=provider
    ) as decryptor:
        for chunk in decryptor:
            out.write(chunk)
    assert out.getvalue() == payload


def test_sdk_default_signed_suite_is_refused_clearly(local_sidecar, raw_provider, pb):
    """The SDK's default suite signs (0x0578); the sidecar says so instead of
    reporting a generic failure."""
    import grpc

    from conftest import error_reason

    messages, client = stub(local_sidecar, pb)
    envelope, _ = esdk_client().encrypt(source=b"signed", key_provider=raw_provider)
    with pytest.raises(grpc.RpcError) as err:
        client.Unwrap(messages.UnwrapRequest(envelope=envelope))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "UNSUPPORTED_ENVELOPE"
    assert "0x0578" in err.value.details()
