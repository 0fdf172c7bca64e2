"""Session cryptography of TPM 2.0 HMAC sessions (TPM 2.0 Part 1, "Session-based
authorization" and "Session-based encryption"), computed in the broker.

tss2-esys spends about 2 ms of CPU per command on this (OpenSSL algorithm fetches); done
here with hashlib/hmac/cryptography it costs tens of microseconds. Pure: no I/O, no TPM.
Nonces come from the caller's random source so tests can fix them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..keyfile import pyca_curve

# TPM2_ALG ids of the hashes a session may use, with hashlib names.
HASH_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
_CRYPTOGRAPHY_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512}

# TPMA_SESSION bits.
CONTINUE_SESSION = 0x01
DECRYPT = 0x20  # the command's first parameter is encrypted
ENCRYPT = 0x40  # the response's first parameter is encrypted

AES_128_KEY_BYTES = 16
AES_BLOCK_BYTES = 16

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def hash_name(alg: int) -> str:
    try:
        return HASH_NAMES[alg]
    except KeyError:
        raise ValueError(f"unsupported session hash 0x{alg:04x}") from None


def digest_size(name: str) -> int:
    return hashlib.new(name).digest_size


def kdfa(name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """KDFa (TPM 2.0 Part 1): the SP 800-108 counter-mode KDF with HMAC."""
    label = _terminated(label)
    size_bits = _U32.pack(bits)
    wanted = (bits + 7) // 8
    out = bytearray()
    counter = 1
    while len(out) < wanted:
        out += hmac.digest(key, b"".join((_U32.pack(counter), label, context_u, context_v,
                                         size_bits)), name)
        counter += 1
    result = bytes(out[:wanted])
    if bits % 8:
        # The spec keeps the low `bits` bits: mask the surplus high bits of byte 0.
        result = bytes([result[0] & ((1 << (bits % 8)) - 1)]) + result[1:]
    return result


def kdfe(name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """KDFe (TPM 2.0 Part 1): the SP 800-56A concatenation KDF for ECDH secrets."""
    label = _terminated(label)
    wanted = (bits + 7) // 8
    out = bytearray()
    counter = 1
    while len(out) < wanted:
        out += hashlib.new(name, b"".join((_U32.pack(counter), z, label, party_u,
                                            party_v))).digest()
        counter += 1
    return bytes(out[:wanted])


def _terminated(label: bytes) -> bytes:
    # Labels are NUL-terminated strings; the NUL is part of the KDF input.
    return label if label.endswith(b"\0") else label + b"\0"


def strip_auth(auth: bytes) -> bytes:
    """The TPM drops trailing zero bytes of an authValue before using it as a key."""
    return auth.rstrip(b"\0")


# --- salting --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SaltKey:
    """What salting needs from the salt key's TPMT_PUBLIC, as plain values."""

    name_alg: int
    ecc_curve: int = 0  # TPM2_ECC_CURVE for an ECC key
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    rsa_modulus: bytes = b""
    rsa_exponent: int = 65537


def ecdh_salt(salt_key: SaltKey,
              ephemeral: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, bytes]:
    """(salt, encryptedSalt) for an ECC salt key (one-pass ECDH, TPM 2.0 Part 1).

    encryptedSalt is the marshalled TPMS_ECC_POINT of the ephemeral public key (the
    contents of the TPM2B_ENCRYPTED_SECRET). salt = KDFe(nameAlg, Z, "SECRET", Qe.x,
    Qs.x, digest bits).
    """
    curve = pyca_curve(salt_key.ecc_curve)
    if curve is None:
        raise ValueError(f"unsupported salt key curve 0x{salt_key.ecc_curve:04x}")
    size = (curve.key_size + 7) // 8
    peer = ec.EllipticCurvePublicNumbers(int.from_bytes(salt_key.ecc_x, "big"),
                                         int.from_bytes(salt_key.ecc_y, "big"),
                                         curve).public_key()
    if ephemeral is None:
        ephemeral = ec.generate_private_key(curve)
    z = ephemeral.exchange(ec.ECDH(), peer)  # the shared point's x, field-size bytes
    numbers = ephemeral.public_key().public_numbers()
    ephemeral_x = numbers.x.to_bytes(size, "big")
    ephemeral_y = numbers.y.to_bytes(size, "big")
    name = hash_name(salt_key.name_alg)
    salt = kdfe(name, z, b"SECRET", ephemeral_x, salt_key.ecc_x.rjust(size, b"\0"),
                8 * digest_size(name))
    point = _U16.pack(size) + ephemeral_x + _U16.pack(size) + ephemeral_y
    return salt, point


