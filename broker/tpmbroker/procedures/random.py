"""RANDOM, the broker's half: TPM2_GetRandom through a pool session with ENCRYPT, so
the bytes cross the TPM's bus encrypted."""

from __future__ import annotations

import functools

from ..definitions import MAX_RANDOM, Opcode
from ..errors import TpmError, UnsupportedError
from ..ops.random import Random, RandomResult
from ..tpm import command
from ..tpm.worker import TpmWorker
from .base import Request, serves


@serves(Opcode.RANDOM)
def serve(request: Request, msg: Random) -> None:
    if msg.count > MAX_RANDOM:
        raise UnsupportedError(f"at most {MAX_RANDOM} random bytes per request, "
                               f"not {msg.count}; ask several times")
    if msg.count == 0:
        request.reply(RandomResult(b""))
        return
    worker, deadline = request.worker, request.deadline

    def served(random_bytes: bytes) -> RandomResult:
        request.count("random_bytes", len(random_bytes))
        return RandomResult(random_bytes)

    request.submit(lambda: random(worker, msg.count, deadline), served)


def random(tpm: TpmWorker, count: int, deadline: float) -> bytes:
    """`count` bytes from the TPM's random number generator.

    Each TPM2_GetRandom goes through a pool session with ENCRYPT, so the bytes cross
    the TPM's bus encrypted; the TPM gives at most one digest's worth per command
    (TPM2_PT_MAX_DIGEST), so larger counts take several.
    """
    out = bytearray()
    while len(out) < count:
        want = count - len(out)
        chunk = tpm.run(deadline, "reading random bytes",
                        functools.partial(_random_once, tpm, want, deadline))
        if not chunk or len(chunk) > want:
            raise TpmError(f"the TPM returned {len(chunk)} random bytes for {want}")
        out += chunk
    return bytes(out)


def _random_once(tpm: TpmWorker, want: int, deadline: float) -> bytes:
    return tpm.execute(deadline, lambda session: command.prepare_get_random(
        session, want), command.sized_result)
