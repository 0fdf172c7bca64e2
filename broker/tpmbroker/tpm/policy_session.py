"""Commands on keys with a policy (tpmbroker.keypolicy): a policy session from the
worker's policy pool is restarted, the key's policy replayed on it (PCRs, the password,
a signed policy checked by the TPM), and the command authorized by it. The policy
commands themselves (TPM2_PolicyPCR and the others) are at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from tpm2_pytss.TSS2_Exception import TSS2_Exception

from .. import keypolicy
from ..errors import AuthFailedError, BadKeyError, PolicyFailedError
from . import command
from .command import (
    RH_OWNER,
    U16,
    U32,
    Transport,
    first_sized_length,
    malformed,
    plain_command,
    tpm2b,
)
from .keys import CachedKey
from .rc import Kind, classify, tpm_code
from .session_crypto import SessionState

if TYPE_CHECKING:
    from .worker import TpmWorker

T = TypeVar("T")
TPM_RC_VALUE = 0x084
TPM_RC_POLICY_FAIL = 0x09D


def execute(tpm: TpmWorker, entry: CachedKey, auth: bytes, deadline: float,
            prepare: Callable[[SessionState], command.PendingCommand],
            result: Callable[[bytes], T]) -> T:
    """The command with a policy session: PolicyRestart, the key's policy replayed,
    then the command, authorized by the session (and the key's password in its HMAC
    when the policy has TPM2_PolicyAuthValue).

    The policy commands need no authorization: a policy that does not hold costs no
    dictionary-attack count. Only a wrong password after PolicyAuthValue does, as with
    any key that has a password.
    """
    steps = entry.policy
    if auth and not keypolicy.needs_password(steps):
        raise AuthFailedError("the key's policy takes no password (no "
                              "TPM2_PolicyAuthValue in it); none may be given")
    session = tpm.policy_pool.acquire(deadline)
    tpm.check_deadline(deadline)
    transport = tpm.link.require()
    policy_restart(transport, session.handle)
    if steps[0].command_code == keypolicy.CC_POLICY_AUTHORIZE:
        _signed_policy(tpm, entry, session.handle, steps[0])
        steps = steps[1:]
    _replay(tpm, session.handle, steps)
    pending = prepare(session)
    try:
        _, parameters = command.execute(transport, pending)
    except command.ResponseAuthError:
        tpm.forged_answer(tpm.policy_pool, pending)
        raise
    except TSS2_Exception as exc:
        if tpm_code(int(exc.rc)) == TPM_RC_POLICY_FAIL:
            raise PolicyFailedError("the TPM refused the key's policy session: the "
                                    "policy in the key file is not the key's",
                                    tpm_rc=int(exc.rc)) from None
        raise
    return result(parameters)


def _replay(tpm: TpmWorker, session_handle: int, steps: Sequence[keypolicy.PolicyStep]) -> None:
    """PolicyPCR and PolicyAuthValue on the policy session, in order."""
    transport = tpm.link.require()
    for step in steps:
        if step.command_code == keypolicy.CC_POLICY_PCR:
            selections, digest = keypolicy.split_pcr_step(step)
            try:
                policy_pcr(transport, session_handle, digest,
                                   keypolicy.marshal_selection(selections))
            except TSS2_Exception as exc:
                if tpm_code(int(exc.rc)) == TPM_RC_VALUE:
                    raise PolicyFailedError(keypolicy.mismatch(selections),
                                            tpm_rc=int(exc.rc)) from None
                raise
        elif step.command_code == keypolicy.CC_POLICY_AUTH_VALUE:
            policy_auth_value(transport, session_handle)
        else:  # keys.check_key_policy allows PolicyAuthorize first only
            raise BadKeyError(f"{step.name} out of place in the key's policy")


def _signed_policy(tpm: TpmWorker, entry: CachedKey, session_handle: int,
                   authorize: keypolicy.PolicyStep) -> None:
    """Satisfy the key's PolicyAuthorize with the first of its signed policies that
    holds: its commands, then the TPM's check of its signature (LoadExternal of the
    policy key, VerifySignature, the ticket to PolicyAuthorize)."""
    main = keypolicy.Authorize.decode(authorize.command_policy)
    transport = tpm.link.require()
    signed = entry.blob.auth_policies if entry.blob is not None else ()
    if not signed:
        raise PolicyFailedError("the key needs a signed policy (authPolicy) and its file "
                                "has none: add one with `tpmbroker policy sign`")
    refusals = []
    for name, policy in signed:
        label = f"signed policy {name!r}" if name else "a signed policy"
        body, signature = keypolicy.signed_policy_steps(policy)
        if (signature.key_public, signature.policy_ref) != (main.key_public,
                                                            main.policy_ref):
            refusals.append(f"{label} is signed by another key")
            continue
        policy_restart(transport, session_handle)
        try:
            _replay(tpm, session_handle, body)
        except PolicyFailedError as exc:
            refusals.append(f"{label}: {exc.message}")
            continue
        approved = policy_get_digest(transport, session_handle)
        a_hash = hashlib.sha256(approved + main.policy_ref).digest()
        handle = tpm.objects.with_room(entry, lambda: load_external_public(
            transport, main.key_public))
        try:
            ticket = verify_signature(transport, handle, a_hash,
                                              signature.signature)
        except TSS2_Exception as exc:
            if classify(exc) is not Kind.OTHER:
                raise
            refusals.append(f"{label}: its signature does not verify")
            continue
        finally:
            with contextlib.suppress(TSS2_Exception):
                command.flush_context(transport, handle)
        policy_authorize(transport, session_handle, approved, main.policy_ref,
                                 main.key_name, ticket)
        return
    raise PolicyFailedError("no signed policy of the key holds: " + "; ".join(refusals))


# --- the policy commands ------------------------------------------------------------------
# The policy session is their handle, not their authorization; nothing they carry is
# secret (PCR selections and digests, command codes), so they go without sessions.

CC_POLICY_GET_DIGEST = 0x00000189
CC_LOAD_EXTERNAL = 0x00000167
CC_VERIFY_SIGNATURE = 0x00000177


def policy_restart(transport: Transport, session_handle: int) -> None:
    plain_command(keypolicy.CC_POLICY_RESTART, (session_handle,), b"", transport)


def policy_pcr(transport: Transport, session_handle: int, pcr_digest: bytes,
               selection: bytes) -> None:
    """TPM2_PolicyPCR: `selection` is a marshalled TPML_PCR_SELECTION."""
    plain_command(keypolicy.CC_POLICY_PCR, (session_handle,), tpm2b(pcr_digest) + selection,
                  transport)


def policy_auth_value(transport: Transport, session_handle: int) -> None:
    plain_command(keypolicy.CC_POLICY_AUTH_VALUE, (session_handle,), b"", transport)


def policy_get_digest(transport: Transport, session_handle: int) -> bytes:
    body = plain_command(CC_POLICY_GET_DIGEST, (session_handle,), b"", transport)
    size = first_sized_length(body)
    return body[2:2 + size]


def load_external_public(transport: Transport, public: bytes) -> int:
    """TPM2_LoadExternal of a public key alone (a TPMT_PUBLIC) in the owner hierarchy,
    so that its verification tickets count for PolicyAuthorize; returns its handle."""
    body = plain_command(CC_LOAD_EXTERNAL, (), U16.pack(0) + tpm2b(public)
                         + U32.pack(RH_OWNER), transport)
    if len(body) < 4:
        raise malformed()
    return int(U32.unpack_from(body)[0])


def verify_signature(transport: Transport, key_handle: int, digest: bytes,
                     signature: bytes) -> bytes:
    """TPM2_VerifySignature: the TPMT_TK_VERIFIED ticket, marshalled."""
    return plain_command(CC_VERIFY_SIGNATURE, (key_handle,), tpm2b(digest) + signature,
                         transport)


def policy_authorize(transport: Transport, session_handle: int, approved: bytes,
                     policy_ref: bytes, key_name: bytes, ticket: bytes) -> None:
    plain_command(keypolicy.CC_POLICY_AUTHORIZE, (session_handle,), tpm2b(approved)
                  + tpm2b(policy_ref) + tpm2b(key_name) + ticket, transport)
