"""The failure tpmbroker exists to end, reproduced: salted sessions started per signature.

Engines and providers that start their own HMAC sessions for every operation run
the TPM out of session slots (TPM_RC_SESSION_HANDLES) as soon as enough threads
sign at once; a resource manager in between cannot help. Each thread here has its
own connection (through tpm2-abrmd), its own storage primary as the salt key, and
for every signature starts `sessions_per_sign` salted sessions, signs, flushes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMT_SIG_SCHEME

from tpmbroker.loadgen import LoadReport, run_for

from .tss import null_ticket, salted_session, storage_primary

SESSION_EXHAUSTION = {int(TPM2_RC.SESSION_HANDLES), int(TPM2_RC.SESSION_MEMORY)}


def run(tcti: str, key_der: bytes, threads: int, seconds: float,
        sessions_per_sign: int = 3) -> LoadReport:
    """Sign from `threads` threads, each opening its own sessions per signature."""
    report = LoadReport(threads, seconds, per_client=[0] * threads)
    stop = threading.Event()
    ready = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        done = failed = 0
        errors: dict[str, int] = {}
        latencies: list[float] = []
        try:
            ectx = ESAPI(TCTILdr.parse(tcti))
            key = TSSPrivKey.from_der(key_der).load(ectx)
            salt_key = storage_primary(ectx)
        except Exception as exc:
            ready.wait()
            report.add_signer(index, 0, 1, 0, [], {f"setup: {exc}": 1})
            return
        ready.wait()
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        ticket = null_ticket()
        while not stop.is_set():
            digest = hashlib.sha256(f"{index}:{done}:{failed}".encode()).digest()
            sessions: list[ESYS_TR] = []
            t0 = time.perf_counter()
            try:
                for _ in range(sessions_per_sign):
                    sessions.append(salted_session(ectx, salt_key))
                ectx.sign(key, digest, scheme, ticket, session1=sessions[0])
                done += 1
                latencies.append((time.perf_counter() - t0) * 1000)
            except TSS2_Exception as exc:
                failed += 1
                name = ("TPM_RC_SESSION_HANDLES" if (exc.rc & 0xFFF) in SESSION_EXHAUSTION
                        else f"rc 0x{exc.rc:x}")
                errors[name] = errors.get(name, 0) + 1
            finally:
                for session in sessions:
                    with contextlib.suppress(TSS2_Exception):
                        ectx.flush_context(session)
        ectx.close()
        report.add_signer(index, done, failed, 0, latencies, errors)

    report.seconds = run_for(worker, threads, ready, stop, seconds)
    return report