def rsa_salt(salt_key: SaltKey, random: Callable[[int], bytes] = os.urandom,
             ) -> tuple[bytes, bytes]:
    """(salt, encryptedSalt) for an RSA salt key: OAEP with the label "SECRET"."""
    name = hash_name(salt_key.name_alg)
    salt = random(digest_size(name))
    public = rsa.RSAPublicNumbers(salt_key.rsa_exponent or 65537,
                                  int.from_bytes(salt_key.rsa_modulus, "big")).public_key()
    algorithm = _CRYPTOGRAPHY_HASHES[name]()
    encrypted = public.encrypt(salt, padding.OAEP(mgf=padding.MGF1(algorithm),
                                                  algorithm=algorithm, label=b"SECRET\0"))
    return salt, encrypted


def make_salt(salt_key: SaltKey) -> tuple[bytes, bytes]:
    if salt_key.ecc_curve:
        return ecdh_salt(salt_key)
    return rsa_salt(salt_key)


def session_key(name: str, bind_auth: bytes, salt: bytes, nonce_tpm: bytes,
                nonce_caller: bytes) -> bytes:
    """sessionKey = KDFa(authHash, bindAuth || salt, "ATH", nonceTPM, nonceCaller)."""
    secret = strip_auth(bind_auth) + salt
    if not secret:
        return b""  # unbound, unsalted: no session key
    return kdfa(name, secret, b"ATH", nonce_tpm, nonce_caller, 8 * digest_size(name))


# --- per command ----------------------------------------------------------------------

def object_name(name_alg: int, public_area: bytes) -> bytes:
    """An object's Name: nameAlg || H(marshalled TPMT_PUBLIC)."""
    return _U16.pack(name_alg) + hashlib.new(hash_name(name_alg), public_area).digest()


def handle_name(handle: int) -> bytes:
    """Names of PCRs, sessions and permanent handles are the handle itself."""
    return _U32.pack(handle)


def cp_hash(name: str, command_code: int, names: Sequence[bytes], parameters: bytes) -> bytes:
    return hashlib.new(name, b"".join((_U32.pack(command_code), *names, parameters))).digest()


def rp_hash(name: str, response_code: int, command_code: int, parameters: bytes) -> bytes:
    return hashlib.new(name, b"".join((_U32.pack(response_code), _U32.pack(command_code),
                                       parameters))).digest()


def session_hmac(name: str, key: bytes, p_hash: bytes, nonce_newer: bytes, nonce_older: bytes,
                 attributes: int, nonce_decrypt: bytes = b"", nonce_encrypt: bytes = b"",
                 ) -> bytes:
    """A session's HMAC over a command (cpHash, nonceCaller, nonceTPM) or a response
    (rpHash, nonceTPM, nonceCaller). `key` is sessionKey || authValue."""
    return hmac.digest(key, b"".join((p_hash, nonce_newer, nonce_older, nonce_decrypt,
                                      nonce_encrypt, bytes((attributes,)))), name)


def _aes_cfb(name: str, key: bytes, nonce_newer: bytes, nonce_older: bytes) -> Cipher[CFB]:
    material = kdfa(name, key, b"CFB", nonce_newer, nonce_older,
                    8 * (AES_128_KEY_BYTES + AES_BLOCK_BYTES))
    return Cipher(algorithms.AES(material[:AES_128_KEY_BYTES]),
                  CFB(material[AES_128_KEY_BYTES:]))


def cfb_encrypt(name: str, key: bytes, nonce_newer: bytes, nonce_older: bytes,
                data: bytes) -> bytes:
    """AES-128-CFB parameter encryption (TPM 2.0 Part 1). For a command, newer/older are
    nonceCaller/nonceTPM; for a response, nonceTPM/nonceCaller."""
    encryptor = _aes_cfb(name, key, nonce_newer, nonce_older).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def cfb_decrypt(name: str, key: bytes, nonce_newer: bytes, nonce_older: bytes,
                data: bytes) -> bytes:
    decryptor = _aes_cfb(name, key, nonce_newer, nonce_older).decryptor()
    return decryptor.update(data) + decryptor.finalize()


# --- session state --------------------------------------------------------------------

@dataclasses.dataclass
class SessionState:
    """What the caller must remember of one HMAC session between commands."""

    handle: int
    hash_alg: int
    session_key: bytes
    nonce_tpm: bytes
    usable: bool = True  # False once a command's outcome is unknown: never reuse it

    @property
    def hash(self) -> str:
        return hash_name(self.hash_alg)

    @property
    def nonce_size(self) -> int:
        return len(self.nonce_tpm)

