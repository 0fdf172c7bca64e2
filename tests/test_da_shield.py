"""The dictionary-attack shield end to end: swtpm (maxTries 3, 1000 s per count), the real
broker, clients on its socket. The arithmetic alone is in tests/test_lockout.py.

TPM_DA_ATTEMPTS sets how many wrong passwords the flood test sends: 10,000 by default
(about 5 s); TPM_DA_ATTEMPTS=100000 is the full run (README, "Long tests").
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey

from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import TpmBrokerError
from tpmbroker.ops.load import Load, LoadResult
from tpmbroker.ops.sign import Sign
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

ATTEMPTS = int(os.environ.get("TPM_DA_ATTEMPTS", "10000"))
WINDOW = 60  # requests in flight on the attacking connection (the broker allows 64)


def tpm_counters(tcti: str) -> tuple[int, int]:
    """(lockout counter, maxTries), read straight from the TPM (no broker running)."""
    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 2)
        values = {int(e.property): int(e.value) for e in data.data.tpmProperties}
    return values[int(TPM2_PT.LOCKOUT_COUNTER)], values[int(TPM2_PT.MAX_AUTH_FAIL)]


def status_int(client: Client, name: str) -> int:
    return int(str(client.status()[name]))


def verify(key: LoadedKey, signature: bytes, digest: bytes) -> None:
    public = load_der_public_key(key.public_key)
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(prehashed))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, digest, padding.PKCS1v15(), prehashed)


class Signer(threading.Thread):
    """Signs with one key (and its right password, if any) until told to stop."""

    def __init__(self, socket_path: str, key: bytes, password: str | None) -> None:
        super().__init__(daemon=True)
        self.client = Client(socket_path, timeout=30)
        self.loaded = self.client.load_key(key, password)
        self.signed = 0
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.sign_once()  # the right password has signed: the shield knows it

    def sign_once(self) -> None:
        digest = hashlib.sha256(b"%d" % self.signed).digest()
        signature = self.client.sign(self.loaded, digest)
        verify(self.loaded, signature, digest)
        self.signed += 1

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sign_once()
            except BaseException as exc:
                self.failures.append(exc)
                return

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.client.close()


def flood(socket_path: str, key: bytes, attempts: int) -> collections.Counter[str]:
    """Wrong passwords, pipelined on one connection: half the same one again and again,
    half a new one each time (a LOAD with it before each SIGN). Statuses of the SIGNs."""
    key_id = p.key_id_for(p.KeySource.TSS2_DER, key)
    statuses: collections.Counter[str] = collections.Counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        sock.settimeout(60)
        reader = p.FrameReader()

        def answers() -> Iterator[tuple[int, p.Message | p.ErrorResult]]:
            while True:
                data = sock.recv(1 << 16)
                assert data, "the broker closed the attacking connection"
                for header, body in reader.feed(data):
                    yield header.opcode & ~p.RESPONSE_BIT, p.decode_response(header, body)

        stream = answers()
        sock.sendall(p.encode_request(0, Load(p.KeySource.TSS2_DER, key, b"wrong")))
        _, answer = next(stream)
        assert isinstance(answer, LoadResult), answer

        def requests() -> Iterator[bytes]:
            sign = Sign(key_id, p.Scheme.ECDSA, p.Hash.SHA256, bytes(32))
            for n in range(attempts):
                if n >= attempts // 2:
                    yield p.encode_request(n, Load(p.KeySource.TSS2_DER, key,
                                                       b"guess-%d" % n))
                yield p.encode_request(n, sign)

        def take_one() -> None:
            opcode, answer = next(stream)
            if opcode == p.Opcode.SIGN:
                statuses[status_name(answer)] += 1
            else:
                assert isinstance(answer, LoadResult), answer

        pending = 0
        for frame in requests():
            if pending >= WINDOW:
                take_one()
                pending -= 1
            sock.sendall(frame)
            pending += 1
        for _ in range(pending):
            take_one()
    return statuses


def status_name(answer: Any) -> str:
    if isinstance(answer, p.ErrorResult):
        return p.Status(answer.status).name
    return "OK"


def test_a_flood_of_wrong_passwords_never_locks_the_tpm(swtpm: Swtpm, tmp_path: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        with Client(broker.socket) as admin:
            plain, _ = admin.generate_key(p.KeyType.EC, p.Curve.P256)
            guarded, _ = admin.generate_key(p.KeyType.EC, p.Curve.P256, "right")
            max_tries = status_int(admin, "tpm_max_tries")
            assert max_tries == 3
        signers = [Signer(broker.socket, plain, None), Signer(broker.socket, guarded, "right"),
                   Signer(broker.socket, guarded, "right")]
        for signer in signers:
            signer.start()
        counters: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            with Client(broker.socket) as watcher:
                while not sampling.is_set():
                    counters.append(status_int(watcher, "tpm_lockout_counter"))
                    time.sleep(0.2)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        started = time.monotonic()
        statuses = flood(broker.socket, guarded, ATTEMPTS)
        elapsed = time.monotonic() - started
        sampling.set()
        watcher.join(10)
        for signer in signers:
            signer.finish()

        # Every wrong password was refused; none signed; nothing else came back.
        assert sum(statuses.values()) == ATTEMPTS
        assert set(statuses) <= {"AUTH_FAILED", "LOCKOUT"}, statuses
        # The other clients signed throughout, the right password among them.
        for signer in signers:
            assert signer.failures == [] and signer.signed > 1, signer.failures
        with Client(broker.socket) as admin:
            status = admin.status()
        refusals = status["da_refusals"]
        assert isinstance(refusals, dict)
        assert refusals["repeated_password"] >= ATTEMPTS // 2 - WINDOW
        assert refusals["throttled"] + refusals["reserve"] > 0
        print(f"\n{ATTEMPTS} wrong passwords in {elapsed:.1f} s: {dict(statuses)}; "
              f"signed meanwhile: {[s.signed for s in signers]}; refusals {refusals}")
    finally:
        broker.stop()
    # The TPM itself, with no broker in between: never near lockout.
    counter, max_tries = tpm_counters(swtpm.tcti)
    assert max(counters, default=0) < max_tries and counter < max_tries
    # The shield let exactly one wrong password reach the TPM (maxTries 3, reserve 1).
    assert counter == 1


def kill_and_restart(tpm: Swtpm) -> None:
    """SIGKILL: no TPM2_Shutdown, the TPM's next start is not orderly."""
    assert tpm.proc is not None
    os.killpg(tpm.proc.pid, signal.SIGKILL)
    tpm.proc.wait(10)
    tpm.proc = None
    tpm.start()


