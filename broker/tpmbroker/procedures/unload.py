"""UNLOAD, the broker's half: the connection forgets a key (the TPM keeps it resident
for other connections; residency is the worker's)."""

from __future__ import annotations

from ..definitions import Opcode
from ..ops.unload import Unload, UnloadResult
from .base import Request, serves


@serves(Opcode.UNLOAD)
def serve(request: Request, msg: Unload) -> None:
    request.forget_key(msg.key_id)
    request.reply(UnloadResult())
