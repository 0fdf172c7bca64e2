"""PERSIST, EVICT and KEYS, the broker's half: keys made persistent at owner handles
(TPM2_EvictControl, the owner's password proved by a pool session's HMAC), evicted,
and listed beside the keys the broker knows. Changes are for administrators only."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from tpm2_pytss.constants import TPM2_CAP
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..definitions import Opcode
from ..errors import AuthFailedError, BadKeyError, PermissionDeniedError, TpmError
from ..ops.persistence import (
    Evict,
    EvictResult,
    KeysRequest,
    KeysResult,
    Persist,
    PersistResult,
    check_owner_handle,
)
from ..tpm import command, persistent
from ..tpm import keys as keymod
from ..tpm.keys import MAX_AUTH_ANY as MAX_AUTH
from ..tpm.rc import tpm_code
from ..tpm.worker import TpmWorker
from .base import Request, serves

T = TypeVar("T")
log = logging.getLogger("tpmbroker.tpm")


def _admin(request: Request, what: str) -> None:
    if not request.peer_is_admin:
        raise PermissionDeniedError(
            f"uid {request.peer_uid} may not {what}: persistent handles are the broker "
            "administrators' (root, the broker's uid, --admin-uid, --admin-gid)")


@serves(Opcode.PERSIST)
def serve_persist(request: Request, msg: Persist) -> None:
    _admin(request, f"persist keys (0x{msg.handle:08x})")
    check_owner_handle(msg.handle)
    request.key_auth(msg.key_id)  # loaded on this connection, and the key policy admits it
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    key_id, handle, owner_auth = msg.key_id, msg.handle, msg.owner_auth

    def persisted(name: bytes) -> PersistResult:
        request.audit("key_persisted", handle=f"0x{handle:08x}", key=key_id.hex()[:16])
        return PersistResult(handle, name)

    request.submit(lambda: persist(worker, key_id, handle, deadline, owner_auth=owner_auth,
                                   peer=peer), persisted)


@serves(Opcode.EVICT)
def serve_evict(request: Request, msg: Evict) -> None:
    _admin(request, f"evict persistent handles (0x{msg.handle:08x})")
    check_owner_handle(msg.handle)
    worker, deadline, handle, owner_auth = (request.worker, request.deadline, msg.handle,
                                            msg.owner_auth)

    def evicted(_: Any) -> EvictResult:
        request.audit("key_evicted", handle=f"0x{handle:08x}")
        return EvictResult()

    request.submit(lambda: evict(worker, handle, deadline, owner_auth=owner_auth), evicted)


@serves(Opcode.KEYS)
def serve_keys(request: Request, msg: KeysRequest) -> None:
    def listed(tpm: dict[str, Any]) -> KeysResult:
        holders = request.key_holders()
        for key in tpm["loaded"]:
            held = holders.get(key["key_id"], [])
            key["connections"] = len(held)
            if request.peer_is_admin:  # who holds a key: the administrators' business
                key["uids"] = sorted(set(held))
        return KeysResult(json.dumps(tpm, sort_keys=True))

    request.submit(lambda: keys(request.worker, request.deadline), listed)


def persist(tpm: TpmWorker, key_id: bytes, handle: int, deadline: float, *,
            owner_auth: bytes = b"", peer: int = -1) -> bytes:
    """Make a loaded key persistent at `handle` (TPM2_EvictControl, the owner
    hierarchy's password proved by a pool session's HMAC); the key's Name. A handle
    in use is refused, never overwritten."""
    entry = tpm.loaded(key_id)
    if not entry.is_transient:
        raise BadKeyError(f"the key is persistent already, at "
                          f"0x{entry.persistent_handle:08x}")
    if len(owner_auth) > MAX_AUTH:
        raise AuthFailedError(f"the owner hierarchy's password is at most {MAX_AUTH} "
                              "bytes")

    def evict_control() -> bytes:
        if handle in persistent_handles(tpm, handle, 1):
            raise BadKeyError(f"0x{handle:08x} is in use by another persistent object; "
                              "evict it first (tpmbroker evict) or choose another handle")
        tpm.objects.forget_persistent(handle)  # whatever the broker knew there is gone
        key_handle, name = tpm.objects.handle_and_name(tpm.objects.resident(entry))
        tpm.execute(deadline, lambda session: command.prepare_evict_control(
            session, owner_auth, key_handle, name, handle), lambda _: None)
        return name

    return _evict_control(tpm, deadline, f"persisting the key at 0x{handle:08x}",
                               handle, evict_control)


def evict(tpm: TpmWorker, handle: int, deadline: float, *, owner_auth: bytes = b"") -> None:
    """Take the persistent object at `handle` out of the TPM; keys loaded by that
    handle are forgotten (their clients get UNKNOWN_KEY, then a LOAD that fails)."""
    if len(owner_auth) > MAX_AUTH:
        raise AuthFailedError(f"the owner hierarchy's password is at most {MAX_AUTH} "
                              "bytes")

    def evict_control() -> None:
        try:
            _, name = command.read_public(tpm.link.require(), handle)
        except TSS2_Exception as exc:
            if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
                raise BadKeyError(f"no persistent object at 0x{handle:08x}",
                                  tpm_rc=int(exc.rc)) from None
            raise
        tpm.execute(deadline, lambda session: command.prepare_evict_control(
            session, owner_auth, handle, name, handle), lambda _: None)

    _evict_control(tpm, deadline, f"evicting 0x{handle:08x}", handle, evict_control)
    dropped = tpm.objects.forget_persistent(handle)
    if dropped:
        log.info("evicted 0x%08x: forgot %d key(s) loaded by that handle", handle,
                 len(dropped))


def _evict_control(tpm: TpmWorker, deadline: float, doing: str, handle: int,
                   operation: Callable[[], T]) -> T:
    """`operation` (a TPM2_EvictControl), its refusals said in the owner's terms."""
    try:
        return tpm.run(deadline, doing, operation)
    except AuthFailedError as exc:
        # Hierarchy authorizations count no dictionary-attack failures.
        raise AuthFailedError(f"wrong password for the owner hierarchy while {doing}",
                              tpm_rc=exc.tpm_rc) from None
    except TpmError as exc:
        code = tpm_code(exc.tpm_rc)
        if code == 0x14C:  # TPM_RC_NV_DEFINED
            raise BadKeyError(f"0x{handle:08x} is in use by another persistent object",
                              tpm_rc=exc.tpm_rc) from None
        if code == 0x14B:  # TPM_RC_NV_SPACE
            raise TpmError("the TPM has no room for another persistent object; evict "
                           "one first", tpm_rc=exc.tpm_rc) from None
        if code == 0x149:  # TPM_RC_HIERARCHY
            raise BadKeyError(f"0x{handle:08x}: the key's hierarchy is not the owner's "
                              "or is disabled", tpm_rc=exc.tpm_rc) from None
        raise


