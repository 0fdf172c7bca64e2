"""A clean start and an orderly stop, with real swtpm, the real broker and real clients.

- SIGKILL of the broker under load, with an external swtpm (--tcti) and with the embedded
  one: a plain restart, and long-lived provider and Python client processes sign again
  within 2 s of the new broker being ready, with no bad signature.
- SIGTERM under pipelining clients: every request the broker received is answered (OK or
  SHUTTING_DOWN), the exit is prompt, the socket and the embedded swtpm are gone, and the
  TPM's next start is orderly (its lockout counter does not move).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.definitions import Hash, KeySource, KeyType, Scheme, Status
from tpmbroker.keyfile import der_to_pem
from tpmbroker.keyref import KeySpec
from tpmbroker.ops.sign import Sign
from tpmbroker.procedures.generate import generate_key
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign import sign as sign_digest
from tpmbroker.processes import kill_group
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm import TpmWorker
from tpmbroker.tpm.link import Link, owns_tpm_alone

from .tpmfixtures import Broker

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "broker" / "tpmbroker" / "tpmbroker.so"
EMBEDDED_OK = not Path("/dev/tpmrm0").exists() and shutil.which("setpriv") is not None

# A long-lived Python signer: signs every 10 ms, verifies each signature with the public
# key, prints "ok|fail|bad T" (T: time.monotonic(), CLOCK_MONOTONIC like loadgen's).
PY_WATCHER = r"""
import hashlib, sys, time
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpmbroker.client import Client
client = Client(sys.argv[1], timeout=2.0)
pem = open(sys.argv[2], "rb").read()
key = None
n = 0
while True:
    n += 1
    msg = b"watch %d" % n
    try:
        if key is None:
            key = client.load_key(pem)
        sig = client.sign(key, hashlib.sha256(msg).digest())
        try:
            load_der_public_key(key.public_key).verify(sig, msg, ec.ECDSA(hashes.SHA256()))
            state = "ok"
        except Exception:
            state = "bad"
    except Exception:
        state = "fail"
    print(state, "%.6f" % time.monotonic(), flush=True)
    time.sleep(0.01)
