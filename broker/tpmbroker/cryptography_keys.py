"""TPM keys as `cryptography` private keys, signing through the broker.

    key = tpmbroker.load_private_key("key.pem")
    csr = x509.CertificateSigningRequestBuilder().subject_name(...).sign(key, hashes.SHA256())

The objects are `ec.EllipticCurvePrivateKey` / `rsa.RSAPrivateKey`, so cryptography's
CSR and certificate builders take them. Data is hashed here and only the digest goes
to the broker, but for keys that may be restricted (see below; keys by persistent
handle, whose attributes the client does not know), whose messages the broker takes.
Restricted signing keys (attestation keys) sign the message through the broker, which
has the TPM hash it; a Prehashed digest cannot be signed by them. ECDH
(`exchange(ec.ECDH(), peer)`) sends the peer's public point and the TPM computes the
shared secret. RSA keys decrypt (PKCS1v15, OAEP) through the broker. The private half
never leaves the TPM: private_bytes and private_numbers raise cryptography's
UnsupportedAlgorithm, as do hashes, paddings and signature algorithms the TPM cannot
sign or decrypt with. Failures of the broker or the TPM raise tpmbroker's own errors
(tpmbroker.errors).

RSA-PSS: the TPM signs with a salt as long as the digest and MGF1 over the signing
hash. PSS.DIGEST_LENGTH, PSS.AUTO and an explicit salt length equal to the digest
size are taken; PSS.MAX_LENGTH and any other length raise rather than silently sign
with a salt the caller did not ask for.

Only cryptography's public API is used. It offers no accessor for the hash inside a
`Prehashed`, the hash of an `MGF1` or the salt length of a `PSS` (and compares none of
them by value before 50), so those are asked of cryptography itself with a small
software RSA key made once per process (_References): a Prehashed signature costs an
RSA public-key operation more, a PSS signature a 1088-bit RSA signature (about
0.2 ms) more.
"""

from __future__ import annotations

import hashlib
import os
import threading
import typing
from collections.abc import Callable

from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

if typing.TYPE_CHECKING:
    from cryptography.utils import Buffer

from . import protocol as p
from .client import Client, LoadedKey
from .errors import UnsupportedError
from .keyfile import RESTRICTED, object_attributes

_clients: dict[tuple[str, float, bool], Client] = {}
_clients_lock = threading.Lock()


def _shared_client(socket: str | os.PathLike[str] | None, timeout: float,
                   verify: bool = True) -> Client:
    from .paths import default_socket

    key = (str(socket) if socket else default_socket(), timeout, verify)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(key[0], timeout=timeout, verify=verify)
        return client


_HASHES: dict[p.Hash, type[hashes.HashAlgorithm]] = {
    p.Hash.SHA1: hashes.SHA1, p.Hash.SHA256: hashes.SHA256,
    p.Hash.SHA384: hashes.SHA384, p.Hash.SHA512: hashes.SHA512,
}


def _hash_alg(algorithm: hashes.HashAlgorithm) -> p.Hash:
    try:
        return p.Hash.from_name(algorithm.name)
    except ValueError:
        raise UnsupportedAlgorithm(f"the TPM does not sign {algorithm.name} digests") from None


