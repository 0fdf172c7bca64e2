"""SIGN_MESSAGE, the broker's half: a restricted key's message hashed by the TPM (its
ticket is what TPM2_Sign wants), any other key's hashed here and signed as SIGN does."""

from __future__ import annotations

import contextlib
import functools
import hashlib

from tpm2_pytss.constants import TPM2_PT
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..definitions import MAX_MESSAGE, Hash, Opcode, Scheme
from ..errors import UnsupportedError
from ..ops.sign import scheme_and_hash
from ..ops.sign_message import SignMessage, SignMessageResult
from ..tpm import command, hashing
from ..tpm.keys import CachedKey
from ..tpm.worker import TpmWorker
from . import sign
from .base import Request, serves

# TPM_GENERATED_VALUE: what the TPM puts first in every structure it signs (quotes,
# certifications). The TPM gives no ticket for a message starting with it, so that a
# restricted key cannot be made to sign a forged attestation.
TPM_GENERATED_VALUE = b"\xffTCG"


@serves(Opcode.SIGN_MESSAGE)
def serve(request: Request, msg: SignMessage) -> None:
    auth = request.key_auth(msg.key_id, ("sign",))
    scheme, hash = scheme_and_hash(msg.scheme, msg.hash)
    key_id, message = msg.key_id, msg.message
    if len(message) > MAX_MESSAGE:
        raise UnsupportedError(f"message of {len(message)} bytes: SIGN_MESSAGE carries at "
                               f"most {MAX_MESSAGE} (MAX_MESSAGE)")
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    known = worker.known(key_id)
    if known is not None and not known.restricted:
        # An ordinary key: hash here and sign the digest as SIGN does, lane and all.
        digest = hashlib.new(hash.hashlib_name, message).digest()
        sign.submit(request, key_id, auth, scheme, hash, digest, SignMessageResult)
        return
    worker.check_password(key_id, auth, peer)
    request.submit(lambda: sign_message(worker, key_id, auth, scheme, hash, message,
                                        deadline, peer), SignMessageResult)


def sign_message(tpm: TpmWorker, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
                 message: bytes, deadline: float, peer: int = -1) -> bytes:
    """Sign `message` (at most MAX_MESSAGE bytes). A restricted key's message is hashed
    by the TPM; any other key's is hashed here and signed as a digest."""
    entry = tpm.loaded(key_id)
    if not entry.restricted:
        digest = hashlib.new(hash.hashlib_name, message).digest()
        return sign.sign(tpm, key_id, auth, scheme, hash, digest, deadline, peer=peer)
    scheme_alg = sign.check_scheme(entry, scheme, hash)  # its fixed scheme only
    if message.startswith(TPM_GENERATED_VALUE):
        # The TPM would hash it but give no ticket; refused before any TPM command.
        raise UnsupportedError(
            "the message starts with TPM_GENERATED_VALUE (0xff544347): a restricted "
            "key does not sign it, the TPM gives no ticket for what could pass for an "
            "attestation the TPM made")

    def hash_and_sign() -> bytes:
        digest, ticket = _tpm_hash(tpm, entry, hash, message, deadline)
        return tpm.authorized(
            entry, auth, deadline, lambda session, handle, name:
            hashing.prepare_sign_with_ticket(session, handle, name, auth, digest,
                                             scheme_alg, hash, ticket),
            command.signature_bytes)

    signature = tpm.with_password(entry, auth, peer, deadline, lambda: tpm.run(
        deadline, "signing the message", hash_and_sign))
    tpm.objects.keys.touch(key_id)
    return sign.modulus_long(entry, signature)


def _tpm_hash(tpm: TpmWorker, entry: CachedKey, hash: Hash, message: bytes,
              deadline: float) -> tuple[bytes, bytes]:
    """(digest, ticket) of `message` hashed by the TPM: TPM2_Hash when it fits one
    command, else a hash sequence. The worker thread runs one job at a time, so at
    most one sequence object is in the TPM; it is flushed on any failure."""
    chunk = tpm.fact("input_buffer", lambda: min(
        tpm.link.tpm_property(TPM2_PT.INPUT_BUFFER) or 1024, 1024))
    tpm.counters["tpm_hashed_messages"] += 1
    if len(message) <= chunk:
        return tpm.execute(deadline, lambda session: hashing.prepare_hash(
            session, message, hash), hashing.hash_result)
    transport = tpm.link.require()
    # The sequence needs an object slot: make room as loading a key would, but keep
    # the key that signs next.
    sequence = tpm.objects.with_room(
        entry, lambda: hashing.hash_sequence_start(transport, hash))
    try:
        pieces = [message[i:i + chunk] for i in range(0, len(message), chunk)]
        for piece in pieces[:-1]:
            tpm.execute(deadline, functools.partial(
                hashing.prepare_sequence_update, sequence=sequence, chunk=piece),
                lambda _parameters: None)
        return tpm.execute(deadline, functools.partial(
            hashing.prepare_sequence_complete, sequence=sequence, chunk=pieces[-1]),
            hashing.hash_result)
    except BaseException:
        if tpm.link.up:
            with contextlib.suppress(TSS2_Exception):
                command.flush_context(transport, sequence)
        raise
