"""The Python oracle of tpm/command.py's C arithmetic (tpm/authorize.c).

The same framing, session HMACs, parameter encryption, response checks and signature
decoding, written plainly from session_crypto. Never on the broker's path: the tests
hold the C code to these functions byte for byte, and run the TPM tests with them
swapped in for command.prepare / finish / signature_bytes.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from . import session_crypto as sc
from .command import (
    ALG_ECDSA,
    ALG_RSA_SIGNATURES,
    HEADER,
    RC_SUCCESS,
    ST_SESSIONS,
    U16,
    U32,
    PendingCommand,
    ResponseAuthError,
    command,
    first_sized_length,
    malformed,
    response_code,
    sign_result,
    tpm2b,
)


def prepare(session: sc.SessionState, command_code: int, handles: Sequence[int],
                      names: Sequence[bytes], auth: bytes, first_parameter: bytes | None,
                      other_parameters: bytes, attributes: int, response_handles: int = 0,
                      nonce_caller: bytes | None = None) -> PendingCommand:
    """command.prepare() in Python."""
    name = session.hash
    if nonce_caller is None:
        nonce_caller = os.urandom(session.nonce_size)
    key = session.session_key + sc.strip_auth(auth)
    if first_parameter is None:
        parameters = other_parameters
    else:
        if attributes & sc.DECRYPT:
            first_parameter = sc.cfb_encrypt(name, key, nonce_caller, session.nonce_tpm,
                                             first_parameter)
        parameters = tpm2b(first_parameter) + other_parameters
    digest = sc.cp_hash(name, command_code, names, parameters)
    command_hmac = sc.session_hmac(name, key, digest, nonce_caller, session.nonce_tpm,
                                   attributes)
    auth_area = b"".join((U32.pack(session.handle), tpm2b(nonce_caller), bytes((attributes,)),
                          tpm2b(command_hmac)))
    body = U32.pack(len(auth_area)) + auth_area + parameters
    return PendingCommand(session, command_code,
                          command(ST_SESSIONS, command_code, handles, body), key, nonce_caller,
                          attributes, response_handles)


def finish(pending: PendingCommand, response: bytes) -> tuple[list[int], bytes]:
    """command.finish() in Python."""
    session = pending.session
    rc = response_code(response)
    if rc != RC_SUCCESS:
        if len(response) != HEADER.size:
            raise malformed()
        raise TSS2_Exception(rc)
    try:
        offset = HEADER.size
        handles = [U32.unpack_from(response, offset + 4 * i)[0]
                   for i in range(pending.response_handles)]
        offset += 4 * pending.response_handles
        (parameter_size,) = U32.unpack_from(response, offset)
        offset += 4
        parameters = response[offset:offset + parameter_size]
        offset += parameter_size
        (nonce_size,) = U16.unpack_from(response, offset)
        offset += 2
        nonce_tpm = response[offset:offset + nonce_size]
        offset += nonce_size
        attributes = response[offset]
        offset += 1
        (hmac_size,) = U16.unpack_from(response, offset)
        offset += 2
        response_hmac = response[offset:offset + hmac_size]
        offset += hmac_size
    except (struct.error, IndexError):
        raise malformed() from None
    if (offset != len(response) or len(parameters) != parameter_size
            or len(nonce_tpm) != session.nonce_size):
        raise malformed()
    name = session.hash
    expected = sc.session_hmac(name, pending.hmac_key,
                               sc.rp_hash(name, rc, pending.command_code, parameters),
                               nonce_tpm, pending.nonce_caller, attributes)
    if not hmac.compare_digest(expected, response_hmac):
        raise ResponseAuthError()
    session.nonce_tpm = nonce_tpm
    if attributes & sc.ENCRYPT:
        parameters = decrypt_first(name, pending, nonce_tpm, parameters)
    return handles, parameters


def decrypt_first(name: str, pending: PendingCommand, nonce_tpm: bytes,
                  parameters: bytes) -> bytes:
    size = first_sized_length(parameters)
    clear = sc.cfb_decrypt(name, pending.hmac_key, nonce_tpm, pending.nonce_caller,
                           parameters[2:2 + size])
    return parameters[:2] + clear + parameters[2 + size:]


def signature_bytes(parameters: bytes, rsa_bytes: int = 0) -> bytes:
    """command.signature_bytes() in Python: the three layouts the TPM signs in read
    directly, anything else through tpm2-pytss."""
    try:
        sig_alg, _hash = struct.unpack_from(">HH", parameters)
        if sig_alg == ALG_ECDSA:
            (r_size,) = U16.unpack_from(parameters, 4)
            r = parameters[6:6 + r_size]
            (s_size,) = U16.unpack_from(parameters, 6 + r_size)
            s = parameters[8 + r_size:8 + r_size + s_size]
            if len(s) != s_size or 8 + r_size + s_size != len(parameters):
                raise malformed()
            return encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        if sig_alg in ALG_RSA_SIGNATURES:
            (size,) = U16.unpack_from(parameters, 4)
            if 6 + size != len(parameters):
                raise malformed()
            return parameters[6:].rjust(rsa_bytes, b"\0")
    except struct.error:
        raise malformed() from None
    return bytes(sign_result(parameters)).rjust(rsa_bytes, b"\0")