class _References:
    """A software RSA key that asks cryptography what a caller's object stands for.

    Verifying a signature shaped as the TPM makes it with a caller's Prehashed tells
    whether its DigestInfo is that of a TPM hash; signing with a caller's PSS padding
    shows the MGF1 hash and salt length it would use. cryptography exposes none of
    these. The key is 1088 bits: room for SHA-512 with a 64-byte salt, and a maximum
    salt length that is never the digest length of a TPM hash.
    """

    _DATA = b"tpmbroker reference"
    _OAEP_DATA = b"tpmb"  # fits OAEP with SHA-512 (at most 6 bytes with this key)
    _KEY_BITS = 1088
    # A FIPS 140-3 provider (cryptography under default_properties = fips=yes) makes no
    # RSA key below 2048 bits; 2048 keeps both properties above, at a slower reference.
    _FIPS_KEY_BITS = 2048

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: rsa.RSAPrivateKey | None = None
        self._pkcs1: dict[p.Hash, bytes | None] = {}
        self._pss: dict[p.Hash, bytes | None] = {}

    def _private_key(self) -> rsa.RSAPrivateKey:
        with self._lock:
            if self._key is None:
                self._key = (self._usable_key(self._KEY_BITS)
                             or rsa.generate_private_key(public_exponent=65537,
                                                         key_size=self._FIPS_KEY_BITS))
            return self._key

    @classmethod
    def _usable_key(cls, bits: int) -> rsa.RSAPrivateKey | None:
        """A key of `bits` that this OpenSSL makes and signs with, else None (FIPS mode
        refuses one or the other below 2048 bits)."""
        try:
            key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            key.sign(cls._DATA, padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, UnsupportedAlgorithm, InternalError):
            return None
        return key

    @staticmethod
    def _tpm_pss(hash_alg: p.Hash) -> padding.PSS:
        return padding.PSS(padding.MGF1(_HASHES[hash_alg]()), hash_alg.digest_size)

    def _reference(self, cache: dict[p.Hash, bytes | None], hash_alg: p.Hash,
                   ) -> bytes | None:
        if hash_alg not in cache:
            key = self._private_key()
            algorithm = _HASHES[hash_alg]()
            try:
                if cache is self._pkcs1:
                    sig: bytes | None = key.sign(bytes(hash_alg.digest_size),
                                                 padding.PKCS1v15(),
                                                 utils.Prehashed(algorithm))
                else:
                    sig = key.sign(self._DATA, self._tpm_pss(hash_alg), algorithm)
            except (UnsupportedAlgorithm, ValueError):
                sig = None  # this OpenSSL refuses the hash (SHA-1 under some policies)
            cache[hash_alg] = sig  # the same value whichever thread stores it
        return cache[hash_alg]

    def _verifies(self, signature: bytes | None, data: bytes, pad: padding.AsymmetricPadding,
                  algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bool:
        if signature is None:
            return False
        try:
            self._private_key().public_key().verify(signature, data, pad, algorithm)
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, InternalError):
            return False  # InternalError: OpenSSL refuses e.g. MGF1 over BLAKE2
        return True

    def prehashed_alg(self, algorithm: utils.Prehashed) -> p.Hash:
        """The TPM hash a Prehashed stands for; its DigestInfo must match (RSA needs it)."""
        for hash_alg in p.Hash:
            if hash_alg.digest_size != algorithm.digest_size:
                continue
            if self._verifies(self._reference(self._pkcs1, hash_alg),
                              bytes(hash_alg.digest_size), padding.PKCS1v15(), algorithm):
                return hash_alg
        raise UnsupportedAlgorithm(f"the TPM signs SHA-1, SHA-256, SHA-384 and SHA-512 "
                                   f"digests; this {algorithm.digest_size}-byte Prehashed "
                                   "digest is of another hash")

    def pss_is_tpm_pss(self, pad: padding.PSS, hash_alg: p.Hash) -> bool:
        """Whether `pad` asks for MGF1 over the signing hash and a digest-length salt.

        PSS.AUTO cannot sign (cryptography raises ValueError); it is taken when
        verifying with it accepts a TPM-style signature, which checks the MGF1 hash.
        """
        algorithm = _HASHES[hash_alg]()
        try:
            sig = self._private_key().sign(self._DATA, pad, algorithm)
        except (UnsupportedAlgorithm, InternalError):
            return False
        except ValueError:  # AUTO, or a salt too long for any key of this size
            return self._verifies(self._reference(self._pss, hash_alg), self._DATA, pad,
                                  algorithm)
        return self._verifies(sig, self._DATA, self._tpm_pss(hash_alg), algorithm)

    def mgf1_is_signing_hash(self, mgf: padding.MGF, hash_alg: p.Hash) -> bool:
        """Verifying with AUTO does not check the salt: only the MGF1 hash decides."""
        return self._verifies(self._reference(self._pss, hash_alg), self._DATA,
                              padding.PSS(mgf, padding.PSS.AUTO), _HASHES[hash_alg]())

    def oaep_parameters(self, pad: padding.OAEP, label: bytes | None,
                        ) -> tuple[p.Hash, p.Hash, bytes]:
        """(OAEP hash, MGF1 hash, label) of a caller's OAEP padding.

        cryptography exposes the OAEP hash but neither the MGF1 hash nor the label.
        Encrypting a known message with the padding to the reference key and opening it
        with the key's numbers shows both the MGF1 hash and the label's hash, which must
        be that of `label` (the empty label when None).
        """
        hash_alg = _hash_alg(pad.algorithm)
        if not isinstance(pad.mgf, padding.MGF1):
            raise UnsupportedAlgorithm("OAEP needs MGF1")
        key = self._private_key()
        numbers = key.private_numbers()
        n = numbers.public_numbers.n
        k = (n.bit_length() + 7) // 8
        try:
            ciphertext = key.public_key().encrypt(self._OAEP_DATA, pad)
        except (UnsupportedAlgorithm, ValueError, InternalError) as exc:
            raise UnsupportedAlgorithm(f"this OAEP padding cannot be used: {exc}") from None
        em = pow(int.from_bytes(ciphertext, "big"), numbers.d, n).to_bytes(k, "big")
        h_len = hash_alg.digest_size
        masked_seed, masked_db = em[1:1 + h_len], em[1 + h_len:]
        for mgf1 in p.Hash:
            seed = _xor(masked_seed, _mgf1(mgf1, masked_db, h_len))
            db = _xor(masked_db, _mgf1(mgf1, seed, k - h_len - 1))
            data = self._OAEP_DATA
            if db.endswith(b"\x01" + data) and not any(db[h_len:-len(data) - 1]):
                break
        else:
            raise UnsupportedAlgorithm("the TPM decrypts OAEP with MGF1 over SHA-1 or SHA-2")
        wanted = label or b""
        if db[:h_len] != hashlib.new(hash_alg.hashlib_name, wanted).digest():
            raise UnsupportedAlgorithm(
                "this OAEP padding has a label that cryptography does not disclose: pass "
                "it too, as decrypt(ciphertext, padding, label=...)" if label is None else
                "the label given is not the OAEP padding's label")
        return hash_alg, mgf1, wanted


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _mgf1(hash_alg: p.Hash, seed: bytes, length: int) -> bytes:
    out = bytearray()
    for counter in range(-(-length // hash_alg.digest_size)):
        out += hashlib.new(hash_alg.hashlib_name, seed + counter.to_bytes(4, "big")).digest()
    return bytes(out[:length])


_references = _References()


def _digest(data: Buffer, algorithm: hashes.HashAlgorithm | utils.Prehashed,
            ) -> tuple[bytes, p.Hash]:
    if isinstance(algorithm, utils.Prehashed):
        if len(data) != algorithm.digest_size:
            raise ValueError(f"prehashed data must be {algorithm.digest_size} bytes, "
                             f"got {len(data)}")
        return bytes(data), _references.prehashed_alg(algorithm)
    hash_alg = _hash_alg(algorithm)
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize(), hash_alg


class _BrokerKey:
    """What both key classes share: the loaded key and the client that signs with it."""

    def __init__(self, client: Client, loaded: LoadedKey) -> None:
        self._client = client
        self._loaded = loaded
        self._public = serialization.load_der_public_key(loaded.public_key)
        # An attestation key signs only messages the TPM hashes: True or False from a key
        # file's public area; None for a persistent handle, whose attributes LOAD does
        # not say (its messages go to the broker, which hashes an ordinary key's itself).
        self._restricted: bool | None = None
        if loaded.spec.source == p.KeySource.TSS2_DER:
            try:
                self._restricted = bool(object_attributes(loaded.spec.key) & RESTRICTED)
            except ValueError:
                self._restricted = False  # LOAD read the file; the broker says if not

    @property
    def loaded_key(self) -> LoadedKey:
        return self._loaded

    def _sign_digest(self, digest: bytes, hash_alg: p.Hash, scheme: p.Scheme) -> bytes:
        return self._client.sign(self._loaded, digest, hash_alg, scheme)

    def _sign(self, data: Buffer, algorithm: hashes.HashAlgorithm | utils.Prehashed,
              scheme: Callable[[p.Hash], p.Scheme]) -> bytes:
        """The message to the broker when the TPM may have to hash it, else its digest."""
        if isinstance(algorithm, utils.Prehashed):
            if self._restricted:
                raise UnsupportedAlgorithm(
                    "a restricted signing key (an attestation key) signs only a message the "
                    "TPM hashes itself: pass the message and its hash algorithm, not "
                    "Prehashed")
        elif self._restricted or (self._restricted is None and len(data) <= p.MAX_MESSAGE):
            hash_alg = _hash_alg(algorithm)
            return self._client.sign_message(self._loaded, bytes(data), hash_alg,
                                             scheme(hash_alg))
        digest, hash_alg = _digest(data, algorithm)
        return self._sign_digest(digest, hash_alg, scheme(hash_alg))

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise UnsupportedAlgorithm("the private key lives in the TPM and cannot be exported; "
                                   "keep using the TSS2 PRIVATE KEY file")

    def __copy__(self) -> typing.Self:
        return self  # immutable: the TPM key does not change

    def __deepcopy__(self, memo: dict[int, object]) -> typing.Self:
        return self


class TpmEllipticCurvePrivateKey(_BrokerKey, ec.EllipticCurvePrivateKey):
    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return typing.cast(ec.EllipticCurvePublicKey, self._public)

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
             ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("only ECDSA signatures are supported")
        if signature_algorithm.deterministic_signing:
            raise UnsupportedAlgorithm("the TPM does not sign deterministically (RFC 6979)")
        return self._sign(data, signature_algorithm.algorithm, lambda _: p.Scheme.ECDSA)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH in the TPM (TPM2_ECDH_ZGen): the shared secret Z, as cryptography's own
        keys return it. The key needs the decrypt attribute."""
        if not isinstance(algorithm, ec.ECDH):
            raise UnsupportedAlgorithm("only ECDH key exchange is supported")
        if peer_public_key.curve.name != self.curve.name:
            raise ValueError("peer_public_key and self are not on the same curve")
        point = peer_public_key.public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
        try:
            return self._client.derive(self._loaded, point)
        except UnsupportedError as exc:  # e.g. a sign-only key: what the TPM cannot do
            raise UnsupportedAlgorithm(exc.message) from exc

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise UnsupportedAlgorithm("the private key lives in the TPM; its numbers are not "
                                   "known")


class TpmRSAPrivateKey(_BrokerKey, rsa.RSAPrivateKey):
    @property
    def key_size(self) -> int:
        return self.public_key().key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return typing.cast(rsa.RSAPublicKey, self._public)

    def sign(self, data: Buffer, padding: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
             ) -> bytes:
        if not isinstance(algorithm, (hashes.HashAlgorithm, utils.Prehashed)):
            raise UnsupportedAlgorithm("the TPM signs PKCS#1 with a DigestInfo; NoDigestInfo "
                                       "is not supported")
        return self._sign(data, algorithm, lambda hash_alg: _rsa_scheme(padding, hash_alg))

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding, *,
                label: bytes | None = None) -> bytes:
        """Decrypt with the TPM key: PKCS1v15 (with implicit rejection: a bad padding
        gives a random-looking message, never an error, as in OpenSSL 3.2) or OAEP with
        MGF1. An OAEP label must be passed again as `label` (cryptography does not
        disclose it); it is checked against the padding's."""
        try:
            return _decrypt(self._client, self._loaded, ciphertext, padding, label)
        except UnsupportedError as exc:  # e.g. a sign-only key: what the TPM cannot do
            raise UnsupportedAlgorithm(exc.message) from exc

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise UnsupportedAlgorithm("the private key lives in the TPM; its numbers are not "
                                   "known")


def _decrypt(client: Client, loaded: LoadedKey, ciphertext: bytes,
             pad: padding.AsymmetricPadding, label: bytes | None) -> bytes:
    if isinstance(pad, padding.PKCS1v15):
        if label is not None:
            raise ValueError("PKCS#1 v1.5 has no label")
        return client.decrypt(loaded, bytes(ciphertext), p.Padding.PKCS1)
    if isinstance(pad, padding.OAEP):
        hash_alg, mgf1, wanted = _references.oaep_parameters(pad, label)
        return client.decrypt(loaded, bytes(ciphertext), p.Padding.OAEP, hash_alg, mgf1,
                              wanted)
    raise UnsupportedAlgorithm(f"the TPM decrypts PKCS1v15 and OAEP, not {pad.name}")


def _rsa_scheme(pad: padding.AsymmetricPadding, hash_alg: p.Hash) -> p.Scheme:
    if isinstance(pad, padding.PKCS1v15):
        return p.Scheme.PKCS1
    if not isinstance(pad, padding.PSS):
        raise UnsupportedAlgorithm(f"the TPM does not sign with RSA padding {pad.name}")
    if not isinstance(pad.mgf, padding.MGF1):
        raise UnsupportedAlgorithm("PSS needs MGF1 with the signing hash")
    if _references.pss_is_tpm_pss(pad, hash_alg):
        return p.Scheme.PSS
    if not _references.mgf1_is_signing_hash(pad.mgf, hash_alg):
        raise UnsupportedAlgorithm("PSS needs MGF1 with the signing hash")
    raise UnsupportedAlgorithm(f"the TPM signs PSS with a salt as long as the digest "
                               f"({hash_alg.digest_size} bytes); use PSS.DIGEST_LENGTH "
                               "(PSS.MAX_LENGTH and other salt lengths are not supported)")


def load_private_key(key: str | bytes | os.PathLike[str] | int,
                     password: bytes | str | None = None,
                     socket: str | os.PathLike[str] | None = None,
                     timeout: float = 30.0,
                     verify: bool = True,
                     parent_auth: bytes | str | None = None,
                     ) -> TpmEllipticCurvePrivateKey | TpmRSAPrivateKey:
    """A TPM key (file path, PEM/DER bytes, persistent handle) as a cryptography key.

    The key is loaded in the broker now, so a bad file or an unreachable broker shows
    here, not at the first signature. A wrong password shows at the first signature: only
    the TPM knows it, and each wrong try counts toward its dictionary-attack lockout.

    Every signature the broker returns is checked for its shape and, with `verify` (the
    default), verified against the public key before sign() returns it; a bad one raises
    tpmbroker.errors.ProtocolError.

    `parent_auth` is the password of the key's parent, for a key made under a persistent
    parent with a password (or, under 0x40000001, the owner hierarchy's password).
    """
    client = _shared_client(socket, timeout, verify)
    loaded = client.load_key(key, password, parent_auth=parent_auth)
    if loaded.key_type == p.KeyType.EC:
        return TpmEllipticCurvePrivateKey(client, loaded)
    return TpmRSAPrivateKey(client, loaded)
