"""Authorized commands: every TPM command the broker sends with a pool session.

Commands are framed here (Part 3 command/response layout, the authorization area) and
sent through the link (tpm/link.py); the structures inside them are tpm2-pytss types and
their marshal()/unmarshal(). One path, prepare() then finish(), computes the session
HMAC and parameter encryption and checks the response, for every operation.

Failures raise tpm2-pytss's TSS2_Exception with the TPM's response code (or a TCTI
code when the transport broke), so callers classify them exactly like ESAPI errors.
A session whose last command has an unknown outcome (transport error, malformed or
forged response) is marked unusable: sending its next HMAC could fail authorization
and count toward the TPM's dictionary-attack lockout.

The arithmetic of prepare() and finish() runs in C (tpm/authorize.c, built with the
package): about 5 µs a command. tpm/reference.py does the same in Python from
session_crypto, as the oracle the tests hold the C code to.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tpm2_pytss.constants import TPM2_ALG, TPM2_CC, TPM2_RH, TPM2_ST, TSS2_RC
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_NAME,
    TPM2B_NONCE,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from . import session_crypto as sc

try:
    _authorize: Any = importlib.import_module(f"{__package__}._authorize")
except ImportError as exc:  # a source tree nobody compiled
    raise ImportError("tpmbroker.tpm._authorize is not built: run `python build_provider.py` "
                      "or install the package (it compiles it)") from exc

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
CC_START_AUTH_SESSION = 0x00000176
CC_SIGN = 0x0000015D
CC_FLUSH_CONTEXT = 0x00000165
CC_READ_CLOCK = 0x00000181
CC_CREATE = 0x00000153
CC_LOAD = 0x00000157
CC_CREATE_PRIMARY = 0x00000131
CC_RSA_DECRYPT = 0x00000159
CC_GET_RANDOM = 0x0000017B
CC_NV_READ = 0x0000014E
CC_NV_READ_PUBLIC = 0x00000169
CC_ECDH_ZGEN = 0x00000154
CC_IMPORT = 0x00000156
SE_HMAC = 0x00
SE_POLICY = 0x01
CC_PCR_READ = 0x0000017E
RH_OWNER = 0x40000001
RC_SUCCESS = 0
# Warnings after which the TPM did nothing and the same bytes may be sent again (libtpms
# answers RETRY the first time an algorithm needs its self-test, for one).
RC_YIELDED = 0x908
RC_TESTING = 0x90A
RC_RETRY = 0x922
RESEND_CODES = frozenset((RC_YIELDED, RC_TESTING, RC_RETRY))
MAX_RESENDS = 10

# The session survives each command and encrypts the command's first parameter. Sign's
# response starts with a TPMT_SIGNATURE, not a sized buffer, so it cannot be encrypted
# (the TPM answers TPM_RC_ATTRIBUTES if asked to).
SIGN_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT

HEADER = struct.Struct(">HII")
HEADER_SIZE = HEADER.size  # a response of just this much carries only a response code
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
_TWO_SIZES = struct.Struct(">HH")
ALG_ECDSA = int(TPM2_ALG.ECDSA)
ALG_RSA_SIGNATURES = (int(TPM2_ALG.RSASSA), int(TPM2_ALG.RSAPSS))
NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL).marshal()


class Transport(Protocol):
    def transact(self, command: bytes) -> bytes:
        """Send one command, return its response; TSS2_Exception (TCTI layer) on failure."""
        ...


class ResponseAuthError(TSS2_Exception):  # type: ignore[misc]
    """The response's HMAC is wrong: the response was altered or is not the TPM's."""

    def __init__(self) -> None:
        super().__init__(int(TSS2_RC.ESYS_RC_RSP_AUTH_FAILED))


def command_name(command_code: int) -> str:
    """TPM2_CC_Sign and the like, for the log."""
    try:
        return "TPM2_CC_" + str(TPM2_CC.to_string(command_code)).split(".")[-1]
    except ValueError:
        return f"0x{command_code:08x}"


def malformed() -> TSS2_Exception:
    return TSS2_Exception(int(TSS2_RC.ESYS_RC_MALFORMED_RESPONSE))


# --- framing --------------------------------------------------------------------------

def command(tag: int, command_code: int, handles: Sequence[int], body: bytes) -> bytes:
    handle_area = b"".join(U32.pack(h) for h in handles)
    size = HEADER.size + len(handle_area) + len(body)
    return HEADER.pack(tag, size, command_code) + handle_area + body


def tpm2b(data: bytes) -> bytes:
    return U16.pack(len(data)) + data


def first_sized_length(parameters: bytes) -> int:
    """The size of the sized buffer (TPM2B) that starts `parameters`, checked to fit."""
    try:
        (size,) = U16.unpack_from(parameters)
    except struct.error:
        raise malformed() from None
    if 2 + size > len(parameters):
        raise malformed()
    return int(size)


def response_code(response: bytes) -> int:
    """The response's code after a sanity check of its header."""
    if len(response) < HEADER.size:
        raise malformed()
    _tag, size, rc = HEADER.unpack_from(response)
    if size != len(response):
        raise malformed()
    return int(rc)


