"""Fixtures: every test gets real parts (swtpm, tpm2-abrmd), started fresh and always stopped."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd, Broker, CertifiedTpm, DbusDaemon, running_swtpm

# The suite must never load the provider into its own process through a system-wide config,
# nor talk to a broker of the machine's.
os.environ.pop("OPENSSL_CONF", None)
os.environ.pop("TPMBROKER_SOCKET", None)
os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh simulated TPM with its own state directory and loopback ports."""
    with running_swtpm(tmp_path / "tpmstate") as tpm:
        yield tpm


@pytest.fixture(scope="session")
def certified_tpm(tmp_path_factory: pytest.TempPathFactory) -> CertifiedTpm:
    """A TPM state with EK certificates and the anchors they chain to, made once."""
    return CertifiedTpm(tmp_path_factory.mktemp("certified-tpm"))


@pytest.fixture
def certified_swtpm(certified_tpm: CertifiedTpm, tmp_path: Path) -> Iterator[Swtpm]:
    """A simulated TPM with EK certificates (certified_tpm.anchors), a copy of its own."""
    with running_swtpm(certified_tpm.copy(tmp_path / "certified-tpmstate")) as tpm:
        yield tpm


@pytest.fixture(scope="session")
def session_bus() -> Iterator[DbusDaemon]:
    """One private D-Bus for the run; this process and its children talk to it."""
    bus = DbusDaemon()
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def abrmd(swtpm: Swtpm, session_bus: DbusDaemon, tmp_path: Path) -> Iterator[Abrmd]:
    """tpm2-abrmd in front of the test's swtpm (generous limits: several TPM users)."""
    rm = Abrmd(swtpm.tcti, tmp_path / "abrmd", session_bus, max_connections=100)
    rm.start()
    try:
        yield rm
    finally:
        rm.stop()


@pytest.fixture
def broker(swtpm: Swtpm, tmp_path: Path) -> Iterator[Broker]:
    """The real broker, as a subprocess, on the test's swtpm and a private socket."""
    with Broker(swtpm.tcti, tmp_path / "broker") as b:
        yield b


@pytest.fixture
def abrmd_broker(abrmd: Abrmd, tmp_path: Path) -> Iterator[Broker]:
    """The real broker on the test's tpm2-abrmd, so other TPM users can share the TPM."""
    with Broker(abrmd.tcti, tmp_path / "broker", env=abrmd.env()) as b:
        yield b


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory www-data can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="tpmbroker-world-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
