"""The systems under test: one function per way of getting a TPM signature.

Each takes a target (what to reach and with how many signers) and returns a LoadReport;
the runner adds TPM utilization and the point's metadata. All sign SHA-256: ECDSA for EC
keys, RSASSA-PKCS1-v1_5 for RSA keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT_HR
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMT_SIG_SCHEME

from tpmbroker.loadgen import BUSY, LoadReport, sample_sessions
from tpmbroker.paths import provider_path

from .tss import null_ticket, salted_session, storage_primary

DESCRIPTIONS = {
    "direct-password": "tpm2-pytss ESAPI loop in the benchmark process, password auth, key "
                       "loaded once, straight to the TPM (no resource manager): the reference "
                       "(TPM2_Sign; TPM2_RSA_Decrypt and TPM2_ECDH_ZGen for --ops)",
    "direct-hmac": "as direct-password, through one reused salted HMAC session with "
                   "parameter encryption (tss2-esys computes the HMACs)",
    "provider": "tpmbroker through its OpenSSL provider: N C threads of one process (the "
                "load generator benchmarks/loadgen.c) call EVP_DigestSign on one EVP_PKEY",
    "client": "tpmbroker through the Python client (tpmbroker.loadgen.run_threads): N threads "
              "share one Client",
    "provider-noverify": "as provider, with the provider's check of each signature against "
                         "the key's public key off (TPMBROKER_VERIFY=0)",
    "client-noverify": "as client, with Client(verify=False)",
    "tpm2-openssl-1.1": "tpm2-openssl 1.1 (Debian 12: 1.1.1) through tpm2-abrmd: N "
                        "processes (it is not thread-safe), each EVP_DigestSign in a loop, "
                        "password auth",
    "tpm2-openssl-1.3": "tpm2-openssl 1.3 (Debian 13: 1.3.0, one global lock per process) "
                        "through tpm2-abrmd: N processes, as tpm2-openssl-1.1",
    "engine-style": "N threads through tpm2-abrmd, each starting 3 salted sessions per "
                    "signature (as per-operation engines do), EC only",
    "tpm2-pkcs11": "tpm2-pkcs11 1.9 through the PKCS#11 engine (libp11) and p11-kit's "
                   "server, tpm2-abrmd: N processes, each EVP_DigestSign in a loop with the "
                   "token's own key",
}

CHECK_EVERY = 50  # verify one signature in this many
CHECKOUT = Path(__file__).resolve().parents[1]  # the directory holding benchmarks/


@dataclasses.dataclass(frozen=True)
class Key:
    """One benchmark key, made once in the TPM and used by every system."""

    name: str  # "ec:P-256", "rsa:2048"
    der: bytes  # TSS2 PRIVATE KEY
    pem: bytes
    public: bytes  # SubjectPublicKeyInfo DER

    @property
    def is_ec(self) -> bool:
        return self.name.startswith("ec:")


def make_key(tcti: str, name: str) -> Key:
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        if name == "ec:P-256":
            tss = TSSPrivKey.create_ecc(ectx)
        elif name == "rsa:2048":
            tss = TSSPrivKey.create_rsa(ectx, keyBits=2048)
        else:
            raise ValueError(f"unsupported key type {name} (ec:P-256, rsa:2048)")
    der: bytes = tss.to_der()
    pem: bytes = tss.to_pem()
    public: bytes = tss.public.to_der()
    return Key(name, der, pem, public)


# --- helpers --------------------------------------------------------------------------------

def _sig_scheme(key: Key) -> TPMT_SIG_SCHEME:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA if key.is_ec else TPM2_ALG.RSASSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    return scheme


def _active_sessions(ectx: ESAPI) -> int:
    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_HR.ACTIVE, 1)
    for prop in data.data.tpmProperties:
        if int(prop.property) == int(TPM2_PT_HR.ACTIVE):
            return int(prop.value)
    return 0


def _tpm_signature_der(key: Key, signature: Any) -> bytes:
    if key.is_ec:
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)
    return bytes(signature.signature.rsassa.sig)


def _verify_digest(key: Key, signature: bytes, digest: bytes) -> bool:
    """ECDSA (DER) or RSASSA-PKCS1-v1_5 over a SHA-256 digest, by cryptography alone."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    public = serialization.load_der_public_key(key.public)
    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class SessionSampler:
    """Records the most TPM sessions seen active (TPM2_PT_HR_ACTIVE) while a load runs."""

    def __init__(self, probe: Callable[[], int | None], interval: float = 0.1) -> None:
        self.probe = probe
        self.interval = interval
        self.max_active = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sessions")

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the probe must not end the run
                value = self.probe()
                if value is not None:
                    self.max_active = max(self.max_active, value)
                    self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> SessionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def abrmd_session_probe(tcti: str) -> tuple[Callable[[], int | None], Callable[[], None]]:
    """A probe over a connection of its own through a resource manager; and its closer."""
    ectx = ESAPI(TCTILdr.parse(tcti))
    lock = threading.Lock()

    def probe() -> int | None:
        with lock:
            return _active_sessions(ectx)

    def close() -> None:
        with lock, contextlib.suppress(Exception):  # its resource manager may be gone
            ectx.close()

    return probe, close


