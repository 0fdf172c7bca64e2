"""LOAD: make a key known to this connection (and resident in the TPM)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..definitions import KeySource, Opcode
from ..protocol import Message, Result
from .base import Request, member


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


def serve(request: Request, msg: Load) -> None:
    source = member(KeySource, msg.source, "key source")
    worker, deadline = request.worker, request.deadline

    def loaded(info: Any) -> LoadResult:
        request.check_key(info.key_id, info.public_key)  # the key policy
        request.remember_key(info.key_id, msg.auth)
        return LoadResult(info.key_id, info.key_type, info.bits, info.curve, info.public_key)

    peer = request.peer_uid
    request.submit(lambda: worker.load_key(source, msg.key, deadline,
                                           parent_auth=msg.parent_auth, peer=peer), loaded)