def transact(transport: Transport, command_bytes: bytes) -> bytes:
    """Send a command, again while the TPM answers that it did not start it."""
    for _ in range(MAX_RESENDS):
        response = transport.transact(command_bytes)
        if len(response) != HEADER.size or HEADER.unpack(response)[2] not in RESEND_CODES:
            break
    return response


def plain_command(command_code: int, handles: Sequence[int], parameters: bytes,
                  transport: Transport) -> bytes:
    """A command without sessions; returns the bytes after the response header."""
    response = transact(transport, command(ST_NO_SESSIONS, command_code, handles, parameters))
    rc = response_code(response)
    if rc != RC_SUCCESS:
        raise TSS2_Exception(rc)
    return response[HEADER.size:]


# --- commands without authorization ---------------------------------------------------

def read_clock(transport: Transport) -> tuple[int, int]:
    """(resetCount, restartCount) from TPM2_ReadClock."""
    body = plain_command(CC_READ_CLOCK, (), b"", transport)
    # TPMS_TIME_INFO: time u64, clock u64, resetCount u32, restartCount u32, safe u8.
    if len(body) < 25:
        raise malformed()
    reset_count, restart_count = struct.unpack_from(">II", body, 16)
    return reset_count, restart_count


def flush_context(transport: Transport, handle: int) -> None:
    plain_command(CC_FLUSH_CONTEXT, (), U32.pack(handle), transport)


def salt_key_of(public: Any) -> sc.SaltKey:
    """The salting view of a TPMT_PUBLIC (ECC or RSA storage key)."""
    name_alg = int(public.nameAlg)
    if public.type == TPM2_ALG.ECC:
        point = public.unique.ecc
        return sc.SaltKey(name_alg, ecc_curve=int(public.parameters.eccDetail.curveID),
                          ecc_x=bytes(point.x), ecc_y=bytes(point.y))
    if public.type == TPM2_ALG.RSA:
        return sc.SaltKey(name_alg, rsa_modulus=bytes(public.unique.rsa),
                          rsa_exponent=int(public.parameters.rsaDetail.exponent))
    raise ValueError("a salt key is ECC or RSA")


def aes128_cfb() -> Any:
    return TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))


def start_salted_session(transport: Transport, salt_handle: int, salt_public: Any,
                         hash_alg: int = int(TPM2_ALG.SHA256),
                         random: Callable[[int], bytes] = os.urandom,
                         session_type: int = SE_HMAC) -> sc.SessionState:
    """TPM2_StartAuthSession: an unbound HMAC (or, with SE_POLICY, policy) session
    salted to `salt_handle`, AES-128-CFB for parameter encryption."""
    name = sc.hash_name(hash_alg)
    nonce_caller = random(sc.digest_size(name))
    salt, encrypted_salt = sc.make_salt(salt_key_of(salt_public))
    parameters = b"".join((
        TPM2B_NONCE(nonce_caller).marshal(),
        TPM2B_ENCRYPTED_SECRET(encrypted_salt).marshal(),
        bytes((session_type,)),
        aes128_cfb().marshal(),
        U16.pack(hash_alg),
    ))
    body = plain_command(CC_START_AUTH_SESSION, (salt_handle, int(TPM2_RH.NULL)), parameters,
                         transport)
    if len(body) < 4:
        raise malformed()
    (handle,) = U32.unpack_from(body)
    nonce_tpm, _ = TPM2B_NONCE.unmarshal(body[4:])
    nonce_tpm = bytes(nonce_tpm)
    key = sc.session_key(name, b"", salt, nonce_tpm, nonce_caller)
    return sc.SessionState(handle, hash_alg, key, nonce_tpm)


