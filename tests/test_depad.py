"""The broker's constant-time depadding (tpm/depad.c) against cryptography and against
a plain Python transcription of implicit rejection (draft-irtf-cfrg-rsa-guidance, as
OpenSSL 3.2 implements it), which is this test's oracle."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss import TSS2_RC, TSS2_Exception

from tpmbroker import protocol as p
from tpmbroker.errors import BadDigestError
from tpmbroker.tpm import depad

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
N = KEY.private_numbers().public_numbers.n
D = KEY.private_numbers().d
K = 256


def raw_decrypt(ciphertext: bytes) -> bytes:
    """What the TPM returns for TPM2_RSA_Decrypt with scheme NULL."""
    return pow(int.from_bytes(ciphertext, "big"), D, N).to_bytes(K, "big")


def raw_encrypt(block: bytes) -> bytes:
    return pow(int.from_bytes(block, "big"), 65537, N).to_bytes(K, "big")


def _prf(kdk: bytes, label: bytes, length: int) -> bytes:
    out = b""
    for i in range(-(-length // 32)):
        out += hmac.new(kdk, i.to_bytes(2, "big") + label + (length * 8).to_bytes(2, "big"),
                        hashlib.sha256).digest()
    return out[:length]


def synthetic(secret: bytes, ciphertext: bytes) -> bytes:
    """The message implicit rejection returns for a bad padding, in plain Python."""
    kdk = hmac.new(secret, ciphertext, hashlib.sha256).digest()
    message = _prf(kdk, b"message", K)
    lengths = _prf(kdk, b"length", 256)
    max_len = K - 2 - 8
    mask = (1 << max_len.bit_length()) - 1
    length = 0
    for i in range(0, 256, 2):
        candidate = int.from_bytes(lengths[i:i + 2], "big") & mask
        if candidate < max_len:
            length = candidate
    return message[K - length:]


@pytest.mark.parametrize("size", [0, 1, 32, K - 11])
def test_good_pkcs1_paddings_decode_as_cryptography_encoded_them(size: int) -> None:
    message = os.urandom(size)
    ciphertext = KEY.public_key().encrypt(message, padding.PKCS1v15())
    em = raw_decrypt(ciphertext)
    secret = os.urandom(32)
    assert depad.pkcs1(em, ciphertext, secret, implicit=True) == message
    assert depad.pkcs1(em, ciphertext, secret, implicit=False) == message


@pytest.mark.parametrize("block", [
    b"\x00\x01" + b"\xff" * 253 + b"\x00",          # a signature block, not encryption
    b"\x01\x02" + b"\x11" * 254,                    # first byte not zero
    b"\x00\x02" + b"\x11" * 254,                    # no separator
    b"\x00\x02" + b"\x11" * 7 + b"\x00" + b"m" * 246,  # padding string of 7 bytes
], ids=["type-1", "first-byte", "no-separator", "short-ps"])
def test_bad_pkcs1_paddings_give_the_synthetic_message(block: bytes) -> None:
    ciphertext = raw_encrypt(block)
    em = raw_decrypt(ciphertext)
    assert em == block
    secret = os.urandom(32)
    assert depad.pkcs1(em, ciphertext, secret, implicit=True) == synthetic(secret, ciphertext)
    with pytest.raises(BadDigestError, match=r"^decryption error$"):
        depad.pkcs1(em, ciphertext, secret, implicit=False)


def test_synthetic_messages_depend_on_ciphertext_and_secret_and_vary_in_length() -> None:
    secret = os.urandom(32)
    lengths = set()
    for _ in range(40):
        ciphertext = raw_encrypt(b"\x00\x00" + os.urandom(254))
        em = raw_decrypt(ciphertext)
        out = depad.pkcs1(em, ciphertext, secret, implicit=True)
        assert out == depad.pkcs1(em, ciphertext, secret, implicit=True)
        assert out != depad.pkcs1(em, ciphertext, os.urandom(32), implicit=True) or not out
        lengths.add(len(out))
    assert len(lengths) > 20


def _answer(em: bytes) -> bytes:
    """TPM2_RSA_Decrypt's response parameters for `em`: leading zeros dropped, sized."""
    value = em.lstrip(b"\0")
    return len(value).to_bytes(2, "big") + value