def test_tpm_crashes_under_load_do_not_count_toward_lockout(swtpm: Swtpm,
                                                            tmp_path: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        with Client(broker.socket) as admin:
            ec_key, _ = admin.generate_key(p.KeyType.EC, p.Curve.P256)
            rsa_key, _ = admin.generate_key(p.KeyType.RSA, 2048)
            guarded, _ = admin.generate_key(p.KeyType.EC, p.Curve.P256, "pw")
            before = status_int(admin, "tpm_lockout_counter")
        for blob in (ec_key, rsa_key):  # what keygen makes without a password: noDA
            attributes = int(TSSPrivKey.from_der(blob).public.publicArea.objectAttributes)
            assert attributes & TPMA_OBJECT.NODA
        assert not int(TSSPrivKey.from_der(guarded).public.publicArea.objectAttributes
                       ) & TPMA_OBJECT.NODA

        for round_ in range(5):
            signers = [Signer(broker.socket, ec_key, None), Signer(broker.socket, rsa_key, None)]
            for signer in signers:
                signer.start()
            time.sleep(0.3)  # under load
            kill_and_restart(swtpm)
            for signer in signers:
                signer.finish()
                # A crash may fail a request in flight, but never yields a bad signature.
                assert not any(isinstance(f, InvalidSignature) for f in signer.failures)
            # After the restart, the broker recovers and signs again.
            with Client(broker.socket, timeout=30) as client:
                loaded = client.load_key(ec_key)
                digest = hashlib.sha256(b"round %d" % round_).digest()
                verify(loaded, client.sign(loaded, digest), digest)
                assert status_int(client, "tpm_lockout_counter") == before, round_

        # The check can fail: once a DA-protected key has been used, a crash counts.
        with Client(broker.socket, timeout=30) as client:
            loaded = client.load_key(guarded, "pw")
            client.sign(loaded, bytes(32))
        kill_and_restart(swtpm)
        with Client(broker.socket, timeout=30) as client:
            for _ in range(50):  # the broker notices the restart on its next command
                with contextlib.suppress(TpmBrokerError):
                    loaded = client.load_key(ec_key)
                    client.sign(loaded, bytes(32))
                    break
                time.sleep(0.1)
            assert status_int(client, "tpm_lockout_counter") == before + 1
    finally:
        broker.stop()
