"""tss2's own messages go through the broker's logger, at debug.

libtss2 writes `ERROR:esys:src/tss2-esys/...` lines straight to file descriptor 2 for
failures the broker expects and answers itself (a key the TPM refuses, object memory
full): bad input flooded the log with them. The broker's stderr becomes a pipe that a
thread reads: tss2's lines are logged to "tpmbroker.tss2" at debug, anything else written
to descriptor 2 by C code at warning to "tpmbroker.stderr". Python's own stderr (logging,
tracebacks) keeps the original descriptor and is not captured.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sys
import threading

_TSS2_LINE = re.compile(r"^(ERROR|WARNING|INFO|DEBUG|TRACE):[a-z_]+:")
_captured = False


def capture_stderr() -> None:
    """Route descriptor 2 through the logger (once per process). Call before logging is
    configured, so that its handler writes to the original stderr."""
    global _captured
    if _captured:
        return
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # A full pipe must not stall the TPM worker inside a tss2 call: drop lines instead.
    flags = fcntl.fcntl(2, fcntl.F_GETFL)
    fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding="utf-8",
                           errors="backslashreplace")
    threading.Thread(target=_pump, args=(read_end,), name="stderr-capture",
                     daemon=True).start()
    _captured = True


def _pump(fd: int) -> None:
    tss2 = logging.getLogger("tpmbroker.tss2")
    other = logging.getLogger("tpmbroker.stderr")
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            try:
                line = raw.decode("utf-8", "backslashreplace").rstrip()
                if not line:
                    continue
                if _TSS2_LINE.match(line):
                    tss2.debug("%s", line)
                else:
                    other.warning("%s", line)
            except Exception:  # the pump must keep draining whatever happens
                continue
