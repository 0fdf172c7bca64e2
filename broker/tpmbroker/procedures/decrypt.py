"""DECRYPT, the broker's half: RSA decryption with TPM2_RSA_Decrypt through a pool
session that encrypts the plaintext on its way back; paddings removed in constant time
in C (tpm/depad.c) for keys whose scheme is NULL."""

from __future__ import annotations

from collections.abc import Callable

from ..definitions import DecryptFlag, Hash, Opcode, Padding
from ..errors import BadDigestError, TpmBrokerError, TpmError, UnsupportedError
from ..ops.base import member
from ..ops.decrypt import KNOWN_FLAGS, Decrypt, DecryptResult
from ..tpm import command, depad
from ..tpm import keys as keymod
from ..tpm.keys import CachedKey
from ..tpm.rc import tpm_code
from ..tpm.worker import LaneCommand, TpmWorker
from .base import Request, serves

TPM_RC_VALUE = 0x084


@serves(Opcode.DECRYPT)
def serve(request: Request, msg: Decrypt) -> None:
    padding = member(Padding, msg.padding, "padding")
    if msg.flags & ~KNOWN_FLAGS:
        raise UnsupportedError(f"unknown DECRYPT flags 0x{msg.flags & ~KNOWN_FLAGS:02x}")
    implicit = bool(msg.flags & DecryptFlag.IMPLICIT_REJECTION)
    # With a key that can sign (an unknown key counts as one), raw decryption is m^d mod n,
    # a signature by another name, and PKCS#1 v1.5 that answers a bad padding with an
    # error is a Bleichenbacher oracle, which computes m^d too: the key policy must grant
    # sign as well as decrypt. OAEP and implicit rejection give no such answer.
    gives_signatures = padding is Padding.NONE or (padding is Padding.PKCS1 and not implicit)
    if gives_signatures:
        known = request.worker.known(msg.key_id)
        gives_signatures = known is None or known.can_sign
    auth = request.key_auth(msg.key_id, ("decrypt", "sign") if gives_signatures
                            else ("decrypt",))
    if padding is Padding.OAEP:
        hash = member(Hash, msg.hash, "OAEP hash")
        mgf1 = member(Hash, msg.mgf1_hash or msg.hash, "MGF1 hash")
    elif msg.hash or msg.mgf1_hash or msg.label:
        raise UnsupportedError(f"{padding.name} padding takes no hash, MGF1 hash or label")
    else:
        hash = mgf1 = Hash.SHA256  # unused
    if implicit and padding is not Padding.PKCS1:
        raise UnsupportedError("implicit rejection is for PKCS#1 v1.5 padding only")
    key_id, label, ciphertext = msg.key_id, msg.label, msg.ciphertext
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    known = worker.check_password(key_id, auth, peer)

    def served(plaintext: bytes) -> DecryptResult:
        request.count("decryptions")
        return DecryptResult(plaintext)

    request.submit(lambda: decrypt(worker, key_id, auth, padding, hash, mgf1, label,
                                   ciphertext, implicit, deadline, peer), served,
                   lane=lambda: lane(worker, key_id, auth, padding, hash, mgf1, label,
                                     ciphertext, implicit, peer, known))


