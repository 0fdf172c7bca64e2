"""UNLOAD: this connection forgets a key; the TPM keeps it while others use it."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Unload(Message):
    OPCODE = Opcode.UNLOAD
    FIELDS = (("key_id", "bytes"),)
    key_id: bytes


@dataclasses.dataclass(frozen=True)
class UnloadResult(Result):
    OPCODE = Opcode.UNLOAD