def pcr_read(transport: Transport, selection: bytes) -> tuple[bytes, list[bytes]]:
    """TPM2_PCR_Read: (the selection the TPM answered for, the values in its order)."""
    body = plain_command(CC_PCR_READ, (), selection, transport)
    try:
        out, used = TPML_PCR_SELECTION.unmarshal(body[4:])
        pos = 4 + used
        (count,) = U32.unpack_from(body, pos)
        pos += 4
        values = []
        for _ in range(count):
            size = first_sized_length(body[pos:])
            values.append(body[pos + 2:pos + 2 + size])
            pos += 2 + size
    except (struct.error, TSS2_Exception, ValueError):
        raise malformed() from None
    return bytes(out.marshal()), values


# --- commands authorized by an HMAC session -------------------------------------------

@dataclasses.dataclass
class PendingCommand:
    """A command on its way to the TPM, with what checking its response needs."""

    session: sc.SessionState
    command_code: int
    command: bytes
    hmac_key: bytes
    nonce_caller: bytes
    attributes: int
    response_handles: int
    c_pending: Any = None  # the C implementation's tb_pending, when it prepared this
    # Authorizations after the session's, each the empty password (TPM_RS_PW): their
    # answers are removed before the session's is checked (see with_empty_password).
    password_auths: int = 0


def prepare(session: sc.SessionState, command_code: int, handles: Sequence[int],
            names: Sequence[bytes], auth: bytes, first_parameter: bytes | None,
            other_parameters: bytes, attributes: int, response_handles: int = 0,
            nonce_caller: bytes | None = None) -> PendingCommand:
    """Frame a command whose one authorized handle uses `session`.

    `first_parameter` is the contents of the command's first parameter when it is a
    sized buffer; with DECRYPT in `attributes` it is encrypted. `auth` is the authValue
    of the entity the session authorizes (the session is unbound, so it always counts).
    `nonce_caller` is fresh and random unless a test fixes it.
    """
    if not session.usable:
        raise TSS2_Exception(int(TSS2_RC.ESYS_RC_BAD_SEQUENCE))
    return _c_prepare(session, command_code, handles, names, auth, first_parameter,
                      other_parameters, attributes, response_handles, nonce_caller)


def finish(pending: PendingCommand, response: bytes) -> tuple[list[int], bytes]:
    """Check a response against its command: (response handles, response parameters).

    Raises TSS2_Exception with the TPM's code when it refused the command (the session's
    nonceTPM then stays as it was), ResponseAuthError when the HMAC does not match.
    """
    return _c_finish(pending, response)


# --- the arithmetic, in C -----------------------------------------------------------------------

MAX_COMMAND = 4096
_ZEROS = bytes(MAX_COMMAND)
_C_ERRORS: dict[int, Callable[[], TSS2_Exception]] = {
    _authorize.lib.TB_MALFORMED: malformed,
    _authorize.lib.TB_AUTH_FAILED: ResponseAuthError,
    _authorize.lib.TB_BAD_ARGUMENT: lambda: TSS2_Exception(int(TSS2_RC.ESYS_RC_BAD_VALUE)),
    _authorize.lib.TB_CRYPTO_ERROR: lambda: TSS2_Exception(
        int(TSS2_RC.ESYS_RC_GENERAL_FAILURE)),
}


class _Scratch(threading.local):
    """One thread's libcrypto contexts and output buffers for the C code."""

    def __init__(self) -> None:
        ffi, lib = _authorize.ffi, _authorize.lib
        ctx = lib.tb_ctx_new()
        if ctx == ffi.NULL:
            raise MemoryError("libcrypto could not set up the session contexts")
        self.ctx = ffi.gc(ctx, lib.tb_ctx_free)
        self.command = ffi.new("uint8_t[]", MAX_COMMAND)
        self.command_len = ffi.new("size_t *")
        self.result = ffi.new("tb_result *")
        self.signature = ffi.new("uint8_t[]", 1024)
        self.clear = ffi.new("uint8_t[]", MAX_COMMAND)  # a response, decrypted
        self.on_curve = ffi.new("int *")


