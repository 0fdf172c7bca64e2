"""What the benchmark measures processes with: CPU time and resident memory.

The processes themselves (D-Bus, tpm2-abrmd, the broker) are in tpmbroker.processes.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds; None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS), 0.0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


class CpuMeter:
    """Samples a process's CPU time in the background so any window can be measured later."""

    def __init__(self, pid: int | None, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-meter")

    def __enter__(self) -> CpuMeter:
        if self.pid is not None:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.pid is not None:
            self._sample()

    def _sample(self) -> None:
        assert self.pid is not None
        cpu = process_cpu_seconds(self.pid)
        if cpu is not None:
            self.samples.append((time.monotonic(), cpu))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _at(self, t: float) -> float:
        samples = self.samples
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return samples[-1][1]

    def utilization(self, start: float, end: float) -> float | None:
        """CPU seconds the process used in [start, end] (monotonic) over end - start."""
        if self.pid is None or len(self.samples) < 2 or end <= start:
            return None
        return (self._at(end) - self._at(start)) / (end - start)
