"""RANDOM: bytes from the TPM's random number generator, encrypted on the TPM's bus."""

from __future__ import annotations

import dataclasses

from ..definitions import MAX_RANDOM, Opcode
from ..errors import UnsupportedError
from ..protocol import Message, Result
from .base import Request


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


def serve(request: Request, msg: Random) -> None:
    if msg.count > MAX_RANDOM:
        raise UnsupportedError(f"at most {MAX_RANDOM} random bytes per request, "
                               f"not {msg.count}; ask several times")
    if msg.count == 0:
        request.reply(RandomResult(b""))
        return
    worker, deadline = request.worker, request.deadline

    def served(random: bytes) -> RandomResult:
        request.count("random_bytes", len(random))
        return RandomResult(random)

    request.submit(lambda: worker.random(msg.count, deadline), served)
