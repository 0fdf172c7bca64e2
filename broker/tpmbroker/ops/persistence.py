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

from ..definitions import Opcode
from ..errors import BadKeyError
from ..protocol import Message, Result

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