_scratch: _Scratch | None = None


def _c_scratch() -> _Scratch:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    return _scratch


def _c_prepare(session: sc.SessionState, command_code: int, handles: Sequence[int],
               names: Sequence[bytes], auth: bytes, first_parameter: bytes | None,
               other_parameters: bytes, attributes: int, response_handles: int,
               nonce_caller: bytes | None) -> PendingCommand:
    ffi, lib = _authorize.ffi, _authorize.lib
    scratch = _c_scratch()
    c_pending = ffi.new("tb_pending *")
    nonce_tpm = session.nonce_tpm
    if nonce_caller is not None and len(nonce_caller) != len(nonce_tpm):
        raise ValueError("nonceCaller must be as long as the session's nonces")
    joined_names = b"".join(names)
    first = first_parameter or b""
    status = lib.tb_prepare(
        scratch.ctx, session.hash_alg, session.handle, session.session_key,
        len(session.session_key), nonce_tpm, len(nonce_tpm),
        ffi.NULL if nonce_caller is None else nonce_caller, command_code,
        handles, len(handles), joined_names, len(joined_names), auth, len(auth),
        first_parameter is not None, first, len(first),
        other_parameters, len(other_parameters), attributes, response_handles, c_pending,
        scratch.command, MAX_COMMAND, scratch.command_len)
    if status != lib.TB_OK:
        raise _C_ERRORS[status]()
    return PendingCommand(session, command_code,
                          ffi.buffer(scratch.command, scratch.command_len[0])[:],
                          b"", b"", attributes, response_handles, c_pending)


def ec_point_on_curve(curve: str, point: bytes) -> bool:
    """Is `point` an uncompressed SEC1 point on the NIST curve `curve` ("P-256", "P-384",
    "P-521")? ValueError for another curve (tb_ec_point_on_curve)."""
    lib = _authorize.lib
    scratch = _c_scratch()
    status = lib.tb_ec_point_on_curve(scratch.ctx, curve.encode(), point, len(point),
                                      scratch.on_curve)
    if status == lib.TB_BAD_ARGUMENT:
        raise ValueError(f"no ECDH point check for curve {curve}")
    if status != lib.TB_OK:
        raise _C_ERRORS[status]()
    return bool(scratch.on_curve[0])


def _c_finish(pending: PendingCommand, response: bytes) -> tuple[list[int], bytes]:
    ffi, lib = _authorize.ffi, _authorize.lib
    scratch = _c_scratch()
    result = scratch.result
    status = lib.tb_finish(scratch.ctx, pending.c_pending, response, len(response), result,
                           scratch.clear, MAX_COMMAND)
    if status == lib.TB_TPM_ERROR:
        raise TSS2_Exception(result.rc)
    if status != lib.TB_OK:
        raise _C_ERRORS[status]()
    handles = [U32.unpack_from(response, HEADER.size + 4 * i)[0]
               for i in range(pending.response_handles)]
    length = result.params_len
    if result.decrypted:
        parameters = ffi.buffer(scratch.clear, length)[:]
        ffi.memmove(scratch.clear, _ZEROS, length)  # no clear copy left behind
    else:
        start = result.params_offset
        parameters = response[start:start + length]
    pending.session.nonce_tpm = ffi.buffer(result.nonce_tpm, result.nonce_tpm_len)[:]
    return handles, parameters


def execute(transport: Transport, pending: PendingCommand) -> tuple[list[int], bytes]:
    """Send a prepared command and check its response.

    The session is unusable while the command is out: only a well-formed, authentic
    answer (or a plain TPM refusal, which leaves the nonces alone) makes it usable again.
    """
    session = pending.session
    session.usable = False
    response = transact(transport, pending.command)
    try:
        if pending.password_auths:
            response = _without_password_answers(response, pending.password_auths)
        result = finish(pending, response)
    except ResponseAuthError:
        raise
    except TSS2_Exception as exc:
        if int(exc.rc) & int(TSS2_RC.RC_LAYER_MASK) == 0:
            session.usable = True  # the TPM refused; its nonce did not move
        raise
    session.usable = True
    return result


# --- TPM2_Sign ------------------------------------------------------------------------

_scheme_cache: dict[tuple[int, int], bytes] = {}