def keys(tpm: TpmWorker, deadline: float) -> dict[str, Any]:
    """The TPM's persistent objects (TPM2_GetCapability, TPM2_ReadPublic) and the keys
    the worker knows, for KEYS."""
    def read() -> list[dict[str, object]]:
        transport = tpm.link.require()
        listed = []
        for handle in persistent_handles(tpm, keymod.PERSISTENT_FIRST):
            try:
                # The TPM brings a persistent object into an object slot to read it:
                # with every slot taken by loaded keys, one makes room.
                public, name = tpm.objects.with_room(
                    None, functools.partial(command.read_public, transport, handle))
            except TSS2_Exception as exc:
                if tpm_code(int(exc.rc)) in (0x08B, 0x084):
                    continue  # evicted by another TPM user meanwhile
                raise
            listed.append(persistent.describe_object(handle, public, name))
        return listed

    return {"persistent": tpm.run(deadline, "listing persistent handles", read),
            "loaded": [persistent.describe_loaded(entry) for entry in tpm.objects.keys]}


def persistent_handles(tpm: TpmWorker, first: int, count: int | None = None) -> list[int]:
    """Persistent handles from `first` on (TPM2_GetCapability TPM_CAP_HANDLES), at
    most `count` of them, or all."""
    handles: list[int] = []
    while count is None or len(handles) < count:
        want = 64 if count is None else count - len(handles)
        more, data = tpm.link.ectx.get_capability(TPM2_CAP.HANDLES, first, want)
        got = [int(h) for h in data.data.handles if keymod.is_persistent(int(h))]
        handles += got
        if not more or not got or len(got) < len(data.data.handles):
            break
        first = got[-1] + 1
    return handles if count is None else handles[:count]
