"""RANDOM: bytes from the TPM's random number generator, encrypted on the TPM's bus."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Random(Message):
    OPCODE = Opcode.RANDOM
    FIELDS = (("count", "u16"),)
    count: int


@dataclasses.dataclass(frozen=True)
class RandomResult(Result):
    OPCODE = Opcode.RANDOM
    FIELDS = (("random", "bytes"),)
    random: bytes

    def __repr__(self) -> str:  # random bytes may become keys: never print them
        return f"RandomResult(random=<{len(self.random)} bytes>)"