def decrypt(tpm: TpmWorker, key_id: bytes, auth: bytes, padding: Padding, hash: Hash,
            mgf1: Hash, label: bytes, ciphertext: bytes, implicit_rejection: bool,
            deadline: float, peer: int = -1) -> bytes:
    """RSA decryption with TPM2_RSA_Decrypt through a pool session that encrypts the
    plaintext on its way back.

    A key whose scheme is NULL gets the raw private operation and the broker removes
    the padding in constant time (tpm/depad.py); a key with a fixed scheme has the TPM
    remove it. Every padding failure is the same BAD_DIGEST "decryption error"; with
    implicit rejection a bad PKCS#1 v1.5 padding gives a synthetic message instead.
    Password attempts go through the dictionary-attack shield, as signatures do.
    """
    entry = tpm.loaded(key_id)
    tpm_scheme = keymod.decryption_scheme(entry.public, padding, hash, mgf1, label)
    size = _check_ciphertext(entry, ciphertext)

    def tpm_decrypt(block: bytes, scheme: tuple[int, int, bytes] | None,
                    answer: Callable[[bytes], bytes] = command.sized_result) -> bytes:
        alg, hash_alg, tpm_label = scheme or (command.ALG_NULL, 0, b"")
        return tpm.run(deadline, "decrypting", lambda: tpm.authorized(
            entry, auth, deadline, lambda session, handle, name:
            command.prepare_rsa_decrypt(session, handle, name, auth, block, alg,
                                        hash_alg, tpm_label), answer))

    def decrypt() -> bytes:
        if tpm_scheme is not None:
            try:
                return tpm_decrypt(ciphertext, tpm_scheme)
            except TpmError as exc:
                if tpm_code(exc.tpm_rc) == TPM_RC_VALUE:  # the TPM found a bad padding
                    raise BadDigestError(depad.DECRYPTION_ERROR) from None
                raise
        if padding is Padding.PKCS1 and entry.kdk_secret is None:
            entry.kdk_secret = depad.kdk_secret(  # the key's Name: the same by file or handle
                tpm_decrypt(depad.kdk_block(entry.name, size), None).rjust(size, b"\0"))
        return tpm_decrypt(ciphertext, None, lambda parameters: _unpad(
            entry, parameters, size, padding, hash, mgf1, label, ciphertext,
            implicit_rejection))

    plaintext = tpm.with_password(entry, auth, peer, deadline, decrypt)
    tpm.objects.keys.touch(key_id)
    return plaintext


def lane(tpm: TpmWorker, key_id: bytes, auth: bytes, padding: Padding, hash: Hash,
         mgf1: Hash, label: bytes, ciphertext: bytes, implicit_rejection: bool,
         peer: int = -1, password_known: CachedKey | None = None) -> LaneCommand | None:
    """The raw TPM2_RSA_Decrypt for the lane, its padding removed when the answer comes,
    or None: the worker thread serves it (a key whose scheme makes the TPM unpad, one
    whose implicit-rejection secret is not known yet, a ciphertext it must refuse)."""
    entry = tpm.known(key_id)
    if (entry is None or not entry.raw_decryption
            or (padding is Padding.PKCS1 and entry.kdk_secret is None)):
        return None
    try:
        size = _check_ciphertext(entry, ciphertext)
    except TpmBrokerError:
        return None
    return tpm.lane_command(
        entry, auth, peer, "decrypting", lambda session, handle, name:
        command.prepare_rsa_decrypt(session, handle, name, auth, ciphertext,
                                    command.ALG_NULL, 0, b""),
        lambda parameters: _unpad(entry, parameters, size, padding, hash, mgf1, label,
                                  ciphertext, implicit_rejection),
        password_known)


def _check_ciphertext(entry: CachedKey, ciphertext: bytes) -> int:
    """The key's modulus length; BadDigestError unless `ciphertext` is that long and
    below the modulus."""
    modulus, _ = entry.rsa_public_numbers
    size = entry.modulus_bytes
    if len(ciphertext) != size:
        raise BadDigestError(f"a ciphertext for this {modulus.bit_length()}-bit key is "
                             f"{size} bytes, not {len(ciphertext)}")
    if int.from_bytes(ciphertext, "big") >= modulus:
        raise BadDigestError("the ciphertext is not below the key's modulus")
    return size


def _unpad(entry: CachedKey, answer: bytes, size: int, padding: Padding, hash: Hash,
           mgf1: Hash, label: bytes, ciphertext: bytes, implicit_rejection: bool) -> bytes:
    """The plaintext in the TPM's answer to the raw private operation (its response
    parameters), the padding removed in constant time (tpm/depad.c); PKCS#1 v1.5 in one
    C call that also reads the sized buffer and puts back the leading zeros."""
    if padding is Padding.PKCS1:
        assert entry.kdk_secret is not None
        return depad.pkcs1_answer(answer, ciphertext, entry.kdk_secret, implicit_rejection)
    em = command.sized_result(answer).rjust(size, b"\0")
    if padding is Padding.NONE:
        return em
    return depad.oaep(em, label, hash, mgf1)
