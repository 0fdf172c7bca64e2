"""Real TPM parts for tests: swtpm on free loopback ports, tpm2-abrmd on a private D-Bus,
the broker as a subprocess (the last two are the benchmark's too: tpmbroker.processes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tpmbroker.processes import Abrmd, DbusDaemon
from tpmbroker.processes import BrokerProcess as Broker
from tpmbroker.simulator import Swtpm

__all__ = ["Abrmd", "Broker", "BrokerEnv", "DbusDaemon", "active_sessions", "have",
           "raise_max_tries", "running_swtpm", "swtpm_broker"]


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


def raise_max_tries(tpm: Swtpm, max_tries: int = 32) -> None:
    """Give swtpm more dictionary-attack tries than its 3, for tests that are about
    something else than the lockout yet try a wrong password or two: with 3, the broker's
    shield (tpm/lockout.py) lets no untried password through after one wrong one.
    swtpm's lockout authorization is empty; the broker must not be running yet."""
    from tpm2_pytss import ESAPI

    with ESAPI(tpm.tcti) as ectx:
        ectx.dictionary_attack_parameters(max_tries, 1000, 1000)


class BrokerEnv:
    """A broker and a directory, with the openssl CLI pointed at that broker."""

    def __init__(self, broker: Broker, base: Path) -> None:
        self.broker = broker
        self.dir = base
        self.environ = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)

    def openssl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(["openssl", *args], capture_output=True, env=self.environ,
                             timeout=180)
        if check:
            assert res.returncode == 0, res.stderr.decode()
        return res


@contextlib.contextmanager
def swtpm_broker(base: Path) -> Iterator[Broker]:
    """A swtpm of its own under `base`, and a broker on it."""
    with running_swtpm(base / "tpm") as tpm:
        broker = Broker(tpm.tcti, base / "broker").start()
        try:
            yield broker
        finally:
            broker.stop()


@contextlib.contextmanager
def active_sessions(socket: str, interval: float = 0.02) -> Iterator[list[int]]:
    """The TPM's count of active sessions (the broker's STATUS), read every `interval`
    while the block runs; the list fills as it goes."""
    from tpmbroker.client import Client

    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with Client(socket) as client:
            while not stop.is_set():
                value = client.status()["tpm_active_sessions"]
                assert isinstance(value, int)
                seen.append(value)
                stop.wait(interval)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()
