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

from tpmbroker.client import Client
from tpmbroker.processes import Abrmd, DbusDaemon
from tpmbroker.processes import BrokerProcess as Broker
from tpmbroker.simulator import Swtpm, provision

OPENSSL = shutil.which("openssl") or "openssl"

__all__ = ["Abrmd", "Broker", "BrokerEnv", "CertifiedTpm", "DbusDaemon", "active_sessions",
           "have", "raise_max_tries", "running_swtpm", "swtpm_broker"]


@contextlib.contextmanager
def running_swtpm(state_dir: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(state_dir)
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


class CertifiedTpm:
    """A TPM state with EK certificates from a local CA (swtpm_setup with swtpm_localca,
    as the embedded simulator is made), provisioned once per test session: swtpm_setup
    makes RSA keys and takes about a second. Tests get copies, each the same TPM (the
    same seeds, the same EKs)."""

    def __init__(self, base: Path) -> None:
        self.state = base / "tpm"
        self.anchors = provision(self.state, base / "ek-ca")

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.state, dest, ignore=shutil.ignore_patterns(
            ".lock", "swtpm.pid", "swtpm.log"))
        return dest


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
    """The test environment: a broker and a directory, with the openssl CLI and the Python
    client pointed at that broker. Test modules subclass it for their own helpers."""

    def __init__(self, broker: Broker, base: Path, *,
                 openssl_conf: str | None = os.devnull) -> None:
        """`openssl_conf` None: the system's openssl.cnf (whose [v3_ca] makes `req -x509`
        certificates CA certificates); by default none, so nothing but the command line
        decides which providers load."""
        self.broker = broker
        self.dir = base
        self.environ = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
        if openssl_conf is not None:
            self.environ["OPENSSL_CONF"] = openssl_conf

    def openssl(self, *args: str, check: bool = True, input: bytes | None = None,
                env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        """openssl ARGS in the directory; with `check`, its failure fails the test with
        openssl's words and the broker's log."""
        res = subprocess.run([OPENSSL, *args], capture_output=True, input=input,
                             env=env or self.environ, timeout=timeout, cwd=self.dir)
        if check and res.returncode != 0:
            raise AssertionError(f"openssl {' '.join(args)} failed:\n"
                                 f"{res.stderr.decode(errors='replace')}\n{self.broker.log()}")
        return res

    def ok(self, *args: str) -> bytes:
        """What a successful openssl ARGS printed."""
        return self.openssl(*args).stdout

    def client(self) -> Client:
        return Client(self.broker.socket)

    def status(self) -> dict[str, object]:
        with self.client() as client:
            return client.status()

    def counter(self, name: str) -> int:
        """One of the broker's STATUS counters (random_bytes, derivations, ...)."""
        value = self.status()[name]
        assert isinstance(value, int)
        return value


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