def sign_scheme(scheme_alg: int, hash_alg: int) -> bytes:
    """Marshalled TPMT_SIG_SCHEME followed by the null TPMT_TK_HASHCHECK (cached)."""
    cached = _scheme_cache.get((scheme_alg, hash_alg))
    if cached is None:
        scheme = TPMT_SIG_SCHEME(scheme=scheme_alg)
        scheme.details.any.hashAlg = hash_alg
        cached = _scheme_cache[(scheme_alg, hash_alg)] = scheme.marshal() + NULL_TICKET
    return cached


def prepare_sign(session: sc.SessionState, key_handle: int, key_name: bytes, auth: bytes,
                 digest: bytes, scheme_alg: int, hash_alg: int,
                 attributes: int = SIGN_ATTRIBUTES) -> PendingCommand:
    return prepare(session, CC_SIGN, (key_handle,), (key_name,), auth, digest,
                   sign_scheme(scheme_alg, hash_alg), attributes)


def sign_result(parameters: bytes) -> Any:
    """The TPMT_SIGNATURE of a TPM2_Sign response, as a tpm2-pytss object."""
    try:
        signature, used = TPMT_SIGNATURE.unmarshal(parameters)
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    if used != len(parameters):
        raise malformed()
    return signature


def signature_bytes(parameters: bytes, rsa_bytes: int = 0) -> bytes:
    """The signature in a TPM2_Sign response: DER Ecdsa-Sig-Value for ECDSA, the raw
    signature for RSA (left-padded to `rsa_bytes`); what bytes(TPMT_SIGNATURE) gives.
    """
    scratch = _c_scratch()
    length = _authorize.lib.tb_signature_bytes(parameters, len(parameters), rsa_bytes,
                                               scratch.signature, 1024)
    if length > 0:
        return bytes(_authorize.ffi.buffer(scratch.signature, length))
    if length < 0:
        raise malformed()
    return bytes(sign_result(parameters)).rjust(rsa_bytes, b"\0")  # another layout


def sign(transport: Transport, session: sc.SessionState, key_handle: int, key_name: bytes,
         auth: bytes, digest: bytes, scheme_alg: int, hash_alg: int) -> bytes:
    """TPM2_Sign authorized (and its digest encrypted) by `session`: the signature bytes
    (see signature_bytes)."""
    pending = prepare_sign(session, key_handle, key_name, auth, digest, scheme_alg, hash_alg)
    _, parameters = execute(transport, pending)
    return signature_bytes(parameters)


# --- TPM2_RSA_Decrypt as the raw RSA private operation ----------------------------------

_RSA_DECRYPT_NULL_SCHEME_EMPTY_LABEL = U16.pack(0x0010) + U16.pack(0)  # TPM_ALG_NULL, ""


def prepare_rsa_private(session: sc.SessionState, key_handle: int, key_name: bytes,
                        auth: bytes, block: bytes) -> PendingCommand:
    """m^d mod n of a modulus-long `block` (TPM2_RSA_Decrypt with scheme NULL), for PSS
    that the broker padded. `session` authorizes it and encrypts the block on its way."""
    return prepare(session, CC_RSA_DECRYPT, (key_handle,), (key_name,), auth, block,
                   _RSA_DECRYPT_NULL_SCHEME_EMPTY_LABEL, SIGN_ATTRIBUTES)


# --- TPM2_RSA_Decrypt for clients' ciphertexts ---------------------------------------------

# The ciphertext goes out encrypted (DECRYPT, though it is public anyway) and the plaintext,
# the response's first parameter, comes back encrypted (ENCRYPT): it never crosses the
# TPM's bus in the clear.
DECRYPT_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT | sc.ENCRYPT
ALG_NULL = int(TPM2_ALG.NULL)
ALG_RSAES = int(TPM2_ALG.RSAES)
ALG_OAEP = int(TPM2_ALG.OAEP)


