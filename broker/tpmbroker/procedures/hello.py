"""HELLO, the broker's half: the versions both sides speak."""

from __future__ import annotations

from ..definitions import MAX_FRAME, VERSION, Opcode
from ..errors import UnsupportedVersionError
from ..ops.hello import Hello, HelloResult
from ..version import __version__
from .base import Request, serves


@serves(Opcode.HELLO)
def serve(request: Request, msg: Hello) -> None:
    if msg.max_version < VERSION:
        raise UnsupportedVersionError(f"client speaks up to version {msg.max_version}; "
                                      f"this broker speaks {VERSION}")
    request.reply(HelloResult(VERSION, f"tpmbroker/{__version__}", MAX_FRAME))