"""


# --- helpers ----------------------------------------------------------------------------

class EmbeddedBroker:
    """`tpmbroker serve` without --tcti: it starts and owns its swtpm in the state dir."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "tpmbroker.sock")
        self.state_dir = workdir / "state"
        self.log_path = workdir / "broker.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "TPMBROKER_TCTI"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tpmbroker.cli", "serve", "--socket", self.socket,
                 "--state-dir", str(self.state_dir), *self.extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True)
        wait_ready(self.proc, self.socket, timeout, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def swtpm_pid(self) -> int:
        return int((self.state_dir / "tpm" / "swtpm.pid").read_text().split()[0])

    def stop(self) -> None:
        kill_group(self.proc, timeout=15.0)
        self.proc = None


def wait_ready(proc: subprocess.Popen[bytes], path: str, timeout: float, log: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited {proc.returncode}: {log() if callable(log) else ''}")
        if os.path.exists(path):
            with contextlib.suppress(Exception), Client(path, timeout=2) as client:
                client.hello()
                return
        time.sleep(0.02)
    raise RuntimeError("broker did not come up")


def alive(pid: int) -> bool:
    """A live process (not a zombie) with that pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def make_key(socket_path: str, out: Path, password: bytes | None = None) -> tuple[Path, Path]:
    with Client(socket_path) as client:
        der, spki = client.generate_key(KeyType.EC, 0x0003, password)
    out.write_bytes(der_to_pem(der))
    pub = out.with_suffix(".pub")
    pub.write_bytes(serialization.load_der_public_key(spki).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def lockout_counter(socket_path: str) -> int:
    with Client(socket_path) as client:
        value = client.status()["tpm_lockout_counter"]
    assert isinstance(value, int)
    return value


@contextlib.contextmanager
def signers(socket_path: str, key: Path, pub: Path, tmp: Path) -> Iterator[list[Path]]:
    """Long-lived signers: two through the provider (loadgen watch), two Python clients.
    Yields the files their lines go to; stops them on the way out."""
    env = dict(os.environ, TPMBROKER_SOCKET=socket_path)
    procs: list[subprocess.Popen[bytes]] = []
    outputs: list[Path] = []
    loadgen = tmp / "loadgen"
    use_provider = MODULE.exists() and shutil.which("gcc") is not None
    if use_provider:
        subprocess.run(["gcc", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(loadgen),
                        str(ROOT / "benchmarks" / "loadgen.c"), "-lcrypto", "-lpthread"],
                       check=True, capture_output=True)
    try:
        for i in range(4):
            out = tmp / f"signer{i}.out"
            outputs.append(out)
            if i < 2 and use_provider:
                cmd = [str(loadgen), "watch", str(MODULE.parent), str(key), str(pub)]
            else:
                cmd = [sys.executable, "-c", PY_WATCHER, socket_path, str(key)]
            with open(out, "wb") as f:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=f,
                                              stderr=subprocess.DEVNULL, env=env))
        yield outputs
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # loadgen watch ends when its stdin closes
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def lines(path: Path) -> list[tuple[str, float]]:
    out = []
    for line in path.read_text().splitlines():
        state, _, t = line.partition(" ")
        with contextlib.suppress(ValueError):
            out.append((state, float(t)))
    return out


def wait_for_ok(outputs: list[Path], after: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(any(s == "ok" and t > after for s, t in lines(o)) for o in outputs):
            return
        time.sleep(0.05)
    raise AssertionError("signers did not sign: " + " | ".join(
        o.read_text()[-200:] for o in outputs))


# --- a clean start ------------------------------------------------------------------------

def test_only_a_tpm_without_resource_manager_is_owned_alone() -> None:
    for tcti in ("swtpm:host=127.0.0.1,port=2321", "mssim:host=localhost,port=2321",
                 "device:/dev/tpm0", "device:path=/dev/tpm1"):
        assert owns_tpm_alone(tcti), tcti
    for tcti in ("device:/dev/tpmrm0", "device:path=/dev/tpmrm0", "device",
                 "tabrmd:bus_name=com.intel.tss2.Tabrmd", "tabrmd", "libtpms", ""):
        assert not owns_tpm_alone(tcti), tcti


def test_leftovers_of_a_dead_client_are_flushed_at_connect(swtpm: Swtpm) -> None:
    # A client that dies leaves a loaded key and sessions (one context-saved) behind.
    dead = TpmWorker(swtpm.tcti)
    deadline = time.monotonic() + 30
    dead.open(deadline)
    der, _ = generate_key(dead, KeyType.EC, 0x0003, b"", 0, deadline)
    info = load_key(dead, KeySource.TSS2_DER, der, deadline)
    sign_digest(dead, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, bytes(32), deadline)
    left = dead.link.leftover_handles()
    assert sum(h >> 24 == 0x80 for h in left) >= 2 and sum(h >> 24 == 0x02 for h in left) >= 2
    dead.link.close()  # gone without flushing anything, as after SIGKILL

    worker = TpmWorker(swtpm.tcti)
    worker.open(time.monotonic() + 30)
    try:
        ours = set(worker.pool.tpm_handles()) | set(worker.objects.held_handles())
        assert set(worker.link.leftover_handles()) == ours  # nothing of the dead one
        load_key(worker, KeySource.TSS2_DER, der, time.monotonic() + 30)
    finally:
        worker.close()


def test_broker_restarted_after_sigkill_on_swtpm_serves(swtpm: Swtpm, tmp_path: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "b1").start()
    try:
        key, _ = make_key(broker.socket, tmp_path / "k.pem")
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            client.sign(loaded, hashlib.sha256(b"x").digest())
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait()
        broker.start()  # before the clean start: 0x902 on every LOAD, forever
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            assert client.sign(loaded, hashlib.sha256(b"x").digest())
        assert "clean start: flushed" in broker.log()
    finally:
        broker.stop()


def test_a_worker_stop_is_orderly_and_does_not_count_toward_lockout(swtpm: Swtpm) -> None:
    """The arithmetic behind the orderly stop: after a DA-protected key was used, a TPM
    start without TPM2_Shutdown before it adds 1 to the lockout counter; with it, 0."""
    def use_then_power_cycle(orderly: bool) -> int:
        worker = TpmWorker(swtpm.tcti)
        deadline = time.monotonic() + 30
        worker.open(deadline)
        der, _ = generate_key(worker, KeyType.EC, 0x0003, b"pw", 0, deadline)  # DA-protected
        info = load_key(worker, KeySource.TSS2_DER, der, deadline)
        sign_digest(worker, info.key_id, b"pw", Scheme.ECDSA, Hash.SHA256, bytes(32), deadline)
        worker.link.owns_tpm = orderly  # a broker behind a resource manager sends no Shutdown
        worker.close()
        swtpm.restart()  # swtpm killed and started again: a TPM power cycle
        link = Link(swtpm.tcti)
        link.connect(time.monotonic() + 10)
        try:
            _, data = link.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES,
                                               TPM2_PT.LOCKOUT_COUNTER, 1)
            return int(data.data.tpmProperties[0].value)
        finally:
            link.close()

    assert use_then_power_cycle(orderly=True) == 0
    assert use_then_power_cycle(orderly=False) == 1  # the same without Shutdown(STATE)


# --- SIGKILL under load, then a plain restart ---------------------------------------------

@pytest.mark.parametrize("mode", ["external", "embedded"])
def test_sigkill_under_load_then_restart_signs_again_within_2s(
        mode: str, tmp_path: Path) -> None:
    if mode == "embedded" and not EMBEDDED_OK:
        pytest.skip("needs no /dev/tpmrm0 and setpriv for the embedded swtpm")
    tpm: Swtpm | None = None
    if mode == "external":
        tpm = Swtpm(tmp_path / "tpmstate").start()
        broker: Broker | EmbeddedBroker = Broker(tpm.tcti, tmp_path / "broker")
    else:
        broker = EmbeddedBroker(tmp_path / "broker")
    try:
        broker.start()
        key, pub = make_key(broker.socket, tmp_path / "k.pem")
        swtpm_pid = broker.swtpm_pid() if isinstance(broker, EmbeddedBroker) else None
        with signers(broker.socket, key, pub, tmp_path) as outputs:
            wait_for_ok(outputs, 0.0)
            time.sleep(0.5)  # under load
            assert broker.proc is not None
            killed_at = time.monotonic()
            os.kill(broker.proc.pid, signal.SIGKILL)  # the broker alone, not its group
            broker.proc.wait()
            if swtpm_pid is not None:  # the embedded swtpm dies with its broker
                end = time.monotonic() + 5
                while alive(swtpm_pid) and time.monotonic() < end:
                    time.sleep(0.02)
                assert not alive(swtpm_pid)
            time.sleep(0.5)  # the signers fail meanwhile
            broker.start()  # a plain restart, no manual step
            ready_at = time.monotonic()
            wait_for_ok(outputs, ready_at, timeout=10)
            time.sleep(0.3)
        for out in outputs:
            seen = lines(out)
            assert not [t for s, t in seen if s == "bad"], f"bad signature in {out.name}"
            first_ok = min(t for s, t in seen if s == "ok" and t > killed_at)
            assert first_ok - ready_at < 2.0, (out.name, first_ok - ready_at)
            # The signers may fail while no broker is there, or wait for its successor
            # (the client waits RESTART_GRACE for a broker it reached before).
        assert "clean start: flushed" in broker.log() or mode == "embedded"
    finally:
        broker.stop()
        if tpm is not None:
            tpm.stop()


# --- SIGTERM under pipelining clients -------------------------------------------------------

def _read_answers(sock: socket.socket, deadline: float) -> dict[int, int]:
    """request id -> status, until the broker closes the connection."""
    answers: dict[int, int] = {}
    reader = p.FrameReader()
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        for header, body in reader.feed(data):
            assert header.request_id not in answers, "two answers to one request"
            answers[header.request_id] = int.from_bytes(body[:2], "big")
    return answers


@pytest.mark.parametrize("mode", ["external", "embedded"])
def test_sigterm_answers_every_pipelined_request_and_stops_in_order(
        mode: str, tmp_path: Path) -> None:
    if mode == "embedded" and not EMBEDDED_OK:
        pytest.skip("needs no /dev/tpmrm0 and setpriv for the embedded swtpm")
    drain = ("--drain-timeout", "0.3")
    tpm: Swtpm | None = None
    if mode == "external":
        tpm = Swtpm(tmp_path / "tpmstate").start()
        broker: Broker | EmbeddedBroker = Broker(tpm.tcti, tmp_path / "broker", extra_args=drain)
    else:
        broker = EmbeddedBroker(tmp_path / "broker", *drain)
    try:
        broker.start()
        # A password makes the key DA-protected whatever keygen's defaults: its use then
        # makes a non-orderly TPM restart count toward the lockout.
        key, _ = make_key(broker.socket, tmp_path / "k.pem", b"pw")
        spec = KeySpec.from_any(str(key), b"pw")
        conns = []
        sent = 0
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(broker.socket)
            sock.sendall(p.encode_request(1, spec.load_request(), 30_000))
            answer = _read_one(sock)
            assert answer == Status.OK, answer
            key_id = spec.key_id
            frames = b"".join(
                p.encode_request(i, Sign(key_id, Scheme.ECDSA, Hash.SHA256,
                                             hashlib.sha256(b"%d" % i).digest()), 30_000)
                for i in range(2, 2 + 64))
            conns.append(sock)
            sent += 64
            sock.sendall(frames)
        swtpm_pid = broker.swtpm_pid() if isinstance(broker, EmbeddedBroker) else None
        assert broker.proc is not None
        t0 = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        answers = [_read_answers(sock, time.monotonic() + 20) for sock in conns]
        exit_code = broker.proc.wait(timeout=20)
        took = time.monotonic() - t0
        for sock in conns:
            sock.close()
        statuses = [s for a in answers for s in a.values()]
        assert all(set(a) == set(range(2, 66)) for a in answers), [len(a) for a in answers]
        assert set(statuses) <= {Status.OK, Status.SHUTTING_DOWN}, set(statuses)
        print(f"{mode}: {statuses.count(Status.OK)} OK, "
              f"{statuses.count(Status.SHUTTING_DOWN)} SHUTTING_DOWN, exit in {took:.2f} s")
        assert statuses.count(Status.OK) > 0 and len(statuses) == sent
        assert exit_code == 0, broker.log()
        assert took < 10, took
        assert not os.path.exists(broker.socket)
        if swtpm_pid is not None:
            assert not alive(swtpm_pid)
        assert "TPM2_Shutdown(STATE)" in broker.log()
        # The next start is orderly: the DA-protected use does not count.
        if tpm is not None:
            tpm.restart()  # and the TPM power-cycled on top
        broker.start()
        assert lockout_counter(broker.socket) == 0
    finally:
        broker.stop()
        if tpm is not None:
            tpm.stop()


def _read_one(sock: socket.socket) -> int:
    reader = p.FrameReader()
    sock.settimeout(30)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed"
        frames = reader.feed(data)
        if frames:
            _header, body = frames[0]
            return int.from_bytes(body[:2], "big")
