"""HELLO: agree on the protocol version; answered by the event loop, no TPM."""

from __future__ import annotations

import dataclasses

from ..definitions import VERSION, Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    OPCODE = Opcode.HELLO
    FIELDS = (("max_version", "u8"), ("client", "str"))
    max_version: int = VERSION
    client: str = ""


@dataclasses.dataclass(frozen=True)
class HelloResult(Result):
    OPCODE = Opcode.HELLO
    FIELDS = (("version", "u8"), ("server", "str"), ("max_frame", "u32"))
    version: int
    server: str
    max_frame: int
