"""TPM keys as `cryptography` private keys, signing through the broker.

    key = tpmbroker.load_private_key("key.pem")
    csr = x509.CertificateSigningRequestBuilder().subject_name(...).sign(key, hashes.SHA256())

The objects are `ec.EllipticCurvePrivateKey` / `rsa.RSAPrivateKey`, so cryptography's
CSR and certificate builders take them. Data is hashed here and only the digest goes
to the broker. The private half never leaves the TPM: private_bytes, private_numbers,
exchange and decrypt raise.

RSA-PSS: the TPM signs with a salt as long as the digest. PSS.DIGEST_LENGTH, PSS.AUTO
and an explicit salt length equal to the digest size all get exactly that;
PSS.MAX_LENGTH and any other length raise UnsupportedError rather than silently sign
with a salt the caller did not ask for. The MGF1 hash must be the signing hash.
"""

from __future__ import annotations

import os
import threading
import typing

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

if typing.TYPE_CHECKING:
    from cryptography.utils import Buffer

from . import protocol as p
from .client import Client, LoadedKey
from .errors import UnsupportedError

_clients: dict[tuple[str, float], Client] = {}
_clients_lock = threading.Lock()


def _shared_client(socket: str | os.PathLike[str] | None, timeout: float) -> Client:
    from .paths import default_socket

    key = (str(socket) if socket else default_socket(), timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(key[0], timeout=timeout)
        return client


def _hash_alg(algorithm: hashes.HashAlgorithm) -> p.Hash:
    try:
        return p.Hash.from_name(algorithm.name)
    except ValueError:
        raise UnsupportedError(f"the TPM does not sign {algorithm.name} digests") from None


def _digest(data: Buffer, algorithm: hashes.HashAlgorithm | utils.Prehashed,
            ) -> tuple[bytes, p.Hash]:
    if isinstance(algorithm, utils.Prehashed):
        inner = algorithm._algorithm
        if len(data) != inner.digest_size:
            raise ValueError(f"prehashed data must be {inner.digest_size} bytes for "
                             f"{inner.name}, got {len(data)}")
        return bytes(data), _hash_alg(inner)
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize(), _hash_alg(algorithm)


class _BrokerKey:
    """What both key classes share: the loaded key and the client that signs with it."""

    def __init__(self, client: Client, loaded: LoadedKey) -> None:
        self._client = client
        self._loaded = loaded
        self._public = serialization.load_der_public_key(loaded.public_key)

    @property
    def loaded_key(self) -> LoadedKey:
        return self._loaded

    def _sign_digest(self, digest: bytes, hash_alg: p.Hash, scheme: p.Scheme) -> bytes:
        return self._client.sign(self._loaded, digest, hash_alg, scheme)

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise UnsupportedError("the private key lives in the TPM and cannot be exported; "
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
            raise UnsupportedError("only ECDSA signatures are supported")
        if signature_algorithm.deterministic_signing:
            raise UnsupportedError("the TPM does not sign deterministically (RFC 6979)")
        digest, hash_alg = _digest(data, signature_algorithm.algorithm)
        return self._sign_digest(digest, hash_alg, p.Scheme.ECDSA)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedError("ECDH with TPM keys is not supported; the keys are for signing")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise UnsupportedError("the private key lives in the TPM; its numbers are not known")


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
            raise UnsupportedError("the TPM signs PKCS#1 with a DigestInfo; NoDigestInfo "
                                   "is not supported")
        digest, hash_alg = _digest(data, algorithm)
        return self._sign_digest(digest, hash_alg, _rsa_scheme(padding, hash_alg))

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedError("decryption with TPM keys is not supported; they are for signing")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise UnsupportedError("the private key lives in the TPM; its numbers are not known")


def _rsa_scheme(pad: padding.AsymmetricPadding, hash_alg: p.Hash) -> p.Scheme:
    if isinstance(pad, padding.PKCS1v15):
        return p.Scheme.PKCS1
    if not isinstance(pad, padding.PSS):
        raise UnsupportedError(f"unsupported RSA padding {pad.name}")
    mgf = pad._mgf
    if not isinstance(mgf, padding.MGF1) or _hash_alg(mgf._algorithm) != hash_alg:
        raise UnsupportedError("PSS needs MGF1 with the signing hash")
    salt = pad._salt_length
    if isinstance(salt, padding._MaxLength):
        raise UnsupportedError("the TPM signs PSS with salt = digest length; use "
                               "PSS.DIGEST_LENGTH (or PSS.AUTO) instead of PSS.MAX_LENGTH")
    if isinstance(salt, int) and salt != hash_alg.digest_size:
        raise UnsupportedError(f"the TPM signs PSS with a {hash_alg.digest_size}-byte salt; "
                               f"{salt} was asked for")
    return p.Scheme.PSS


def load_private_key(key: str | bytes | os.PathLike[str] | int,
                     password: bytes | str | None = None,
                     socket: str | os.PathLike[str] | None = None,
                     timeout: float = 30.0,
                     ) -> TpmEllipticCurvePrivateKey | TpmRSAPrivateKey:
    """A TPM key (file path, PEM/DER bytes, persistent handle) as a cryptography key.

    The key is loaded in the broker now, so a bad file or an unreachable broker shows
    here, not at the first signature. A wrong password shows at the first signature: only
    the TPM knows it, and each wrong try counts toward its dictionary-attack lockout.
    """
    client = _shared_client(socket, timeout)
    loaded = client.load_key(key, password)
    if loaded.key_type == p.KeyType.EC:
        return TpmEllipticCurvePrivateKey(client, loaded)
    return TpmRSAPrivateKey(client, loaded)
