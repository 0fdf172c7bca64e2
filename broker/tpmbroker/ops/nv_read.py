"""NV_READ: the contents of an NV index, e.g. a certificate a TPM vendor or an operator
stored next to a key (`handle:0x01xxxxxx` in the provider's store)."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result

NV_FIRST = 0x01000000
NV_LAST = 0x01FFFFFF


@dataclasses.dataclass(frozen=True)
class NvRead(Message):
    OPCODE = Opcode.NV_READ
    FIELDS = (("index", "u32"),)
    index: int


@dataclasses.dataclass(frozen=True)
class NvReadResult(Result):
    OPCODE = Opcode.NV_READ
    FIELDS = (("data", "bytes"),)
    data: bytes
