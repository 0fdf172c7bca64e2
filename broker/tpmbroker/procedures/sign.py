"""SIGN, the broker's half: TPM2_Sign of a client's digest, on the lane when it can be.

RSA-PSS: a TPM may sign PSS with a salt longer than the digest, which TLS 1.3 refuses.
With `--pss-padding auto` the first PSS signature of a key shows its salt; if it is not
the digest length, the broker pads PSS itself from then on and has the TPM do the raw
private operation (tpm/pss.py), which needs a key that may decrypt.
"""

from __future__ import annotations

from ..definitions import MAX_MESSAGE, Hash, KeyType, Opcode, Scheme
from ..errors import BadDigestError, TpmBrokerError, UnsupportedError
from ..ops.sign import Sign, SignResult, scheme_and_hash
from ..tpm import command, pss
from ..tpm import keys as keymod
from ..tpm.keys import CachedKey
from ..tpm.worker import LaneCommand, TpmWorker
from .base import Request, serves


@serves(Opcode.SIGN)
def serve(request: Request, msg: Sign) -> None:
    auth = request.key_auth(msg.key_id, ("sign",))
    scheme, hash = scheme_and_hash(msg.scheme, msg.hash)
    key_id, digest = msg.key_id, msg.digest
    if len(digest) != hash.digest_size:
        raise BadDigestError(f"digest of {len(digest)} bytes for {hash.name}, "
                             f"which needs {hash.digest_size}")
    submit(request, key_id, auth, scheme, hash, digest, SignResult)


def submit(request: Request, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
           digest: bytes, result: type[SignResult]) -> None:
    """Queue the signature of a checked digest, with the lane's way to send it."""
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    # Password attempts the dictionary-attack shield refuses are answered now, unqueued.
    known = worker.check_password(key_id, auth, peer)
    request.submit(lambda: sign(worker, key_id, auth, scheme, hash, digest, deadline, peer),
                   result, lane=lambda: lane(worker, key_id, auth, scheme, hash, digest, peer,
                                             known))


def sign(tpm: TpmWorker, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
         digest: bytes, deadline: float, peer: int = -1) -> bytes:
    """Sign `digest` (its length checked for `hash`); `peer` (the client's uid) is who
    the dictionary-attack shield holds to account."""
    entry = tpm.loaded(key_id)
    scheme_alg = check_scheme(entry, scheme, hash)
    if entry.restricted:
        raise UnsupportedError(
            "a restricted signing key (an attestation key) signs only a message the TPM "
            f"hashes itself, of at most {MAX_MESSAGE} bytes (MAX_MESSAGE), not a digest: "
            "send the message (SIGN_MESSAGE; with openssl, pkeyutl -sign -rawin, or dgst, "
            "req, x509, cms, TLS)")
    return tpm.with_password(entry, auth, peer, deadline, lambda: _sign(
        tpm, entry, auth, scheme, scheme_alg, hash, digest, deadline))


def check_scheme(entry: CachedKey, scheme: Scheme, hash: Hash) -> int:
    """The TPM's algorithm for `scheme` with this key, checked against the key's fixed
    scheme once per key."""
    scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
    if (scheme_alg, hash) not in entry.schemes_checked:
        keymod.check_key_scheme(entry.public, scheme_alg, hash)
        entry.schemes_checked.add((scheme_alg, int(hash)))
    return scheme_alg


def _sign(tpm: TpmWorker, entry: CachedKey, auth: bytes, scheme: Scheme, scheme_alg: int,
          hash: Hash, digest: bytes, deadline: float) -> bytes:
    if scheme is Scheme.PSS and _pss_by_broker(tpm, entry):
        signature = tpm.run(deadline, "signing", lambda: _sign_pss_in_broker(
            tpm, entry, auth, hash, digest, deadline))
    else:
        signature = tpm.run(deadline, "signing", lambda: tpm.authorized(
            entry, auth, deadline, lambda session, handle, name: command.prepare_sign(
                session, handle, name, auth, digest, scheme_alg, hash),
            command.signature_bytes))
    if scheme is Scheme.PSS and entry.pss_by_broker is None:
        signature = _check_tpm_pss_salt(tpm, entry, auth, hash, digest, signature, deadline)
    tpm.objects.keys.touch(entry.info.key_id)
    return modulus_long(entry, signature)


