"""Restarts nobody notices: a broker restarted (SIGTERM, then a new one, as `systemctl
restart` does) while clients sign, decrypt and generate; what may be repeated is sent
again to the successor within the deadline, a key generation never twice."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tpmbroker.client import Client
from tpmbroker.definitions import REPEATABLE, Opcode
from tpmbroker.simulator import Swtpm

from .test_provider import MODDIR, OPENSSL, PROV, TPMBROKER, loadgen
from .tpmfixtures import Broker

SIGNERS = 16
BURST = 3000  # connections opened at once
__all__ = ["loadgen"]  # the provider's load generator, a fixture


def test_a_restart_under_load_fails_no_signature(swtpm: Swtpm, tmp_path: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        key_path = tmp_path / "k.pem"
        subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256", "-o", str(key_path),
                        "--socket", broker.socket], check=True, capture_output=True,
                       timeout=120)
        client = Client(broker.socket, timeout=20)
        key = client.load_key(key_path)
        public = serialization.load_der_public_key(key.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        stop = threading.Event()
        signed = [0] * SIGNERS
        failures: list[str] = []

        def signer(index: int) -> None:
            n = 0
            while not stop.is_set():
                digest = bytes([index]) + n.to_bytes(31, "big")
                try:
                    signature = client.sign(key, digest)
                except Exception as exc:  # every failure is one a user would see
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
                signed[index] += 1
                n += 1

        threads = [threading.Thread(target=signer, args=(i,)) for i in range(SIGNERS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            before = sum(signed)
            broker.stop()  # SIGTERM: in-flight requests served or answered SHUTTING_DOWN
            broker.start()  # the successor, on the same socket
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        print(f"{SIGNERS} signers: {before} signatures before the restart, "
              f"{sum(signed)} in all, {len(failures)} failures")
        assert not failures, failures[:5]
        assert sum(signed) > before + SIGNERS  # every signer went on after the restart
        client.close()
    finally:
        broker.stop()


def test_what_is_never_sent_twice() -> None:
    """A key generation, an import, a persist or an evict may have been done when the
    connection went: the client reports the loss instead of doing it again."""
    for opcode in (Opcode.GENERATE, Opcode.IMPORT, Opcode.PERSIST, Opcode.EVICT):
        assert opcode not in REPEATABLE
    for opcode in (Opcode.SIGN, Opcode.SIGN_MESSAGE, Opcode.DECRYPT, Opcode.DERIVE,
                   Opcode.RANDOM, Opcode.LOAD):
        assert opcode in REPEATABLE


def test_a_restart_under_load_fails_no_provider_signature(
        swtpm: Swtpm, tmp_path: Path, loadgen: Path) -> None:
    """The provider (C threads of one process, as nginx workers sign) across a SIGTERM
    restart of the broker: every signature made and verified, none failed."""
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
        subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256", "-o", str(key), "--socket",
                        broker.socket], check=True, capture_output=True, timeout=120)
        penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)
        subprocess.run([OPENSSL, "pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub)],
                       check=True, env=penv, capture_output=True, timeout=60)
        proc = subprocess.Popen([str(loadgen), "timed", MODDIR, str(key), str(pub),
                                 str(SIGNERS), "5"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=penv)
        time.sleep(1.5)
        broker.stop()
        broker.start()
        out, err = proc.communicate(timeout=90)
        threads = [line for line in out.splitlines() if line.startswith("thread ")]
        print("\n".join(threads))
        assert len(threads) == SIGNERS, out + err
        for line in threads:
            fields = line.split()  # thread I signed N failed F bad B
            assert int(fields[3]) > 0 and fields[5] == "0" and fields[7] == "0", line + err
        assert proc.returncode == 0, err
    finally:
        broker.stop()


def test_a_burst_of_connections_fails_no_new_signer(broker: Broker, tmp_path: Path) -> None:
    """Thousands of connections opened at once fill the broker's listen backlog, as every
    nginx worker reconnecting after a restart does: a connect then answers EAGAIN, which on
    a Unix socket has not connected at all. Fresh openssl processes signing meanwhile
    connect again until they are taken, and none fails."""
    key = tmp_path / "k.pem"
    subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256", "-o", str(key), "--socket",
                    broker.socket], check=True, capture_output=True, timeout=120)
    data = tmp_path / "data"
    data.write_bytes(b"burst")
    penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)
    held: list[socket.socket] = []
    refused = 0
    stop = threading.Event()

    def burst() -> None:
        nonlocal refused
        while not stop.is_set() and len(held) < BURST:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(broker.socket)
            except BlockingIOError:
                refused += 1  # the backlog is full: the broker is behind
                sock.close()
                continue
            except OSError:
                sock.close()
                time.sleep(0.001)
                continue
            held.append(sock)

    opener = threading.Thread(target=burst)
    opener.start()
    try:
        signers = [subprocess.Popen(
            [OPENSSL, "dgst", "-sha256", *PROV, "-sign", str(key), "-out",
             str(tmp_path / f"sig{i}"), str(data)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=penv) for i in range(11)]
        results = [proc.communicate(timeout=120) for proc in signers]
        codes = [proc.returncode for proc in signers]
    finally:
        stop.set()
        opener.join(60)
        for sock in held:
            sock.close()
    print(f"{len(held)} connections held, {refused} connects refused with EAGAIN; "
          f"signers' exit codes {codes}")
    assert codes == [0] * 11, [err.decode() for _, err in results if err]
    with Client(broker.socket) as client:  # and the broker serves on
        assert client.status()["connections"] is not None