@pytest.mark.parametrize("block", [
    b"\x00\x02" + b"\x11" * 8 + b"\x00" + b"m" * 245,  # good
    b"\x00\x02" + b"\x11" * 254,                    # bad: no separator
    b"\x00\x00\x02" + b"\x11" * 253,                # bad, and the TPM drops two zeros
], ids=["good", "bad", "two-leading-zeros"])
@pytest.mark.parametrize("implicit", [True, False])
def test_the_tpm_answer_decodes_as_its_block(block: bytes, implicit: bool) -> None:
    ciphertext = raw_encrypt(block)
    em = raw_decrypt(ciphertext)
    secret = os.urandom(32)
    try:
        expected: bytes | type[BadDigestError] = depad.pkcs1(em, ciphertext, secret, implicit)
    except BadDigestError:
        expected = BadDigestError
    if expected is BadDigestError:
        with pytest.raises(BadDigestError, match=r"^decryption error$"):
            depad.pkcs1_answer(_answer(em), ciphertext, secret, implicit)
    else:
        assert depad.pkcs1_answer(_answer(em), ciphertext, secret, implicit) == expected


@pytest.mark.parametrize("answer", [
    b"", b"\x00", (K + 1).to_bytes(2, "big") + b"\x01" * (K + 1),
    (10).to_bytes(2, "big") + b"\x01" * 9, (10).to_bytes(2, "big") + b"\x01" * 11,
], ids=["empty", "one-byte", "longer-than-the-modulus", "short", "trailing"])
def test_a_malformed_tpm_answer_is_a_malformed_response(answer: bytes) -> None:
    ciphertext = raw_encrypt(b"\x00\x02" + b"\x11" * 254)
    with pytest.raises(TSS2_Exception) as caught:
        depad.pkcs1_answer(answer, ciphertext, os.urandom(32), True)
    assert caught.value.rc == TSS2_RC.ESYS_RC_MALFORMED_RESPONSE


@pytest.mark.parametrize(("hash_alg", "mgf1", "label"), [
    (p.Hash.SHA1, p.Hash.SHA1, b""),
    (p.Hash.SHA256, p.Hash.SHA256, b"label"),
    (p.Hash.SHA384, p.Hash.SHA1, b"\x00"),
    (p.Hash.SHA512, p.Hash.SHA256, b"x" * 300),
])
def test_oaep_decodes_as_cryptography_encoded_it(hash_alg: p.Hash, mgf1: p.Hash,
                                                 label: bytes) -> None:
    algs: dict[p.Hash, hashes.HashAlgorithm] = {
        p.Hash.SHA1: hashes.SHA1(), p.Hash.SHA256: hashes.SHA256(),
        p.Hash.SHA384: hashes.SHA384(), p.Hash.SHA512: hashes.SHA512()}
    pad = padding.OAEP(padding.MGF1(algs[mgf1]), algs[hash_alg], label or None)
    message = os.urandom(20)
    em = raw_decrypt(KEY.public_key().encrypt(message, pad))
    assert depad.oaep(em, label, hash_alg, mgf1) == message
    with pytest.raises(BadDigestError, match=r"^decryption error$"):
        depad.oaep(em, label + b"?", hash_alg, mgf1)
    with pytest.raises(BadDigestError, match=r"^decryption error$"):
        depad.oaep(em[:-1] + bytes([em[-1] ^ 1]), label, hash_alg, mgf1)


def test_the_secret_block_is_below_the_modulus_and_no_signature_encoding() -> None:
    block = depad.kdk_block(b"\x00\x0b" + os.urandom(32), K)
    assert len(block) == K and block[0] == 0 and block[1:3] != b"\x01\xff"
    assert block[-1] != 0xBC
