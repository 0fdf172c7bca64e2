"""Fixtures: every test gets real parts (swtpm, tpm2-abrmd), started fresh and always stopped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd, Broker, running_swtpm

# The suite must never load the provider into its own process through a system-wide config,
# nor talk to a broker of the machine's.
os.environ.pop("OPENSSL_CONF", None)
os.environ.pop("TPMBROKER_SOCKET", None)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh simulated TPM with its own state directory and loopback ports."""
    with running_swtpm(tmp_path / "tpmstate") as tpm:
        yield tpm


@pytest.fixture
def abrmd(swtpm: Swtpm, tmp_path: Path) -> Iterator[Abrmd]:
    """tpm2-abrmd in front of the test's swtpm, on a private D-Bus."""
    rm = Abrmd(swtpm, tmp_path / "abrmd")
    rm.start()
    try:
        yield rm
    finally:
        rm.stop()


@pytest.fixture
def broker(swtpm: Swtpm, tmp_path: Path) -> Iterator[Broker]:
    """The real broker, as a subprocess, on the test's swtpm and a private socket."""
    b = Broker(swtpm.tcti, tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()