# --- 1, 2: ESAPI straight to the TPM ------------------------------------------------------

# One TPM command of a direct loop: (ectx, key handle, session, n) -> a check of its result,
# called outside the timed part, and only now and then.
DirectCommand = Callable[[ESAPI, ESYS_TR, ESYS_TR, int], Callable[[], bool]]


def sign_command(key: Key) -> DirectCommand:
    """TPM2_Sign of a SHA-256 digest that changes with every call."""
    scheme = _sig_scheme(key)
    ticket = null_ticket()

    def command(ectx: ESAPI, handle: ESYS_TR, session: ESYS_TR, n: int) -> Callable[[], bool]:
        digest = hashlib.sha256(f"{n}".encode()).digest()
        signature = ectx.sign(handle, digest, scheme, ticket, session1=session)
        return lambda: _verify_digest(key, _tpm_signature_der(key, signature), digest)

    return command


def run_direct(tcti: str, key: Key, seconds: float, hmac: bool,
               command: DirectCommand | None = None) -> LoadReport:
    """One thread, one ESAPI context, the key loaded once; optionally one salted session.

    `command` is the TPM command of the loop: TPM2_Sign (sign_command) unless given.
    A raw TPM has no resource manager, so no second connection can watch it: active
    sessions are read in-process between commands, four times a second.
    """
    run_command = command if command is not None else sign_command(key)
    report = LoadReport(1, seconds, per_client=[0])
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        tss = TSSPrivKey.from_der(key.der)
        parent = storage_primary(ectx)
        handle = ectx.load(parent, tss.private, tss.public)
        session = ESYS_TR.PASSWORD
        if hmac:
            session = salted_session(ectx, parent)
        ectx.flush_context(parent)
        done = failed = bad = 0
        errors: dict[str, int] = {}
        latencies: list[float] = []
        next_probe = 0.0
        try:
            t_start = time.monotonic()
            end = t_start + seconds
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if now >= next_probe:
                    report.max_active_sessions = max(report.max_active_sessions,
                                                     _active_sessions(ectx))
                    next_probe = now + 0.25
                t0 = time.perf_counter()
                try:
                    check = run_command(ectx, handle, session, done + failed)
                except TSS2_Exception as exc:
                    failed += 1
                    name = f"rc 0x{exc.rc:x}"
                    errors[name] = errors.get(name, 0) + 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if done % CHECK_EVERY == 0 and not check():
                    bad += 1
                done += 1
            report.seconds = time.monotonic() - t_start
        finally:
            if hmac:
                with contextlib.suppress(TSS2_Exception):
                    ectx.flush_context(session)
            with contextlib.suppress(TSS2_Exception):
                ectx.flush_context(handle)
    report.add_signer(0, done, failed, bad, latencies, errors)
    return report


# --- 3: the tpmbroker provider in libcrypto ---------------------------------------------------

LOADGEN_SOURCE = Path(__file__).with_name("loadgen.c")


def build_loadgen(workdir: Path) -> Path:
    """The C load generator, compiled against the system libcrypto (once per run)."""
    exe = workdir / "loadgen"
    if not exe.exists():
        out = subprocess.run(["cc", "-O2", "-o", str(exe), str(LOADGEN_SOURCE), "-lcrypto",
                              "-lpthread"], capture_output=True, text=True, timeout=120,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"cannot build the load generator: {out.stderr[-500:]}")
    return exe


def parse_loadgen(output: str, clients: int, seconds: float) -> LoadReport:
    """The report of `loadgen timed`: a line per thread, every latency, the window.
    `seconds` stands when the output has no window (the generator failed)."""
    report = LoadReport(clients, seconds, per_client=[0] * clients)
    latencies: list[float] = []
    for line in output.splitlines():
        words = line.split()
        if words[:1] == ["thread"] and len(words) == 10:
            index, done, failed, bad, busy = (int(words[i]) for i in (1, 3, 5, 7, 9))
            errors = {"signing failed": failed} if failed else {}
            if busy:  # refused at once and backed off: not a failure (Fail fast)
                errors[BUSY] = busy
            report.add_signer(index, done, failed, bad, [], errors)
        elif words[:1] == ["latencies_us"]:
            latencies = [int(w) / 1000 for w in words[1:]]
        elif words[:1] == ["window_us"] and len(words) == 2:
            report.seconds = int(words[1]) / 1e6  # the measured window, set-up left out
    report.latencies_ms = latencies
    return report


