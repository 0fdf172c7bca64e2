"""The reason tpmbroker exists: session slots under pressure, TPM restarts under load.

All through real parts: swtpm, tpm2-abrmd where other TPM users share the TPM, the
broker as a subprocess.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT_HR, TPM2_SE
from tpm2_pytss.types import TPMT_SYM_DEF

from benchmarks import engine_style
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import NoSessionsError
from tpmbroker.loadgen import run_threads
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd, Broker


@pytest.fixture
def shared_tpm(abrmd: Abrmd) -> Abrmd:
    """swtpm behind tpm2-abrmd, so the broker and other TPM users share it."""
    return abrmd


def _broker(rm: Abrmd, tmp_path: Path, sessions: int = 2) -> Broker:
    return Broker(rm.tcti, tmp_path / "broker", sessions=sessions,
                  extra_args=("--timeout", "20"), env=rm.env()).start()


class SessionHog:
    """Another TPM user holding session slots, four per connection (abrmd's limit)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.held: list[tuple[ESAPI, list[ESYS_TR]]] = []

    def _start(self, ectx: ESAPI) -> ESYS_TR:
        return ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC,
                                       TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)

    def hold(self, count: int) -> int:
        """Take up to `count` more slots; returns how many were taken."""
        taken = 0
        while taken < count:
            ectx = ESAPI(TCTILdr.parse(self.tcti))
            sessions: list[ESYS_TR] = []
            try:
                while len(sessions) < 4 and taken < count:
                    sessions.append(self._start(ectx))
                    taken += 1
            except TSS2_Exception:
                self.held.append((ectx, sessions))
                return taken
            self.held.append((ectx, sessions))
        return taken

    def release(self) -> None:
        for ectx, sessions in self.held:
            for session in sessions:
                ectx.flush_context(session)
            ectx.close()
        self.held.clear()


def active_sessions(tcti: str) -> tuple[int, int]:
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_HR.ACTIVE, 2)
        props = {int(x.property): int(x.value) for x in data.data.tpmProperties}
    return props[TPM2_PT_HR.ACTIVE], props[TPM2_PT_HR.ACTIVE_AVAIL]


@pytest.fixture
def ec_key_der(swtpm: Swtpm, shared_tpm: Abrmd) -> bytes:
    from tpm2_pytss.tsskey import TSSPrivKey

    with ESAPI(TCTILdr.parse(shared_tpm.tcti)) as ectx:
        der: bytes = TSSPrivKey.create_ecc(ectx).to_der()
    return der


def test_engine_style_fails_where_the_broker_does_not(
        shared_tpm: Abrmd, ec_key_der: bytes, tmp_path: Path) -> None:
    """32 threads with 3 salted sessions per signature exhaust the TPM; the broker holds."""
    engine = engine_style.run(shared_tpm.tcti, ec_key_der, 32, 5.0)
    print(f"engine style: {engine.summary()} errors {engine.errors}")
    assert engine.errors.get("TPM_RC_SESSION_HANDLES", 0) > 0

    broker = _broker(shared_tpm, tmp_path)
    try:
        with Client(broker.socket, max_connections=33) as client:
            key = client.load_key(ec_key_der)
            report = run_threads(client, key, 32, 5.0)
        print(f"tpmbroker: {report.summary()}")
        assert report.failures == 0 and report.bad_signatures == 0
        assert report.signatures > 0
        assert report.max_active_sessions <= broker.sessions
    finally:
        broker.stop()


def test_other_users_holding_slots(shared_tpm: Abrmd, ec_key_der: bytes,
                                   tmp_path: Path) -> None:
    hog = SessionHog(shared_tpm.tcti)
    try:
        active, avail = active_sessions(shared_tpm.tcti)
        assert hog.hold(active + avail - 1) == active + avail - 1  # all but one slot
        broker = _broker(shared_tpm, tmp_path, sessions=2)
        try:
            with Client(broker.socket, timeout=5) as client:
                key = client.load_key(ec_key_der)
                assert client.sign(key, bytes(32))  # one pool session was all it could get
                assert client.status()["pool_sessions"] == 1
                assert active_sessions(shared_tpm.tcti)[1] == 0  # the TPM is full now
                for _ in range(20):  # and the broker keeps signing with what it holds
                    assert client.sign(key, bytes(32))
        finally:
            broker.stop()  # flushes its session: the slot goes back to the hog
        assert hog.hold(64) >= 1
        assert active_sessions(shared_tpm.tcti)[1] == 0

        broker = _broker(shared_tpm, tmp_path, sessions=2)  # starts with no slot at all
        try:
            with Client(broker.socket, timeout=3) as client:
                key = client.load_key(ec_key_der)
                t0 = time.monotonic()
                with pytest.raises(NoSessionsError, match="session"):
                    client.sign(key, bytes(32))
                waited = time.monotonic() - t0
                assert 2.0 <= waited < 6.0, waited  # failed at its deadline, not before
                hog.release()
                assert client.sign(key, bytes(32))  # same broker, no restart
                assert broker.alive
        finally:
            broker.stop()
    finally:
        hog.release()


def test_tpm_reset_under_load(swtpm: Swtpm, tmp_path: Path) -> None:
    """swtpm killed and started again mid-run: primary, sessions and keys come back."""
    broker = Broker(swtpm.tcti, tmp_path / "broker", extra_args=("--timeout", "20")).start()
    try:
        with Client(broker.socket, max_connections=9, timeout=20) as client:
            der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256)
            key = client.load_key(der)
            errors: list[str] = []
            results: list[int] = []

            def load() -> None:
                report = run_threads(client, key, 8, 6.0, sample=False)
                results.append(report.signatures)
                errors.extend(f"{k}: {v}" for k, v in report.errors.items())

            runner = threading.Thread(target=load)
            runner.start()
            time.sleep(2.0)
            swtpm.restart()
            runner.join()
            assert results and results[0] > 0
            # In-flight requests may fail once with a clear error, never hang.
            for line in errors:
                assert line.split(":")[0] in {"TpmUnavailableError", "DeadlineError",
                                              "TpmError"}, line
            assert client.sign(key, bytes(32))
            status = client.status()
            assert int(str(status["tpm_restarts_recovered"])) >= 1
            assert int(str(status["tpm_active_sessions"])) <= broker.sessions
        assert broker.alive
    finally:
        broker.stop()
