"""The embedded TPM: a swtpm process on loopback, owned by whoever starts it."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .errors import TpmUnavailableError


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P+1 were both free a moment ago (swtpm needs two).

    Chosen below the kernel's ephemeral range, where the local ends of outgoing
    connections (thousands in TIME_WAIT after a busy run) never sit.
    """
    low, _high = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low - 2)
        try:
            for candidate in (port, port + 1):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, candidate))
        except OSError:
            continue
        return port
    raise OSError("no free pair of loopback ports")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class Swtpm:
    """swtpm listening on 127.0.0.1:port (commands) and port+1 (control).

    State lives in `state_dir`; start() waits until the TPM answers, stop() kills the
    process group so nothing survives a failing test.
    """

    def __init__(self, state_dir: Path | str, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "swtpm.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("swtpm is not running")
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> Swtpm:
        binary = shutil.which("swtpm")
        if binary is None:
            raise TpmUnavailableError("swtpm is not installed (Debian package: swtpm)")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        last_error = ""
        for _attempt in range(5):
            port = self.port or free_port_pair(self.host)
            cmd = [
                binary, "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={port},bindaddr={self.host}",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr={self.host}",
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={self.log_path},level=1",
            ]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
            if self._wait_ready(port, timeout):
                self.port = port
                return self
            last_error = self._reap()
            if self.port:  # a fixed port that failed will not work on retry
                break
        raise TpmUnavailableError(f"swtpm did not start: {last_error.strip() or 'no output'}")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.host, port + 1), timeout=0.5), \
                    socket.create_connection((self.host, port), timeout=0.5):
                return True
            time.sleep(0.02)
        return False

    def _reap(self) -> str:
        err = ""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                _, raw = self.proc.communicate(timeout=5)
                err = (raw or b"").decode(errors="replace")
            self.proc = None
        return err

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._reap()

    def restart(self, reset_state: bool = False) -> None:
        """Kill and start again on the same ports: a TPM Reset (Startup CLEAR).

        Sessions, loaded objects and saved contexts are gone; the seeds and NV memory
        (tpm2-00.permall) stay, so keys made before still load. reset_state=True also
        drops any saved volatile state; wiping the seeds would be a different TPM.
        """
        self.stop()
        if reset_state:
            for child in self.state_dir.glob("tpm2-00.volatilestate"):
                child.unlink()
        self.start()

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