def modulus_long(entry: CachedKey, signature: bytes) -> bytes:
    """The TPM may drop an RSA signature's leading zero bytes; the wire wants the
    modulus length."""
    if entry.info.key_type is KeyType.RSA:
        return signature.rjust((entry.info.bits + 7) // 8, b"\0")
    return signature


def lane(tpm: TpmWorker, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
         digest: bytes, peer: int = -1, password_known: CachedKey | None = None,
         ) -> LaneCommand | None:
    """The TPM2_Sign for the lane, ready to send, or None: the worker thread serves it
    (a key not seen with this scheme yet, PSS whose salt the TPM has not shown)."""
    entry = tpm.objects.keys.get(key_id)
    if entry is None or len(digest) != hash.digest_size or entry.restricted:
        return None
    if scheme is Scheme.PSS and entry.pss_by_broker is not False:
        return None  # the TPM's own PSS is not known to be what the client wants
    try:
        scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
    except TpmBrokerError:
        return None
    if (scheme_alg, hash) not in entry.schemes_checked:
        return None
    size = (entry.info.bits + 7) // 8 if entry.info.key_type is KeyType.RSA else 0
    return tpm.lane_command(
        entry, auth, peer, "signing", lambda session, handle, name: command.prepare_sign(
            session, handle, name, auth, digest, scheme_alg, hash),
        lambda parameters: command.signature_bytes(parameters, size), password_known)


# --- RSA-PSS padded by the broker ------------------------------------------------------------

def _pss_by_broker(tpm: TpmWorker, entry: CachedKey) -> bool:
    if tpm.pss_padding == "tpm":
        entry.pss_by_broker = False
    elif tpm.pss_padding == "broker":
        entry.pss_by_broker = True
    if entry.pss_by_broker and not entry.can_decrypt:
        raise UnsupportedError(
            "this TPM signs RSA-PSS with a salt longer than the digest, which TLS 1.3 "
            "verifiers reject, and the key lacks the decrypt attribute the broker needs "
            "to pad PSS itself; make the key without `--usage sign` (or -pkeyopt "
            "usage:sign): the default signs and decrypts; or use an EC key, or sign "
            "with PKCS#1 v1.5")
    return bool(entry.pss_by_broker)


def _check_tpm_pss_salt(tpm: TpmWorker, entry: CachedKey, auth: bytes, hash: Hash,
                        digest: bytes, signature: bytes, deadline: float) -> bytes:
    """The first PSS signature of a key, made by the TPM: is its salt the digest
    length? If not, this and every later PSS signature of the key is padded here."""
    modulus, exponent = entry.rsa_public_numbers
    salt = pss.salt_length(signature, modulus, exponent, digest, hash.hashlib_name)
    entry.pss_by_broker = salt != hash.digest_size
    if not entry.pss_by_broker:
        return signature
    _pss_by_broker(tpm, entry)  # raises if the key cannot be used that way
    return tpm.run(deadline, "signing", lambda: _sign_pss_in_broker(
        tpm, entry, auth, hash, digest, deadline))


def _sign_pss_in_broker(tpm: TpmWorker, entry: CachedKey, auth: bytes, hash: Hash,
                        digest: bytes, deadline: float) -> bytes:
    modulus, _ = entry.rsa_public_numbers
    block = pss.encode(digest, hash.hashlib_name, modulus.bit_length())
    return tpm.authorized(
        entry, auth, deadline, lambda session, handle, name: command.prepare_rsa_private(
            session, handle, name, auth, block), command.sized_result)