def run_provider(socket: str, workdir: Path, key: Key, clients: int,
                 seconds: float, verify: bool = True,
                 operation: tuple[str, ...] = ()) -> LoadReport:
    """C threads of one process calling EVP_DigestSign through the provider; `verify`
    False turns the provider's check of each signature off (TPMBROKER_VERIFY=0).
    `operation`: ("decrypt" or "derive", input file, expected file) for the load
    generator to decrypt or derive instead (benchmarks/operations.py)."""
    from tpmbroker.client import Client

    exe = build_loadgen(workdir)
    key_path = workdir / "provider-key.pem"
    key_path.write_bytes(key.pem)
    pub_path = workdir / "provider-key.pub"
    public = serialization.load_der_public_key(key.public)
    pub_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    env = dict(os.environ, TPMBROKER_SOCKET=socket, OPENSSL_CONF=os.devnull,
               TPMBROKER_VERIFY="1" if verify else "0")
    with Client(socket, timeout=10) as status_client:
        stop = threading.Event()
        holder = LoadReport(clients, seconds)
        sampler = threading.Thread(target=sample_sessions,
                                   args=(status_client, stop, holder, 0.1), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            out = subprocess.run([str(exe), "timed", str(provider_path().parent),
                                  str(key_path), str(pub_path), str(clients), f"{seconds:g}",
                                  *operation],
                                 env=env, capture_output=True, text=True,
                                 timeout=seconds + 120, check=False)
        finally:
            stop.set()
            sampler.join()
    report = parse_loadgen(out.stdout, clients, time.monotonic() - t0)
    if not report.signatures and out.returncode:
        report.errors[f"load generator: {out.stderr.strip()[-200:]}"] = 1
        report.failures += 1
    report.max_active_sessions = holder.max_active_sessions
    report.pool_size = holder.pool_size
    return report


# --- 4: the Python client ---------------------------------------------------------------------

def run_client(socket: str, key: Key, clients: int, seconds: float,
               verify: bool = True) -> LoadReport:
    from tpmbroker.client import Client
    from tpmbroker.loadgen import run_threads

    with Client(socket, timeout=30, max_connections=clients + 1, verify=verify) as client:
        loaded = client.load_key(key.der)
        return run_threads(client, loaded, clients, seconds, check_every=CHECK_EVERY)


# --- 5: tpm2-openssl, one process per signer ---------------------------------------------

def run_processes(tcti: str, env: dict[str, str], key_path: Path | str, clients: int,
                  seconds: float, probe: Callable[[], int | None] | None,
                  providers: str = "tpm2,base",
                  mode: tuple[str, ...] = ("--mode", "digest-sign"),
                  ) -> tuple[LoadReport, float]:
    """`clients` processes, each loading the key in its own libcrypto and signing in a loop.

    Returns the report and the moment the processes were told to start: each then signs
    for exactly `seconds`.
    """
    report = LoadReport(clients, seconds, per_client=[0] * clients)
    t0 = time.monotonic()
    child_env = dict(env, TPM2OPENSSL_TCTI=tcti, TSS2_LOG="all+none")
    child_env.pop("OPENSSL_CONF", None)
    # The harness is not installed: the children find it where this process did.
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(CHECKOUT), *filter(None, [child_env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "benchmarks.libcrypto", "--providers", providers,
           "--key", str(key_path), "--seconds", str(seconds), *mode,
           "--verify-every", str(CHECK_EVERY)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(clients):
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, env=child_env, text=True,
                                          start_new_session=True))
        ready: list[subprocess.Popen[str]] = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line == "ready":
                ready.append(proc)
            else:
                report.failures += 1
                text = f"setup: {line or 'no output'}"[:160]
                report.errors[text] = report.errors.get(text, 0) + 1
        results: list[dict[str, Any]] = []
        sampler = SessionSampler(probe) if probe is not None else None
        if sampler is not None:
            sampler.__enter__()
        t0 = time.monotonic()
        try:
            for proc in ready:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in ready:
                assert proc.stdout is not None
                out = proc.stdout.readline()
                proc.wait(timeout=60)
                try:
                    results.append(json.loads(out))
                except ValueError:
                    report.failures += 1
                    report.errors["worker ended without a result"] = (
                        report.errors.get("worker ended without a result", 0) + 1)
            report.seconds = seconds
        finally:
            if sampler is not None:
                sampler.__exit__()
        for index, result in enumerate(results):
            report.signatures += int(result["signatures"])
            report.failures += int(result["failures"])
            report.bad_signatures += int(result["bad_signatures"])
            report.latencies_ms.extend(float(x) for x in result["latencies_ms"])
            report.per_client[index] = int(result["signatures"])
            for name, count in result["errors"].items():
                report.errors[name] = report.errors.get(name, 0) + int(count)
        if sampler is not None:
            report.max_active_sessions = sampler.max_active
    finally:
        from tpmbroker.processes import kill_group

        for proc in procs:
            kill_group(proc, timeout=2)
    return report, t0


# --- 6: per-operation sessions ----------------------------------------------------------------

def run_engine_style(tcti: str, key: Key, clients: int, seconds: float,
                     probe: Callable[[], int | None] | None) -> LoadReport:
    from . import engine_style

    with SessionSampler(probe) if probe is not None else contextlib.nullcontext() as sampler:
        report = engine_style.run(tcti, key.der, clients, seconds)
    if isinstance(sampler, SessionSampler):
        report.max_active_sessions = sampler.max_active
    return report
