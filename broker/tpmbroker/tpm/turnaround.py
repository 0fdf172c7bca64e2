"""Turn-around: the host's time between the TPM's answer and the next command leaving
for the TPM, while work was waiting. It is what the broker costs a busy TPM: for that
long the TPM sits idle though it could have been working. Recorded per TPM command (the
one that went out next), as a histogram STATUS shows (`tpm_turnaround`).

Both paths to the TPM report here: the link's transports (the worker thread) and the
lane (the event loop). The link has one owner at a time, so the two never interleave.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from tpm2_pytss.constants import TPM2_CC

# Bucket upper bounds in microseconds; a last bucket holds everything longer.
BOUNDS_US = (10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000)


def _nothing_waiting() -> bool:
    return False


class TurnAround:
    def __init__(self) -> None:
        # Set by the server: is more TPM work ready to go (queued, or prepared by the
        # lane) right now?
        self.waiting: Callable[[], bool] = _nothing_waiting
        self._answered_at: float | None = None
        self._counts: dict[int, list[int]] = {}  # TPM command code -> count per bucket

    def answered(self, now: float | None = None) -> None:
        """The TPM's answer has arrived."""
        self._answered_at = (time.monotonic() if now is None else now) if self.waiting() \
            else None

    def sent(self, command: bytes | bytearray, now: float | None = None) -> None:
        """`command` (a TPM command, header first) leaves for the TPM."""
        answered_at, self._answered_at = self._answered_at, None
        if answered_at is None or len(command) < 10:
            return
        gap_us = ((time.monotonic() if now is None else now) - answered_at) * 1e6
        code = int.from_bytes(command[6:10], "big")
        counts = self._counts.get(code)
        if counts is None:
            counts = self._counts[code] = [0] * (len(BOUNDS_US) + 1)
        counts[bisect.bisect_left(BOUNDS_US, gap_us)] += 1

    def status(self) -> dict[str, object]:
        """{TPM command name: {"count": n, "buckets_us": {bound: n, ..., "inf": n}}}."""
        labels = [*map(str, BOUNDS_US), "inf"]
        return {_command_name(code): {"count": sum(counts),
                                      "buckets_us": dict(zip(labels, counts, strict=True))}
                for code, counts in sorted(self._counts.items())}


def _command_name(code: int) -> str:
    """TPM2_Sign and the like."""
    try:
        return "TPM2_" + str(TPM2_CC.to_string(code)).split(".")[-1]
    except ValueError:
        return f"0x{code:08x}"