def prepare_rsa_decrypt(session: sc.SessionState, key_handle: int, key_name: bytes,
                        auth: bytes, ciphertext: bytes, scheme_alg: int = ALG_NULL,
                        hash_alg: int = 0, label: bytes = b"") -> PendingCommand:
    """TPM2_RSA_Decrypt of `ciphertext` with inScheme `scheme_alg` (NULL: the key's own
    scheme, or the raw private operation if that is NULL too; OAEP takes `hash_alg`),
    its answer encrypted. `label` must be empty or end in a zero byte (the TPM's rule)."""
    if scheme_alg == ALG_NULL and not label:
        rest = _RSA_DECRYPT_NULL_SCHEME_EMPTY_LABEL
    else:
        scheme = U16.pack(scheme_alg) + (U16.pack(hash_alg) if scheme_alg == ALG_OAEP
                                         else b"")
        rest = scheme + tpm2b(label)
    return prepare(session, CC_RSA_DECRYPT, (key_handle,), (key_name,), auth, ciphertext,
                   rest, DECRYPT_ATTRIBUTES)


def sized_result(parameters: bytes) -> bytes:
    """The contents of a response whose one parameter is a sized buffer (TPM2B):
    RSA_Decrypt's message, GetRandom's randomBytes."""
    if first_sized_length(parameters) + 2 != len(parameters):
        raise malformed()
    return parameters[2:]


# --- TPM2_Create ----------------------------------------------------------------------

def prepare_create(session: sc.SessionState, parent_handle: int, parent_name: bytes,
                   parent_auth: bytes, sensitive: Any, public: Any) -> PendingCommand:
    """TPM2_Create under `parent_handle`, authorized by `session`, which also encrypts
    inSensitive (the new key's password). `sensitive` is a TPM2B_SENSITIVE_CREATE,
    `public` a TPM2B_PUBLIC."""
    in_sensitive = sensitive.marshal()[2:]  # the sized buffer's contents get encrypted
    rest = public.marshal() + TPM2B_DATA().marshal() + TPML_PCR_SELECTION().marshal()
    return prepare(session, CC_CREATE, (parent_handle,), (parent_name,), parent_auth,
                   in_sensitive, rest, sc.CONTINUE_SESSION | sc.DECRYPT)


def create_result(parameters: bytes) -> tuple[Any, Any]:
    """(TPM2B_PRIVATE, TPM2B_PUBLIC) of a TPM2_Create response."""
    try:
        private, used = TPM2B_PRIVATE.unmarshal(parameters)
        out_public, _ = TPM2B_PUBLIC.unmarshal(parameters[used:])
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    return private, out_public


# --- TPM2_Import ---------------------------------------------------------------------------

# The duplicate's outer wrapper is keyed by a seed only the parent can decrypt, so what
# crosses the link is ciphertext already. The session still encrypts the first
# parameter each way: encryptionKey (empty: no inner wrapper) and outPrivate, and proves
# the parent's password by its HMAC alone.
IMPORT_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT | sc.ENCRYPT


def prepare_import(session: sc.SessionState, parent_handle: int, parent_name: bytes,
                   parent_auth: bytes, public: Any, duplicate: Any,
                   encrypted_seed: bytes) -> PendingCommand:
    """TPM2_Import(parentHandle, encryptionKey=empty, objectPublic, duplicate, inSymSeed,
    symmetricAlg=NULL) authorized by `session`: a key wrapped to the parent by its outer
    wrapper alone (TPM 2.0 Part 1, Duplication), as importable key files carry it."""
    rest = (public.marshal() + duplicate.marshal() + tpm2b(encrypted_seed)
            + U16.pack(int(TPM2_ALG.NULL)))
    return prepare(session, CC_IMPORT, (parent_handle,), (parent_name,), parent_auth,
                   b"", rest, IMPORT_ATTRIBUTES)


def import_result(parameters: bytes) -> Any:
    """The TPM2B_PRIVATE of a TPM2_Import response."""
    try:
        private, used = TPM2B_PRIVATE.unmarshal(parameters)
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    if used != len(parameters):
        raise malformed()
    return private


# --- TPM2_Load and TPM2_CreatePrimary with a parent password ------------------------------

# The parent's password enters only the session's HMAC key, never the command: nothing
# of it crosses the link. DECRYPT also hides inPrivate (already encrypted to the parent).
LOAD_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT


def prepare_load(session: sc.SessionState, parent_handle: int, parent_name: bytes,
                 parent_auth: bytes, private: Any, public: Any) -> PendingCommand:
    """TPM2_Load of a key (TPM2B_PRIVATE, TPM2B_PUBLIC) under `parent_handle`, whose
    authorization `parent_auth` is proved by `session`'s HMAC."""
    return prepare(session, CC_LOAD, (parent_handle,), (parent_name,), parent_auth,
                   private.marshal()[2:], public.marshal(), LOAD_ATTRIBUTES,
                   response_handles=1)


