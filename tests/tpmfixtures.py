"""Real TPM parts for tests: swtpm on free loopback ports, tpm2-abrmd on a private D-Bus."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tpmbroker.simulator import Swtpm


class SessionBus:
    """A private dbus-daemon. GLib keeps one session-bus connection per process for
    good, so a test run uses one bus for all its tpm2-abrmd instances."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().decode().strip()
        if not self.address:
            self.stop()
            raise RuntimeError("dbus-daemon gave no address")

    def stop(self) -> None:
        _kill_group(self.proc)


def _kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Abrmd:
    """tpm2-abrmd in front of a swtpm, under a bus name of its own."""

    _serial = 0

    def __init__(self, tpm: Swtpm, workdir: Path, bus: SessionBus, max_sessions: int = 4,
                 max_connections: int = 27) -> None:
        Abrmd._serial += 1
        self.tpm = tpm
        self.workdir = workdir
        self.bus_address = bus.address
        self.max_sessions = max_sessions
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self.bus_name = f"com.intel.tss2.Tabrmd.t{os.getpid()}n{Abrmd._serial}"

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    def env(self) -> dict[str, str]:
        """Environment for a process that should reach this abrmd."""
        return dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus_address)

    def start(self) -> Abrmd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self.env()
        with open(self.workdir / "abrmd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["tpm2-abrmd", "--session", "--allow-root", f"--dbus-name={self.bus_name}",
                 f"--tcti={self.tpm.tcti}", "--flush-all",
                 f"--max-sessions={self.max_sessions}",
                 f"--max-connections={self.max_connections}"],
                env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
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

    def stop(self) -> None:
        _kill_group(self.proc)
        self.proc = None


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


class Broker:
    """`tpmbroker serve` as a real subprocess on a private socket."""

    def __init__(self, tcti: str, workdir: Path, sessions: int = 2,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.tcti = tcti
        self.workdir = workdir
        self.sessions = sessions
        self.extra_args = extra_args
        self.env = env
        self.socket = str(workdir / "tpmbroker.sock")
        self.log_path = workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Broker:
        from tpmbroker.client import Client

        self.workdir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).parent / "tpmbroker"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "serve", "--socket", self.socket, "--tcti", self.tcti,
                 "--sessions", str(self.sessions), "--log-level", "debug", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode}: {self.log()}")
            if os.path.exists(self.socket):
                with contextlib.suppress(Exception), Client(self.socket, timeout=2) as client:
                    client.hello()
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not come up: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
