"""Socket activation: the broker on a listening socket that outlives it, as systemd's
tpmbroker.socket holds it (contrib/systemd). While one broker stops and the next
starts, the socket stays: a client that connects meanwhile waits in its backlog and is
served by the next broker, where without it a fresh process finds no socket and fails.
The socket is passed as systemd passes it (descriptor 3, LISTEN_PID, LISTEN_FDS)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tpmbroker.client import Client
from tpmbroker.simulator import Swtpm

from .test_provider import OPENSSL, PROV, TPMBROKER
from .tpmfixtures import Broker

PROCESSES = 4  # loops of one openssl process per signature


@contextlib.contextmanager
def held_socket(path: Path) -> Iterator[socket.socket]:
    """A listening Unix socket at `path`, as systemd makes one for ListenStream=."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(4096)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def test_the_broker_serves_on_the_socket_it_is_given_and_leaves_it(
        swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "held.sock"
    with held_socket(path) as sock:
        broker = Broker(swtpm.tcti, tmp_path / "broker", listening=sock).start()
        try:
            with Client(str(path), timeout=10) as client:
                assert client.hello().version >= 1
        finally:
            broker.stop()
        log = broker.log()
        assert f"listening on {path} (systemd's socket" in log, log
        assert "tpmbroker.sock" not in log  # --socket is not where it listened
        # Its own socket file is not made, and the one it was given is not unlinked.
        assert not (tmp_path / "broker" / "tpmbroker.sock").exists()
        assert path.exists()


@pytest.mark.parametrize("count", ["2", "0"])
def test_a_socket_count_other_than_one_is_refused_clearly(swtpm: Swtpm, tmp_path: Path,
                                                          count: str) -> None:
    path = tmp_path / "held.sock"
    with held_socket(path) as sock:
        env = dict(os.environ, LISTEN_FDS=count)
        # LISTEN_PID is the wrapper's own pid (exec keeps it): it names the broker.
        res = subprocess.run(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", TPMBROKER, "serve", "--tcti",
             swtpm.tcti, "--state-dir", str(tmp_path / "state"), "--socket",
             str(tmp_path / "own.sock")],
            env=env, capture_output=True, text=True, timeout=60, pass_fds=(sock.fileno(),))
    assert res.returncode == 1, res.stderr
    assert f"socket activation passed {count} sockets" in res.stderr
    assert not (tmp_path / "own.sock").exists()


def test_fresh_processes_started_while_the_broker_restarts_all_sign(
        swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "held.sock"
    key_path, data = tmp_path / "k.pem", tmp_path / "data"
    data.write_bytes(b"signed across a restart")
    env = dict(os.environ, TPMBROKER_SOCKET=str(path), OPENSSL_CONF=os.devnull)
    with held_socket(path) as sock:
        first = Broker(swtpm.tcti, tmp_path / "first", listening=sock).start()
        subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256", "-o", str(key_path),
                        "--socket", str(path)], check=True, capture_output=True, timeout=120)
        with Client(str(path), timeout=10) as client:
            public = serialization.load_der_public_key(client.load_key(key_path).public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)

        stop = threading.Event()
        runs: list[tuple[float, int, str]] = []  # (start, exit status, stderr)

        def signer(index: int) -> None:
            n = 0
            while not stop.is_set():
                out = tmp_path / f"sig{index}-{n}"
                started = time.monotonic()
                res = subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", str(key_path),
                                      *PROV, "-out", str(out), str(data)],
                                     env=env, capture_output=True, text=True, timeout=60)
                if res.returncode == 0:
                    public.verify(out.read_bytes(), data.read_bytes(),
                                  ec.ECDSA(hashes.SHA256()))
                runs.append((started, res.returncode, res.stderr))
                n += 1

        threads = [threading.Thread(target=signer, args=(i,)) for i in range(PROCESSES)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            first.stop()  # SIGTERM: it drains and exits; the socket stays with its holder
            # Fresh processes started while no broker runs (systemd's RestartSec=1).
            waiting = [subprocess.Popen([OPENSSL, "dgst", "-sha256", "-sign", str(key_path),
                                         *PROV, "-out", str(tmp_path / f"gap{i}"), str(data)],
                                        env=env, stderr=subprocess.PIPE, text=True)
                       for i in range(PROCESSES)]
            time.sleep(1.0)
            assert all(proc.poll() is None for proc in waiting)  # in the backlog
            second = Broker(swtpm.tcti, tmp_path / "second", listening=sock).start()
            gap = [(proc.wait(60), proc.communicate()[1]) for proc in waiting]
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        second.stop()

    failed = [err for _, status, err in runs if status != 0]
    print(f"{len(runs)} openssl processes across the restart, {len(failed)} failed; "
          f"{len(gap)} started while no broker ran, "
          f"{sum(1 for status, _ in gap if status)} failed")
    assert not failed, failed[:3]
    assert [status for status, _ in gap] == [0] * PROCESSES, gap
    for i in range(PROCESSES):
        public.verify((tmp_path / f"gap{i}").read_bytes(), data.read_bytes(),
                      ec.ECDSA(hashes.SHA256()))