def prepare_create_primary(session: sc.SessionState, hierarchy: int, hierarchy_auth: bytes,
                           public: Any) -> PendingCommand:
    """TPM2_CreatePrimary under `hierarchy` (a permanent handle, whose Name is the handle
    itself), authorized by `session`'s HMAC with the hierarchy's password."""
    in_sensitive = TPM2B_SENSITIVE_CREATE().marshal()[2:]
    rest = public.marshal() + TPM2B_DATA().marshal() + TPML_PCR_SELECTION().marshal()
    return prepare(session, CC_CREATE_PRIMARY, (hierarchy,), (U32.pack(hierarchy),),
                   hierarchy_auth, in_sensitive, rest, sc.CONTINUE_SESSION | sc.DECRYPT,
                   response_handles=1)


# --- TPM2_GetRandom, its answer encrypted -------------------------------------------------

# GetRandom has no handle, so the session authorizes nothing: it is there to encrypt the
# response's randomBytes (ENCRYPT) and to make the answer authentic (its HMAC, keyed by
# the sessionKey alone). Without it the random bytes would cross the link in the clear.
RANDOM_ATTRIBUTES = sc.CONTINUE_SESSION | sc.ENCRYPT


def prepare_get_random(session: sc.SessionState, count: int,
                       nonce_caller: bytes | None = None) -> PendingCommand:
    """TPM2_GetRandom(bytesRequested=count) through `session`, answer encrypted."""
    return prepare(session, CC_GET_RANDOM, (), (), b"", None, U16.pack(count),
                   RANDOM_ATTRIBUTES, nonce_caller=nonce_caller)


# --- TPM2_NV_ReadPublic and TPM2_NV_Read ---------------------------------------------------

def nv_read_public(transport: Transport, index: int) -> tuple[Any, bytes]:
    """(TPMS_NV_PUBLIC, Name) of an NV index; needs no authorization."""
    body = plain_command(CC_NV_READ_PUBLIC, (index,), b"", transport)
    try:
        public, used = TPM2B_NV_PUBLIC.unmarshal(body)
        name, used2 = TPM2B_NAME.unmarshal(body[used:])
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    if used + used2 != len(body):
        raise malformed()
    return public.nvPublic, bytes(name)


# The data read is the response's first parameter: it crosses the bus encrypted.
NV_READ_ATTRIBUTES = sc.CONTINUE_SESSION | sc.ENCRYPT


def prepare_nv_read(session: sc.SessionState, auth_handle: int, auth_name: bytes,
                    index: int, index_name: bytes, size: int, offset: int,
                    ) -> PendingCommand:
    """TPM2_NV_Read of `size` bytes at `offset`, authorized by `auth_handle` (the index
    itself or the owner hierarchy) with an empty authValue."""
    return prepare(session, CC_NV_READ, (auth_handle, index), (auth_name, index_name), b"",
                   None, U16.pack(size) + U16.pack(offset), NV_READ_ATTRIBUTES)



# --- TPM2_ECDH_ZGen, both points encrypted --------------------------------------------------

# inPoint (the peer's public point) is the command's first parameter and outPoint (the
# shared point, whose x-coordinate is the secret) the response's, both TPM2B_ECC_POINT:
# DECRYPT and ENCRYPT carry them across the bus encrypted.
ECDH_ATTRIBUTES = sc.CONTINUE_SESSION | sc.DECRYPT | sc.ENCRYPT


def prepare_ecdh_zgen(session: sc.SessionState, key_handle: int, key_name: bytes,
                      auth: bytes, x: bytes, y: bytes) -> PendingCommand:
    """TPM2_ECDH_ZGen(keyHandle, inPoint=(x, y)) authorized by `session`."""
    return prepare(session, CC_ECDH_ZGEN, (key_handle,), (key_name,), auth,
                   tpm2b(x) + tpm2b(y), b"", ECDH_ATTRIBUTES)


