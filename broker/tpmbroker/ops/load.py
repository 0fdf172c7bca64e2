"""LOAD: make a key known to this connection (and resident in the TPM)."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Load(Message):
    OPCODE = Opcode.LOAD
    FIELDS = (("source", "u8"), ("key", "bytes"), ("auth", "bytes"),
              ("parent_auth", "bytes?"))
    source: int
    key: bytes
    auth: bytes = b""
    parent_auth: bytes = b""  # the parent's password; trailing, omitted when empty

    def __repr__(self) -> str:  # never print passwords
        return (f"Load(source={self.source}, key=<{len(self.key)} bytes>, auth=<hidden>, "
                "parent_auth=<hidden>)")


@dataclasses.dataclass(frozen=True)
class LoadResult(Result):
    OPCODE = Opcode.LOAD
    FIELDS = (("key_id", "bytes"), ("key_type", "u8"), ("bits", "u16"), ("curve", "u16"),
              ("public_key", "bytes"))
    key_id: bytes
    key_type: int
    bits: int
    curve: int
    public_key: bytes
