"""GENERATE: a new key made inside the TPM, returned as a TSS2 PRIVATE KEY."""

from __future__ import annotations

import dataclasses

from ..definitions import KeyType, Opcode
from ..protocol import Message, Result
from .base import Request, member


@dataclasses.dataclass(frozen=True)
class Generate(Message):
    OPCODE = Opcode.GENERATE
    FIELDS = (("key_type", "u8"), ("param", "u16"), ("auth", "bytes"), ("parent", "u32"),
              ("parent_auth", "bytes?"))
    key_type: int
    param: int  # curve for EC, bits for RSA
    auth: bytes = b""
    parent: int = 0
    parent_auth: bytes = b""  # the parent's password; trailing, omitted when empty

    def __repr__(self) -> str:
        return (f"Generate(key_type={self.key_type}, param={self.param}, auth=<hidden>, "
                f"parent=0x{self.parent:08x}, parent_auth=<hidden>)")


@dataclasses.dataclass(frozen=True)
class GenerateResult(Result):
    OPCODE = Opcode.GENERATE
    FIELDS = (("key", "bytes"), ("public_key", "bytes"))
    key: bytes  # TSS2 PRIVATE KEY, DER
    public_key: bytes  # SubjectPublicKeyInfo, DER


def serve(request: Request, msg: Generate) -> None:
    key_type = member(KeyType, msg.key_type, "key type")
    worker, deadline = request.worker, request.deadline
    request.submit(lambda: worker.generate_key(key_type, msg.param, msg.auth, msg.parent,
                                               deadline, parent_auth=msg.parent_auth,
                                               peer=request.peer_uid),
                   lambda made: GenerateResult(*made))