def ecdh_zgen_result(parameters: bytes) -> bytes:
    """The x-coordinate of the shared point in a TPM2_ECDH_ZGen response."""
    # outPoint: TPM2B_ECC_POINT(size, TPMS_ECC_POINT(TPM2B x, TPM2B y)), and nothing after
    try:
        size, x_size = _TWO_SIZES.unpack_from(parameters)
        (y_size,) = U16.unpack_from(parameters, 4 + x_size)
    except struct.error:
        raise malformed() from None
    if 2 + size != len(parameters) or 2 + x_size + 2 + y_size != size:
        raise malformed()
    return parameters[4:4 + x_size]


# --- TPM2_EvictControl and TPM2_ReadPublic: persistent handles ------------------------------

CC_EVICT_CONTROL = 0x00000120
CC_READ_PUBLIC = 0x00000173
# The one parameter, persistentHandle, is no sized buffer: nothing to encrypt. The owner
# hierarchy's password enters only the session's HMAC key.
EVICT_CONTROL_ATTRIBUTES = sc.CONTINUE_SESSION


def prepare_evict_control(session: sc.SessionState, owner_auth: bytes, object_handle: int,
                          object_name: bytes, persistent_handle: int) -> PendingCommand:
    """TPM2_EvictControl(auth=OWNER, objectHandle, persistentHandle): a transient object
    made persistent at `persistent_handle`, or (`object_handle` persistent, the same
    handle) a persistent object taken out. `object_name` is the object's Name."""
    owner = int(TPM2_RH.OWNER)
    return prepare(session, CC_EVICT_CONTROL, (owner, object_handle),
                   (U32.pack(owner), object_name), owner_auth, None,
                   U32.pack(persistent_handle), EVICT_CONTROL_ATTRIBUTES)


def read_public(transport: Transport, handle: int) -> tuple[Any, bytes]:
    """(TPMT_PUBLIC, Name) of a loaded or persistent object; needs no authorization."""
    body = plain_command(CC_READ_PUBLIC, (handle,), b"", transport)
    try:
        public, used = TPM2B_PUBLIC.unmarshal(body)
        name, used2 = TPM2B_NAME.unmarshal(body[used:])
        _, used3 = TPM2B_NAME.unmarshal(body[used + used2:])  # qualifiedName
    except (TSS2_Exception, ValueError):
        raise malformed() from None
    if used + used2 + used3 != len(body):
        raise malformed()
    return public.publicArea, bytes(name)


# --- a second authorization: the empty password -------------------------------------------
# A command on two handles that both need authorization (TPM2_Certify: the key certified
# and the key that signs) takes the pool session for the first and, for a second whose
# authValue is empty (the broker's attestation key), a password authorization: no TPM
# session, and nothing secret on the bus. The TPM answers it with five fixed bytes after
# the session's answer, which are checked and removed before the session's HMAC is.

TPM_RS_PW = 0x40000009
_EMPTY_PASSWORD = U32.pack(TPM_RS_PW) + U16.pack(0) + b"\x00" + U16.pack(0)
_AUTH_SIZE_AT = HEADER.size  # after the handles: HEADER.size + 4 * handles


def with_empty_password(pending: PendingCommand, handles: int) -> PendingCommand:
    """`pending` with an empty-password authorization added after its session's."""
    frame = pending.command
    at = _AUTH_SIZE_AT + 4 * handles
    (auth_size,) = U32.unpack_from(frame, at)
    end = at + 4 + auth_size
    body = U32.pack(auth_size + len(_EMPTY_PASSWORD)) + frame[at + 4:end] + _EMPTY_PASSWORD
    tag, size, code = HEADER.unpack_from(frame)
    pending.command = (HEADER.pack(tag, size + len(_EMPTY_PASSWORD), code)
                       + frame[HEADER.size:at] + body + frame[end:])
    pending.password_auths += 1
    return pending


def _without_password_answers(response: bytes, count: int) -> bytes:
    """A response without the answers to `count` password authorizations at its end
    (empty nonce, attributes, empty HMAC); a refusal carries none."""
    if len(response) == HEADER.size:
        return response
    cut = 5 * count
    tail = response[-cut:]
    if len(response) < HEADER.size + cut or any(
            tail[i:i + 2] != b"\0\0" or tail[i + 3:i + 5] != b"\0\0"
            for i in range(0, cut, 5)):
        raise malformed()
    tag, size, rc = HEADER.unpack_from(response)
    return HEADER.pack(tag, size - cut, rc) + response[HEADER.size:-cut]
