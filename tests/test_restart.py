"""Restarts nobody notices: a broker restarted (SIGTERM, then a new one, as `systemctl
restart` does) while clients sign, decrypt and generate; what may be repeated is sent
again to the successor within the deadline, a key generation never twice."""

from __future__ import annotations

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

from .test_provider import TPMBROKER
from .tpmfixtures import Broker

SIGNERS = 16


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
