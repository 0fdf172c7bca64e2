"""HELLO: agree on the protocol version; answered by the event loop, no TPM."""

from __future__ import annotations

import dataclasses

from .. import __version__
from ..definitions import MAX_FRAME, VERSION, Opcode
from ..errors import UnsupportedVersionError
from ..protocol import Message, Result
from .base import Request


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


def serve(request: Request, msg: Hello) -> None:
    if msg.max_version < VERSION:
        raise UnsupportedVersionError(f"client speaks up to version {msg.max_version}; "
                                      f"this broker speaks {VERSION}")
    request.reply(HelloResult(VERSION, f"tpmbroker/{__version__}", MAX_FRAME))
