"""The embedded TPM: a swtpm process on loopback, owned by whoever starts it.

The broker's embedded swtpm dies with the broker (`die_with_parent`: the kernel sends it
SIGTERM when its parent goes, even by SIGKILL) and writes its pid next to its state. A
swtpm still holding the state directory when a new one starts (an orphan: its broker is
gone) is ended first, after a TPM2_Shutdown(STATE) so that the end is orderly and does
not count toward the TPM's dictionary-attack lockout. One that still has a live parent
is someone's TPM, and is left alone with a clear error.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .errors import TpmUnavailableError

log = logging.getLogger("tpmbroker.simulator")

# TPM2_Shutdown(TPM_SU_STATE) as swtpm's command port takes it (TPM_SEND_COMMAND,
# locality 0, length, then the command).
_SHUTDOWN_STATE = bytes.fromhex("80010000000c000001450001")
_SHUTDOWN_FRAME = struct.pack(">IBI", 8, 0, len(_SHUTDOWN_STATE)) + _SHUTDOWN_STATE


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
                 host: str = "127.0.0.1", die_with_parent: bool = False) -> None:
        # Absolute: another swtpm on a relative path of the same name elsewhere is not ours.
        self.state_dir = Path(state_dir).absolute()
        self.host = host
        self.port = port or 0
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "swtpm.log"
        self.pid_path = self.state_dir / "swtpm.pid"

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
        end_orphan(self.state_dir)
        prefix: list[str] = []
        if self.die_with_parent:
            setpriv = shutil.which("setpriv")  # util-linux; no preexec_fn in a threaded process
            if setpriv is None:
                raise TpmUnavailableError("setpriv (util-linux) is needed to tie the embedded "
                                          "swtpm's life to the broker's")
            prefix = [setpriv, "--pdeathsig", "TERM", "--"]
        last_error = ""
        for _attempt in range(5):
            port = self.port or free_port_pair(self.host)
            cmd = [
                *prefix, binary, "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={port},bindaddr={self.host}",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr={self.host}",
                "--flags", "not-need-init,startup-clear",
                "--pid", f"file={self.pid_path}",
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
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

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


# --- EK certificates -----------------------------------------------------------------------

# What swtpm_localca names its root and the intermediate that signs EK certificates.
_LOCAL_CA_CERTS = ("issuercert.pem", "swtpm-localca-rootca-cert.pem")


def local_ca_root(ca_dir: Path) -> Path:
    """The certificates of a local EK CA swtpm_localca made in `ca_dir` (its signing
    intermediate, then its root: the TPM holds only the EK certificate), one PEM file:
    the trust anchors for the EK certificates it signed."""
    return ca_dir / "ek-anchors.pem"


def provision(state_dir: Path, ca_dir: Path, timeout: float = 120.0) -> Path:
    """Manufacture a new swtpm TPM in `state_dir` as a TPM maker would: its EKs (RSA
    2048 and ECC) with certificates in NV, signed by a local CA in `ca_dir` (made on
    first use, and kept: every TPM provisioned with it chains to the same root), and a
    platform certificate. swtpm_setup with swtpm_localca (Debian package swtpm-tools),
    configured privately so that nothing is shared with the machine's own local CA.
    Returns the CA's root certificate, the anchor for `serve --ek-ca`."""
    setup = shutil.which("swtpm_setup")
    localca = shutil.which("swtpm_localca")
    if setup is None or localca is None:
        raise TpmUnavailableError("swtpm_setup and swtpm_localca are needed to give the "
                                  "simulated TPM EK certificates (Debian package: "
                                  "swtpm-tools)")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_conf, options, setup_conf = (ca_dir / "swtpm-localca.conf",
                                    ca_dir / "swtpm-localca.options",
                                    ca_dir / "swtpm_setup.conf")
    ca_conf.write_text(f"statedir = {ca_dir}\n"
                       f"signingkey = {ca_dir}/signkey.pem\n"
                       f"issuercert = {ca_dir}/issuercert.pem\n"
                       f"certserial = {ca_dir}/certserial\n")
    options.write_text("--platform-manufacturer tpmbroker\n--platform-version 2.1\n"
                       "--platform-model swtpm\n")
    setup_conf.write_text(f"create_certs_tool = {localca}\n"
                          f"create_certs_tool_config = {ca_conf}\n"
                          f"create_certs_tool_options = {options}\n"
                          "active_pcr_banks = sha256\n")
    result = subprocess.run(
        [setup, "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert",
         "--create-platform-cert", "--config", str(setup_conf), "--not-overwrite"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    parts = [ca_dir / name for name in _LOCAL_CA_CERTS]
    if result.returncode != 0 or not all(part.exists() for part in parts):
        raise TpmUnavailableError("swtpm_setup could not provision the simulated TPM: "
                                  + (result.stderr or result.stdout).strip()[-800:])
    root = local_ca_root(ca_dir)
    root.write_bytes(b"".join(part.read_bytes() for part in parts))
    return root


def provisioned(state_dir: Path) -> bool:
    """Whether `state_dir` holds a TPM already (made by swtpm or swtpm_setup)."""
    return (state_dir / "tpm2-00.permall").exists()


# --- orphans ------------------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"


def _holds(pid: int, state_dir: Path) -> bool:
    """Whether `pid` is a swtpm on `state_dir` (not another process that got its pid)."""
    args = _cmdline(pid)
    return (any(os.path.basename(a) == "swtpm" for a in args[:4])
            and f"dir={state_dir}" in args)


def holder(state_dir: Path) -> int | None:
    """The pid of a live swtpm on `state_dir`: from its pid file, else from /proc."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / "swtpm.pid").read_text().split()[0])
        if _holds(pid, state_dir):
            return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _holds(int(entry.name), state_dir):
            return int(entry.name)
    return None


def _command_port(pid: int) -> int | None:
    args = _cmdline(pid)
    for flag, value in itertools.pairwise(args):
        if flag == "--server":
            for part in value.split(","):
                key, _, port = part.partition("=")
                if key == "port" and port.isdigit():
                    return int(port)
    return None


def _shutdown_state(host: str, port: int) -> bool:
    """TPM2_Shutdown(STATE) to an swtpm's command port; False if it did not answer OK."""
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.sendall(_SHUTDOWN_FRAME)
            data = b""
            while len(data) < 4 + 10 + 4:
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return len(data) >= 14 and data[10:14] == b"\0\0\0\0"


def end_orphan(state_dir: Path, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    """End a swtpm left on `state_dir` by a broker that is gone; True if there was one.

    It is sent TPM2_Shutdown(STATE) first, so that ending it is an orderly TPM stop.
    A swtpm whose parent still lives is not an orphan: TpmUnavailableError.
    """
    pid = holder(state_dir)
    if pid is None:
        return False
    parent = _parent(pid)
    if parent not in (0, 1, os.getpid()) and any(
            "tpmbroker" in arg for arg in _cmdline(parent)):
        raise TpmUnavailableError(f"the TPM state in {state_dir} is in use by swtpm pid {pid} "
                                  f"of tpmbroker pid {parent}")
    port = _command_port(pid)
    orderly = port is not None and _shutdown_state(host, port)
    log.warning("ending swtpm pid %d left on %s by a broker that is gone (%s)", pid, state_dir,
                "after TPM2_Shutdown(STATE)" if orderly else "not orderly: it did not answer")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and _holds(pid, state_dir):
        time.sleep(0.02)
    if _holds(pid, state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _holds(pid, state_dir) and time.monotonic() < end + timeout:
            time.sleep(0.02)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "swtpm.pid").unlink()
    return True
