"""STATUS: the broker's and the TPM's state as JSON (pool, sessions, counters)."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class StatusRequest(Message):
    OPCODE = Opcode.STATUS


@dataclasses.dataclass(frozen=True)
class StatusResult(Result):
    OPCODE = Opcode.STATUS
    FIELDS = (("json", "str"),)
    json: str
