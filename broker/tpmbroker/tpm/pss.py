"""RSASSA-PSS encoding (RFC 8017, 9.1) done by the broker, and reading a signature's salt.

TPMs that follow the specification sign RSA-PSS with the largest salt the modulus
allows; TLS 1.3 (RFC 8446, 4.2.3) requires the salt to be as long as the digest, and
OpenSSL's TLS 1.3 rejects anything else. swtpm happens to use the digest length. When
a TPM's salt is not the digest length, the broker pads PSS itself and has the TPM do the
raw RSA private operation (TPM2_RSA_Decrypt, scheme NULL), which needs a key with the
decrypt attribute. Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
import os

MGF_COUNTER_BYTES = 4


def mgf1(hash_name: str, seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(MGF_COUNTER_BYTES, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _h_prime(hash_name: str, digest: bytes, salt: bytes) -> bytes:
    return hashlib.new(hash_name, b"\0" * 8 + digest + salt).digest()


def encode(digest: bytes, hash_name: str, mod_bits: int, salt: bytes | None = None) -> bytes:
    """EMSA-PSS-ENCODE of `digest` with MGF1(hash) and a salt as long as the digest,
    left-padded to the modulus length (ready for the raw RSA private operation)."""
    h_len = len(digest)
    if salt is None:
        salt = os.urandom(h_len)
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    if em_len < h_len + len(salt) + 2:
        raise ValueError("modulus too small for this digest and salt")
    h = _h_prime(hash_name, digest, salt)
    db = b"\0" * (em_len - len(salt) - h_len - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(hash_name, h, em_len - h_len - 1),
                                             strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    return em.rjust((mod_bits + 7) // 8, b"\0")


def salt_length(signature: bytes, modulus: int, exponent: int, digest: bytes,
                hash_name: str) -> int | None:
    """The salt length of a valid PSS signature over `digest`, None if it is not one."""
    mod_bits = modulus.bit_length()
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    h_len = len(digest)
    value = pow(int.from_bytes(signature, "big"), exponent, modulus)
    if value.bit_length() > em_bits:
        return None
    em = value.to_bytes(em_len, "big")
    if em[-1] != 0xBC or em_len < h_len + 2:
        return None
    masked, h = em[:em_len - h_len - 1], em[em_len - h_len - 1:-1]
    db = bytearray(a ^ b for a, b in zip(masked, mgf1(hash_name, h, len(masked)), strict=True))
    db[0] &= 0xFF >> (8 * em_len - em_bits)
    separator = db.find(b"\x01")
    if separator < 0 or any(db[:separator]):
        return None
    salt = bytes(db[separator + 1:])
    return len(salt) if _h_prime(hash_name, digest, salt) == h else None
