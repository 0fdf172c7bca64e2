"""Real TPM parts for tests: swtpm on free loopback ports, tpm2-abrmd on a private D-Bus,
the broker as a subprocess (the last two are the benchmark's too: tpmbroker.processes)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from tpmbroker.processes import Abrmd, DbusDaemon
from tpmbroker.processes import BrokerProcess as Broker
from tpmbroker.simulator import Swtpm

__all__ = ["Abrmd", "Broker", "DbusDaemon", "have", "running_swtpm"]


@contextlib.contextmanager
def running_swtpm(state_dir: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(state_dir)
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
