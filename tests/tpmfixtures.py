"""Real TPM parts for tests: swtpm on free loopback ports, tpm2-abrmd on a private D-Bus."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tpmbroker.simulator import Swtpm


class Abrmd:
    """tpm2-abrmd in front of a swtpm, on a private session bus of its own."""

    def __init__(self, tpm: Swtpm, workdir: Path, max_sessions: int = 4,
                 max_connections: int = 27) -> None:
        self.tpm = tpm
        self.workdir = workdir
        self.max_sessions = max_sessions
        self.max_connections = max_connections
        self.dbus: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.bus_address = ""
        self.bus_name = f"com.intel.tss2.Tabrmd.t{os.getpid()}x{tpm.port}"

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    def start(self) -> Abrmd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dbus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.dbus.stdout is not None
        self.bus_address = self.dbus.stdout.readline().decode().strip()
        if not self.bus_address:
            self.stop()
            raise RuntimeError("dbus-daemon gave no address")
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus_address)
        with open(self.workdir / "abrmd.log", "wb") as log:
            self.proc = self._spawn(env, log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("tpm2-abrmd exited: "
                                   + (self.workdir / "abrmd.log").read_text(errors="replace"))
            probe = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                 f"string:{self.bus_name}"], env=env, capture_output=True, text=True)
            if "boolean true" in probe.stdout:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("tpm2-abrmd did not claim its bus name")

    def _spawn(self, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["tpm2-abrmd", "--session", "--allow-root", f"--dbus-name={self.bus_name}",
             f"--tcti={self.tpm.tcti}", "--flush-all",
             f"--max-sessions={self.max_sessions}",
             f"--max-connections={self.max_connections}"],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def env(self) -> dict[str, str]:
        """Environment for a process that should reach this abrmd."""
        return dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus_address)

    def stop(self) -> None:
        for proc in (self.proc, self.dbus):
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.proc = self.dbus = None


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
