"""What the client checks of the broker's signatures before handing them on: the shape
(ECDSA DER with 0 < r, s < n; RSA as long as the modulus and below it) and, by default,
that they verify with the key's public key. A broker is not trusted to sign with the key
it was asked for. What a check needs is made once per key (or per hash) and kept."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .errors import ProtocolError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from .client import LoadedKey


@functools.lru_cache(maxsize=256)
def public_key(spki: bytes) -> PublicKeyTypes:
    """A key's public key from the broker's SubjectPublicKeyInfo, parsed once per key."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_der_public_key(spki)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"the broker sent a public key that does not parse: {exc}") \
            from None


def check_signature(key: LoadedKey, digest: bytes, hash_alg: p.Hash, scheme: p.Scheme,
                    signature: bytes, verify: bool = True) -> None:
    """Raises ProtocolError unless `signature` is one the key could have made over
    `digest`: ECDSA DER with 0 < r, s < n, RSA exactly as long as the modulus (and below
    it); with `verify`, the signature also verifies against the key's public key."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

    public = public_key(key.public_key)
    if isinstance(public, ec.EllipticCurvePublicKey):
        if scheme != p.Scheme.ECDSA:
            raise ProtocolError(f"scheme {scheme.name} for an EC key")
        n = key.curve.order
        try:
            r, s = utils.decode_dss_signature(signature)
        except ValueError:
            raise ProtocolError(f"the broker sent a {len(signature)}-byte ECDSA signature "
                                "that is not DER") from None
        if not (0 < r < n and 0 < s < n):
            raise ProtocolError("the broker sent an ECDSA signature with r or s out of "
                                f"range for {key.curve.name}")
        if utils.encode_dss_signature(r, s) != signature:
            raise ProtocolError("the broker sent an ECDSA signature in non-canonical DER")
    elif isinstance(public, rsa.RSAPublicKey):
        size = (public.key_size + 7) // 8
        if len(signature) != size:
            raise ProtocolError(f"the broker sent a {len(signature)}-byte signature for a "
                                f"{public.key_size}-bit RSA key ({size} bytes)")
        if int.from_bytes(signature, "big") >= _modulus(key.public_key):
            raise ProtocolError("the broker sent an RSA signature not below the modulus")
    else:
        raise ProtocolError("the key's public key is neither EC nor RSA")
    if not verify:
        return
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, _ecdsa(hash_alg))
        else:
            public.verify(signature, digest, *_rsa_verify_args(scheme, hash_alg))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        # ValueError: a digest of the wrong length, which the broker should have refused
        raise ProtocolError(f"the broker sent a {scheme.name} signature that does not "
                            "verify with the key's public key") from None


# What verifying a signature needs beyond the public key (cached above by key), made
# once: building them per signature cost as much as the rest of the check around it.

@functools.lru_cache(maxsize=256)
def _modulus(spki: bytes) -> int:
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = public_key(spki)
    assert isinstance(public, rsa.RSAPublicKey)
    return public.public_numbers().n


def _hash_object(hash_alg: p.Hash) -> Any:
    from cryptography.hazmat.primitives import hashes

    classes: dict[p.Hash, Callable[[], hashes.HashAlgorithm]] = {
        p.Hash.SHA1: hashes.SHA1, p.Hash.SHA256: hashes.SHA256,
        p.Hash.SHA384: hashes.SHA384, p.Hash.SHA512: hashes.SHA512}
    return classes[hash_alg]()


@functools.cache
def _ecdsa(hash_alg: p.Hash) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    return ec.ECDSA(utils.Prehashed(_hash_object(hash_alg)))


@functools.cache
def _rsa_verify_args(scheme: p.Scheme, hash_alg: p.Hash) -> tuple[Any, Any]:
    """(padding, algorithm) for RSAPublicKey.verify: PSS as the TPM signs it (MGF1 over
    the signing hash, salt as long as the digest), else PKCS#1 v1.5."""
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    algorithm = utils.Prehashed(_hash_object(hash_alg))
    if scheme == p.Scheme.PSS:
        return (padding.PSS(padding.MGF1(_hash_object(hash_alg)), hash_alg.digest_size),
                algorithm)
    return padding.PKCS1v15(), algorithm
