"""Helper processes tpmbroker's benchmark and tests start and always stop: a private
D-Bus, tpm2-abrmd in front of a TPM, the broker itself.

Each runs in a process group of its own so that stopping it (also after Ctrl-C or a
failing test) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

_abrmd_serial = itertools.count(1)


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None,
               timeout: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it if it does not go in time, reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class DbusDaemon:
    """A private session bus. GLib keeps its first session-bus connection for the life of
    the process, so one run uses one bus for every tpm2-abrmd it starts."""

    def __init__(self) -> None:
        if shutil.which("dbus-daemon") is None:
            raise RuntimeError("dbus-daemon is not installed (Debian package: dbus)")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().decode().strip()
        if not self.address:
            self.stop()
            raise RuntimeError("dbus-daemon gave no address")

    def stop(self) -> None:
        kill_group(self.proc)
        self.proc = None


class Abrmd:
    """tpm2-abrmd in front of a TPM, under a bus name of its own on a private bus."""

    def __init__(self, tpm_tcti: str, workdir: Path, bus: DbusDaemon,
                 max_connections: int = 300, max_sessions: int = 4) -> None:
        self.tpm_tcti = tpm_tcti
        self.workdir = workdir
        self.bus_address = bus.address
        self.max_connections = max_connections
        self.max_sessions = max_sessions
        self.bus_name = f"com.intel.tss2.Tabrmd.p{os.getpid()}n{next(_abrmd_serial)}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    def env(self) -> dict[str, str]:
        return dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus_address)

    def start(self, timeout: float = 15.0) -> Abrmd:
        if shutil.which("tpm2-abrmd") is None:
            raise RuntimeError("tpm2-abrmd is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self.env()
        with open(self.workdir / "abrmd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["tpm2-abrmd", "--session", "--allow-root", f"--dbus-name={self.bus_name}",
                 f"--tcti={self.tpm_tcti}", "--flush-all",
                 f"--max-sessions={self.max_sessions}",
                 f"--max-connections={self.max_connections}"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("tpm2-abrmd exited: " + (self.workdir / "abrmd.log")
                                   .read_text(errors="replace")[-2000:])
            probe = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                 f"string:{self.bus_name}"], env=env, capture_output=True, text=True,
                check=False)
            if "boolean true" in probe.stdout:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("tpm2-abrmd did not claim its bus name")

    def stop(self) -> None:
        kill_group(self.proc)
        self.proc = None


# Starts a program as systemd's socket activation does: the listening socket given as
# argv[1] becomes descriptor 3, LISTEN_PID names the program (this very process, which
# exec replaces) and LISTEN_FDS counts one socket.
_SOCKET_ACTIVATION = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                      "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                      "os.execv(sys.argv[2], sys.argv[2:])")


class BrokerProcess:
    """`tpmbroker serve` of this installation as a subprocess on a private socket, or on
    `listening`, a socket that outlives it, passed as systemd's socket activation does."""

    def __init__(self, tcti: str, workdir: Path, sessions: int = 2,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
                 log_level: str = "info", listening: socket.socket | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.tcti = tcti
        self.workdir = workdir
        self.sessions = sessions
        self.env = env
        self.extra_args = extra_args
        self.log_level = log_level
        self.listening = listening
        self.wrapper = wrapper  # a program the broker runs under (a profiler), and its options
        self.socket = (listening.getsockname() if listening is not None
                       else str(workdir / "tpmbroker.sock"))
        self.log_path = workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        from .client import Client

        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.listening is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
        # A state directory of its own: an EK pin in the machine's would apply otherwise.
        cmd = [*self.wrapper, sys.executable, "-m", "tpmbroker.cli", "serve",
               "--socket", self.socket, "--tcti", self.tcti, "--sessions", str(self.sessions),
               "--state-dir", str(self.workdir / "state"),
               "--log-level", self.log_level, *self.extra_args]
        passed: tuple[int, ...] = ()
        if self.listening is not None:
            passed = (self.listening.fileno(),)
            cmd = [sys.executable, "-c", _SOCKET_ACTIVATION, str(passed[0]), *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, start_new_session=True,
                                         pass_fds=passed)
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
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, timeout=15.0)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
