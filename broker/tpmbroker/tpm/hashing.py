"""Hashing in the TPM, for restricted signing keys (SIGN_MESSAGE): TPM2_Hash, or a hash
sequence for a long message, and TPM2_Sign of the digest with the ticket that proves the
TPM made it. The message crosses the bus encrypted by the pool session."""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_RH
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMT_TK_HASHCHECK

from . import session_crypto as sc
from .command import (
    CC_SIGN,
    NULL_TICKET,
    SIGN_ATTRIBUTES,
    U16,
    U32,
    PendingCommand,
    Transport,
    first_sized_length,
    malformed,
    plain_command,
    prepare,
    sign_scheme,
    tpm2b,
)

CC_HASH = 0x0000017D
CC_HASH_SEQUENCE_START = 0x00000186
CC_SEQUENCE_UPDATE = 0x0000015C
CC_SEQUENCE_COMPLETE = 0x0000013E

# A restricted signing key signs only a digest the TPM computed, proven by the
# TPMT_TK_HASHCHECK ticket TPM2_Hash and TPM2_SequenceComplete return for hierarchy
# OWNER. The message is each command's first parameter: the pool session encrypts it
# (DECRYPT). The answers (a digest and a ticket) are not secret; the session's HMAC
# makes them authentic.

HASH_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT
_OWNER = U32.pack(int(TPM2_RH.OWNER))


def prepare_hash(session: sc.SessionState, data: bytes, hash_alg: int) -> PendingCommand:
    """TPM2_Hash(data, hashAlg, hierarchy OWNER): one command for a short message."""
    return prepare(session, CC_HASH, (), (), b"", data, U16.pack(hash_alg) + _OWNER,
                   HASH_ATTRIBUTES)


def hash_result(parameters: bytes) -> tuple[bytes, bytes]:
    """(digest, marshalled TPMT_TK_HASHCHECK) of a TPM2_Hash or TPM2_SequenceComplete
    response."""
    try:
        size = first_sized_length(parameters)
        _, used = TPMT_TK_HASHCHECK.unmarshal(parameters[2 + size:])
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    if 2 + size + used != len(parameters):
        raise malformed()
    return parameters[2:2 + size], parameters[2 + size:]


def hash_sequence_start(transport: Transport, hash_alg: int) -> int:
    """TPM2_HashSequenceStart with an empty authValue: the sequence's handle.

    No authorization and nothing secret in it, so no session."""
    body = plain_command(CC_HASH_SEQUENCE_START, (), tpm2b(b"") + U16.pack(hash_alg),
                         transport)
    if len(body) != 4:
        raise malformed()
    return int(U32.unpack(body)[0])


# A sequence object's Name is the Empty Buffer (it has no public area), and its
# authValue is the empty one HashSequenceStart gave it. Sequence objects are exempt
# from dictionary-attack counting, so an HMAC the TPM rejected would cost no lockout
# count either.
SEQUENCE_NAME = b""


def prepare_sequence_update(session: sc.SessionState, sequence: int,
                            chunk: bytes) -> PendingCommand:
    return prepare(session, CC_SEQUENCE_UPDATE, (sequence,), (SEQUENCE_NAME,), b"", chunk,
                   b"", HASH_ATTRIBUTES)


def prepare_sequence_complete(session: sc.SessionState, sequence: int,
                              chunk: bytes) -> PendingCommand:
    """TPM2_SequenceComplete(last chunk, hierarchy OWNER); the TPM flushes the sequence
    when it succeeds."""
    return prepare(session, CC_SEQUENCE_COMPLETE, (sequence,), (SEQUENCE_NAME,), b"",
                   chunk, _OWNER, HASH_ATTRIBUTES)


def prepare_sign_with_ticket(session: sc.SessionState, key_handle: int, key_name: bytes,
                             auth: bytes, digest: bytes, scheme_alg: int, hash_alg: int,
                             ticket: bytes) -> PendingCommand:
    """TPM2_Sign of a digest the TPM made, with the ticket that proves it."""
    scheme = sign_scheme(scheme_alg, hash_alg)[:-len(NULL_TICKET)]
    return prepare(session, CC_SIGN, (key_handle,), (key_name,), auth, digest,
                   scheme + ticket, SIGN_ATTRIBUTES)
