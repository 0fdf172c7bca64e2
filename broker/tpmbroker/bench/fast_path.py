"""Signing loops straight against a swtpm: ESAPI with password auth, ESAPI with a salted
HMAC session, the fast path (session crypto in Python, raw TPM2_Sign) with one session
and with two sessions pipelined from two threads, and TpmWorker.sign on either path.

    python -m tpmbroker.bench.fast_path [--seconds 5] [--key ecc256|rsa2048] [--runs 2]
                                        [--variants fast-1,fast-2,...]

For each variant: signatures per second, TPM utilization (swtpm CPU time / wall time)
and this process's CPU time per signature. The machine's other load shows in the
figures; --runs repeats every variant and prints each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
from tpm2_pytss.tsskey import _parent_ecc_template
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
)

from ..protocol import Curve, Hash, KeySource, KeyType, Scheme
from ..simulator import Swtpm
from ..tpm import TpmWorker, raw, transport
from ..tpm import session_crypto as sc
from ..tpm.sessions import SESSION_ATTRIBUTES, _aes128_cfb

SIGNING_KEY = "sign|userwithauth|fixedtpm|fixedparent|sensitivedataorigin"
DIGEST = hashlib.sha256(b"tpmbroker fast path benchmark").digest()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Result:
    variant: str
    signs: int
    wall: float
    tpm_cpu: float
    client_cpu: float

    def line(self) -> str:
        rate = self.signs / self.wall
        tpm = 100 * self.tpm_cpu / self.wall
        return (f"{self.variant:<52} {rate:6.0f} signs/s  TPM {tpm:5.1f} %"
                f"  client CPU {1e6 * self.client_cpu / max(self.signs, 1):5.0f} µs/sign")


@dataclasses.dataclass
class Rig:
    """A storage primary and a signing key, through one ESAPI context."""

    esapi: Any
    primary: Any
    primary_public: Any
    key: Any
    key_public: Any
    scheme_alg: int

    @property
    def key_handle(self) -> int:
        return int(self.esapi.tr_get_tpm_handle(self.key))

    @property
    def primary_handle(self) -> int:
        return int(self.esapi.tr_get_tpm_handle(self.primary))

    @property
    def key_name(self) -> bytes:
        return bytes(self.key_public.get_name())


@contextmanager
def rig(tcti: Any, key_alg: str) -> Iterator[Rig]:
    esapi = ESAPI(tcti)
    try:
        primary, primary_public, *_ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_parent_ecc_template),
            ESYS_TR.RH_OWNER)
        private, public, *_ = esapi.create(
            primary, TPM2B_SENSITIVE_CREATE(),
            TPM2B_PUBLIC.parse(key_alg, objectAttributes=SIGNING_KEY))
        key = esapi.load(primary, private, public)
        scheme = int(TPM2_ALG.ECDSA if key_alg.startswith("ecc") else TPM2_ALG.RSASSA)
        yield Rig(esapi, primary, primary_public.publicArea, key, public, scheme)
        esapi.flush_context(key)
        esapi.flush_context(primary)
    finally:
        esapi.close()


def measure(tpm: Swtpm, variant: str, seconds: float, loop: Callable[[float], int]) -> Result:
    """Run `loop(stop_at)` (it returns how many signatures it made) and meter it."""
    tpm_before = process_cpu_seconds(tpm.pid)
    cpu_before = time.process_time()
    start = time.monotonic()
    signs = loop(start + seconds)
    wall = time.monotonic() - start
    return Result(variant, signs, wall, process_cpu_seconds(tpm.pid) - tpm_before,
                  time.process_time() - cpu_before)


def esapi_loop(tpm: Swtpm, key_alg: str, seconds: float, hmac_session: bool) -> Result:
    with rig(tpm.tcti, key_alg) as r:
        scheme = TPMT_SIG_SCHEME(scheme=r.scheme_alg)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        session = ESYS_TR.PASSWORD
        if hmac_session:
            session = r.esapi.start_auth_session(r.primary, ESYS_TR.NONE, TPM2_SE.HMAC,
                                                 _aes128_cfb(), TPM2_ALG.SHA256)
            r.esapi.trsess_set_attributes(session, SESSION_ATTRIBUTES)
        digest = TPM2B_DIGEST(DIGEST)
        r.esapi.sign(r.key, digest, scheme, session1=session)  # first-use self-test

        def loop(stop_at: float) -> int:
            n = 0
            while time.monotonic() < stop_at:
                bytes(r.esapi.sign(r.key, digest, scheme, session1=session))
                n += 1
            return n

        name = "ESAPI, HMAC session" if hmac_session else "ESAPI, password auth"
        result = measure(tpm, f"{name} (tss2 swtpm TCTI)", seconds, loop)
        if hmac_session:
            r.esapi.flush_context(session)
        return result


def fast_loop(tpm: Swtpm, key_alg: str, seconds: float, sessions: int,
              persistent: bool) -> Result:
    link, tcti = transport.open_transport(tpm.tcti, persistent=persistent)
    try:
        return _fast_loop(link, tcti, tpm, key_alg, seconds, sessions, persistent)
    finally:
        link.close()  # swtpm serves one connection at a time


def _fast_loop(link: transport.Transport, tcti: Any, tpm: Swtpm, key_alg: str, seconds: float,
               sessions: int, persistent: bool) -> Result:
    with rig(tcti, key_alg) as r:
        key_handle, key_name = r.key_handle, r.key_name
        pool = [raw.start_salted_session(link, r.primary_handle, r.primary_public)
                for _ in range(sessions)]
        raw.sign(link, pool[0], key_handle, key_name, b"", DIGEST, r.scheme_alg, 0x000B)

        def signer(session: sc.SessionState, stop_at: float, counts: list[int]) -> None:
            n = 0
            while time.monotonic() < stop_at:
                raw.sign(link, session, key_handle, key_name, b"", DIGEST, r.scheme_alg,
                         0x000B)
                n += 1
            counts.append(n)

        def loop(stop_at: float) -> int:
            counts: list[int] = []
            if sessions == 1:
                signer(pool[0], stop_at, counts)
            else:
                # Each thread owns a session; while one waits for the TPM (the GIL is
                # released in recv), the other computes its command's HMAC.
                threads = [threading.Thread(target=signer, args=(s, stop_at, counts))
                           for s in pool]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            return sum(counts)

        how = "persistent socket" if persistent else "tss2 swtpm TCTI"
        shape = "1 session" if sessions == 1 else f"{sessions} sessions pipelined"
        result = measure(tpm, f"fast path, {shape} ({how})", seconds, loop)
        for s in pool:
            raw.flush_context(link, s.handle)
        return result


def worker_loop(tpm: Swtpm, key_alg: str, seconds: float, fast_path: bool) -> Result:
    """TpmWorker.sign in a loop: the broker's TPM thread without the server around it."""
    worker = TpmWorker(tpm.tcti, sessions=2, fast_path=fast_path)
    worker.open(time.monotonic() + 30)
    try:
        rsa_key = key_alg.startswith("rsa")
        der, _ = worker.generate_key(KeyType.RSA if rsa_key else KeyType.EC,
                                     2048 if rsa_key else Curve.P256, b"", 0,
                                     time.monotonic() + 60)
        info = worker.load_key(KeySource.TSS2_DER, der, time.monotonic() + 30)
        scheme = Scheme.PKCS1 if rsa_key else Scheme.ECDSA

        def sign() -> None:
            worker.sign(info.key_id, b"", scheme, Hash.SHA256, DIGEST,
                        time.monotonic() + 30)

        sign()

        def loop(stop_at: float) -> int:
            n = 0
            while time.monotonic() < stop_at:
                sign()
                n += 1
            return n

        path = "fast path" if fast_path else "ESAPI"
        return measure(tpm, f"TpmWorker.sign, {path}, 2 sessions", seconds, loop)
    finally:
        worker.close()


VARIANTS: dict[str, Callable[[Swtpm, str, float], Result]] = {
    "esapi-password": lambda t, k, s: esapi_loop(t, k, s, hmac_session=False),
    "esapi-hmac": lambda t, k, s: esapi_loop(t, k, s, hmac_session=True),
    "fast-1-tcti": lambda t, k, s: fast_loop(t, k, s, 1, persistent=False),
    "fast-1": lambda t, k, s: fast_loop(t, k, s, 1, persistent=True),
    "fast-2": lambda t, k, s: fast_loop(t, k, s, 2, persistent=True),
    "worker-esapi": lambda t, k, s: worker_loop(t, k, s, fast_path=False),
    "worker-fast": lambda t, k, s: worker_loop(t, k, s, fast_path=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--key", default="ecc256", choices=["ecc256", "rsa2048"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="tpmbroker-bench-") as state, \
            Swtpm(Path(state)) as tpm:
        print(f"swtpm pid {tpm.pid}, key {args.key}, {args.seconds:g} s per run, "
              f"{os.cpu_count()} CPUs")
        for run in range(args.runs):
            for variant in chosen:
                result = VARIANTS[variant](tpm, args.key, args.seconds)
                print(f"run {run + 1}: {result.line()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
