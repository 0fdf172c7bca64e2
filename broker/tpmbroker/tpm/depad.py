"""RSA decryption paddings removed in the broker (tpm/depad.c, constant time).

For keys whose scheme is NULL the TPM does only the raw private operation and the
broker removes the padding: that allows OAEP labels the TPM would refuse, MGF1 hashes
other than the OAEP hash, and PKCS#1 v1.5 implicit rejection.

Implicit rejection needs a secret per key that only the key's holder knows (OpenSSL
derives it from the private exponent, which never leaves the TPM here). The broker
asks the TPM for the raw private operation on a fixed block derived from the key's
name (`kdk_block`) and hashes the result (`kdk_secret`): the same for every broker on
the same TPM key, across restarts, and known to no one who cannot use the key.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from typing import Any

from ..definitions import Hash
from ..errors import BadDigestError, InternalError, UnsupportedError
from .command import malformed

_c: Any = importlib.import_module(f"{__package__}._authorize")

_KDK_LABEL = b"tpmbroker implicit rejection"
DECRYPTION_ERROR = "decryption error"  # one message for every padding failure


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def kdk_block(key_name: bytes, modulus_bytes: int) -> bytes:
    """The fixed block the TPM raises to d for a key's implicit-rejection secret: a zero
    byte (so it is below the modulus) and a hash expansion of the key's Name. No
    signature scheme's encoding looks like it (PKCS#1 starts 00 01 FF, PSS ends BC)."""
    block = b"\0" + _mgf1_sha256(_KDK_LABEL + key_name, modulus_bytes - 1)
    if block[-1] == 0xBC:
        block = block[:-1] + b"\0"
    return block


def kdk_secret(raw: bytes) -> bytes:
    """The key's 32-byte implicit-rejection secret from the TPM's answer to kdk_block."""
    return hashlib.sha256(_KDK_LABEL + raw).digest()


MAX_K = 1024  # bytes: 8192-bit moduli, as depad.c
_ZEROS = bytes(MAX_K)  # what a plaintext's buffer is wiped with


class _Scratch(threading.local):
    """One thread's td_ctx (its HMAC fetched once) and output buffer."""

    def __init__(self) -> None:
        ffi, lib = _c.ffi, _c.lib
        ctx = lib.td_ctx_new()
        if ctx == ffi.NULL:
            raise MemoryError("libcrypto could not set up the depadding context")
        self.ctx = ffi.gc(ctx, lib.td_ctx_free)
        self.out = ffi.new("uint8_t[]", MAX_K)
        self.out_len = ffi.new("size_t *")


_scratch = _Scratch()


def pkcs1(em: bytes, ciphertext: bytes, secret: bytes, implicit: bool) -> bytes:
    """The message in a PKCS#1 v1.5 encoded block; with `implicit`, a synthetic message
    when the padding is bad (never an error), else BadDigestError."""
    k = len(em)
    if len(ciphertext) != k or len(secret) != 32 or k > MAX_K:
        raise InternalError("PKCS#1 decoding: sizes do not match")
    return _pkcs1(_c.lib.td_pkcs1, em, ciphertext, k, secret, implicit)


def pkcs1_answer(answer: bytes, ciphertext: bytes, secret: bytes, implicit: bool) -> bytes:
    """pkcs1 of TPM2_RSA_Decrypt's answer as it came (its response parameters: a sized
    buffer, leading zeros dropped), for a modulus as long as `ciphertext`; malformed()
    when the answer is not such a buffer."""
    k = len(ciphertext)
    if len(secret) != 32 or k > MAX_K:
        raise InternalError("PKCS#1 decoding: sizes do not match")
    return _pkcs1(_c.lib.td_pkcs1_answer, answer, len(answer), ciphertext, k, secret,
                  implicit)


def _pkcs1(function: Any, *arguments: object) -> bytes:
    ffi, lib = _c.ffi, _c.lib
    scratch = _scratch
    out = scratch.out
    status = function(scratch.ctx, *arguments, out, scratch.out_len)
    try:
        if status == lib.TD_BAD_PADDING:
            raise BadDigestError(DECRYPTION_ERROR)
        if status == lib.TD_MALFORMED:
            raise malformed()
        if status != lib.TD_OK:
            raise InternalError(f"PKCS#1 decoding failed ({status})")
        return bytes(ffi.buffer(out, scratch.out_len[0]))
    finally:
        ffi.memmove(out, _ZEROS, MAX_K)


def oaep(em: bytes, label: bytes, hash: Hash, mgf1: Hash) -> bytes:
    """The message in an OAEP encoded block, or BadDigestError."""
    ffi, lib = _c.ffi, _c.lib
    k = len(em)
    out = ffi.new("uint8_t[]", k)
    out_len = ffi.new("size_t *")
    status = lib.td_oaep(em, k, label, len(label), hash.name.encode(), mgf1.name.encode(),
                         out, out_len)
    try:
        if status == lib.TD_BAD_PADDING:
            raise BadDigestError(DECRYPTION_ERROR)
        if status == lib.TD_BAD_ARGUMENT:
            raise UnsupportedError(f"OAEP with {hash.name} and MGF1-{mgf1.name} on a "
                                   f"{8 * k}-bit key")
        if status != lib.TD_OK:
            raise InternalError(f"OAEP decoding failed ({status})")
        return bytes(ffi.buffer(out, out_len[0]))
    finally:
        ffi.memmove(out, bytes(k), k)
