"""PERSIST, EVICT and KEYS: persistent handles without tpm2-tools (docs/broker.md).

PERSIST makes a key this connection LOADed persistent at a handle 0x81xxxxxx, EVICT takes
a persistent object out of the TPM, both with TPM2_EvictControl authorized by the owner
hierarchy through a pool session. They change the TPM for every user of it, so only the
broker's administrators may send them (root, the broker's own uid, --admin-uid and
--admin-gid; docs/security.md). KEYS lists the TPM's persistent handles and the keys the
broker holds, as JSON; any peer the socket admits may ask.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..definitions import Opcode
from ..errors import BadKeyError, PermissionDeniedError
from ..protocol import Message, Result
from .base import Request

# Owner-hierarchy persistent handles (TPM 2.0 Part 2, 7.4): the platform's range,
# 0x81800000 to 0x81FFFFFF, is not the owner's to change.
OWNER_PERSISTENT_FIRST = 0x81000000
OWNER_PERSISTENT_LAST = 0x817FFFFF


@dataclasses.dataclass(frozen=True)
class Persist(Message):
    OPCODE = Opcode.PERSIST
    FIELDS = (("key_id", "bytes"), ("handle", "u32"), ("owner_auth", "bytes?"))
    key_id: bytes  # a key LOADed on this connection (from a key file)
    handle: int  # where it goes: 0x81000000 to 0x817FFFFF, free
    owner_auth: bytes = b""  # the owner hierarchy's password; trailing, omitted when empty

    def __repr__(self) -> str:  # never print passwords
        return (f"Persist(key_id={self.key_id.hex()[:16]}, handle=0x{self.handle:08x}, "
                "owner_auth=<hidden>)")


@dataclasses.dataclass(frozen=True)
class PersistResult(Result):
    OPCODE = Opcode.PERSIST
    FIELDS = (("handle", "u32"), ("name", "bytes"))
    handle: int
    name: bytes  # the key's TPM Name (nameAlg ‖ digest of its public area)


@dataclasses.dataclass(frozen=True)
class Evict(Message):
    OPCODE = Opcode.EVICT
    FIELDS = (("handle", "u32"), ("owner_auth", "bytes?"))
    handle: int
    owner_auth: bytes = b""

    def __repr__(self) -> str:
        return f"Evict(handle=0x{self.handle:08x}, owner_auth=<hidden>)"


@dataclasses.dataclass(frozen=True)
class EvictResult(Result):
    OPCODE = Opcode.EVICT


@dataclasses.dataclass(frozen=True)
class KeysRequest(Message):
    OPCODE = Opcode.KEYS


@dataclasses.dataclass(frozen=True)
class KeysResult(Result):
    OPCODE = Opcode.KEYS
    FIELDS = (("json", "str"),)
    json: str  # {"persistent": [...], "loaded": [...]} (docs/broker.md, Persistent keys)


def check_owner_handle(handle: int) -> None:
    """BadKeyError unless `handle` is an owner persistent handle."""
    if not OWNER_PERSISTENT_FIRST <= handle <= 0x81FFFFFF:
        raise BadKeyError(f"0x{handle:08x} is not a persistent handle (0x81000000 to "
                          "0x817FFFFF)")
    if handle > OWNER_PERSISTENT_LAST:
        raise BadKeyError(f"0x{handle:08x} is in the platform's persistent range "
                          "(0x81800000 and up): the owner cannot change it")


def _admin(request: Request, what: str) -> None:
    if not request.peer_is_admin:
        raise PermissionDeniedError(
            f"uid {request.peer_uid} may not {what}: persistent handles are the broker "
            "administrators' (root, the broker's uid, --admin-uid, --admin-gid)")


def serve_persist(request: Request, msg: Persist) -> None:
    _admin(request, f"persist keys (0x{msg.handle:08x})")
    check_owner_handle(msg.handle)
    request.key_auth(msg.key_id)  # loaded on this connection, and the key policy admits it
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    key_id, handle, owner_auth = msg.key_id, msg.handle, msg.owner_auth

    def persisted(name: bytes) -> PersistResult:
        request.audit("key_persisted", handle=f"0x{handle:08x}", key=key_id.hex()[:16])
        return PersistResult(handle, name)

    request.submit(lambda: worker.persist(key_id, handle, deadline, owner_auth=owner_auth,
                                          peer=peer), persisted)


def serve_evict(request: Request, msg: Evict) -> None:
    _admin(request, f"evict persistent handles (0x{msg.handle:08x})")
    check_owner_handle(msg.handle)
    worker, deadline, handle, owner_auth = (request.worker, request.deadline, msg.handle,
                                            msg.owner_auth)

    def evicted(_: Any) -> EvictResult:
        request.audit("key_evicted", handle=f"0x{handle:08x}")
        return EvictResult()

    request.submit(lambda: worker.evict(handle, deadline, owner_auth=owner_auth), evicted)


def serve_keys(request: Request, msg: KeysRequest) -> None:
    def listed(tpm: dict[str, Any]) -> KeysResult:
        holders = request.key_holders()
        for key in tpm["loaded"]:
            held = holders.get(key["key_id"], [])
            key["connections"] = len(held)
            if request.peer_is_admin:  # who holds a key: the administrators' business
                key["uids"] = sorted(set(held))
        return KeysResult(json.dumps(tpm, sort_keys=True))

    request.submit(lambda: request.worker.keys(request.deadline), listed)
