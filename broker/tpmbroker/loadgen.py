"""Concurrent signing load through the Python client, with TPM session sampling.

Used by `tpmbroker load`, the demo, the tests and the benchmark: one definition
of "N clients signing for T seconds" and of what is counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import statistics
import threading
import time
from collections.abc import Callable

from . import protocol as p
from .client import Client, LoadedKey
from .errors import BusyError


@dataclasses.dataclass
class LoadReport:
    clients: int
    seconds: float
    signatures: int = 0
    failures: int = 0
    bad_signatures: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    latencies_ms: list[float] = dataclasses.field(default_factory=list, repr=False)
    per_client: list[int] = dataclasses.field(default_factory=list, repr=False)
    max_active_sessions: int = 0
    pool_size: int = 0
    policy_sessions: int = 0  # the policy pool's sessions (keys with a policy; docs/keys.md)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                              compare=False)

    def add_signer(self, index: int, done: int, failed: int, bad: int,
                   latencies: list[float], errors: dict[str, int]) -> None:
        """Add one signer's tally (signers call this from their own threads)."""
        with self._lock:
            self.signatures += done
            self.failures += failed
            self.bad_signatures += bad
            self.latencies_ms.extend(latencies)
            self.per_client[index] = done
            for name, count in errors.items():
                self.errors[name] = self.errors.get(name, 0) + count

    @property
    def rate(self) -> float:
        return self.signatures / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def fairness(self) -> float:
        """Slowest client's signatures over the fastest's: 1.0 is perfectly fair."""
        counts = sorted(self.per_client)
        return counts[0] / counts[-1] if counts and counts[-1] else 0.0

    def summary(self) -> str:
        fairness = self.fairness
        median = statistics.median(self.latencies_ms) if self.latencies_ms else 0.0
        return (f"{self.clients} clients, {self.seconds:.1f} s: {self.signatures} signatures "
                f"({self.rate:.0f}/s), {self.failures} failed, {self.bad_signatures} bad; "
                f"p50 {median:.2f} ms, p99 {self.percentile(99):.2f} ms; min/max per client "
                f"{fairness:.2f}; TPM active sessions at most {self.max_active_sessions} "
                f"({self.sessions_text()})")

    def sessions_text(self) -> str:
        """Whose the TPM's active sessions are: the HMAC pool's, and the policy pool's
        once a key with a policy has been used."""
        text = f"pool {self.pool_size}"
        if self.policy_sessions:
            text += (f" + {self.policy_sessions} policy session"
                     f"{'s' if self.policy_sessions > 1 else ''}")
        return text


def verify(public_key_der: bytes, key_type: p.KeyType, signature: bytes, digest: bytes,
           hash_alg: p.Hash, scheme: p.Scheme) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    algorithm = getattr(hashes, hash_alg.name)()
    prehashed = utils.Prehashed(algorithm)
    public = serialization.load_der_public_key(public_key_der)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
                if scheme == p.Scheme.PSS else padding.PKCS1v15())
            public.verify(signature, digest, pad, prehashed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def sample_sessions(client: Client, stop: threading.Event, report: LoadReport,
                    interval: float = 0.05) -> None:
    """Record the most sessions the TPM reports active while the load runs."""
    while not stop.is_set():
        try:
            status = client.status(timeout=5)
        except Exception:  # the sampler must not end the run; failures show in the report
            stop.wait(interval)
            continue
        active = status.get("tpm_active_sessions")
        if isinstance(active, int):
            report.max_active_sessions = max(report.max_active_sessions, active)
        pool = status.get("pool_size")
        if isinstance(pool, int):
            report.pool_size = pool
        policy = status.get("policy_pool_sessions")
        if isinstance(policy, int):
            report.policy_sessions = max(report.policy_sessions, policy)
        stop.wait(interval)


def run_for(work: Callable[[int], None], workers: int, start: threading.Barrier,
            stop: threading.Event, seconds: float,
            started: Callable[[], None] | None = None) -> float:
    """`workers` threads running `work(index)`; each waits at `start` (which needs one
    more party: this call), and `stop` is set `seconds` after they all passed it;
    `started` is called as they do. The seconds the run really took, from the start to
    the last thread's end."""
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    if started is not None:
        started()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return time.monotonic() - t0


# How refusals by the broker's fail fast show among a load's errors: they are answered at
# once and the signer backs off, so they do not count as failures.
BUSY = "BUSY (refused at once, backed off 0.2-0.5 s; not a failure)"


def run_threads(client: Client, key: LoadedKey, clients: int, seconds: float,
                hash_alg: p.Hash = p.Hash.SHA256, scheme: p.Scheme | None = None,
                check_every: int = 1, sample: bool = True) -> LoadReport:
    """`clients` threads sign distinct digests through one shared Client for `seconds`."""
    scheme = scheme or {p.KeyType.EC: p.Scheme.ECDSA,
                        p.KeyType.RSA_PSS: p.Scheme.PSS}.get(key.key_type, p.Scheme.PKCS1)
    report = LoadReport(clients, seconds, per_client=[0] * clients)
    stop = threading.Event()
    start = threading.Barrier(clients + 1)

    def signer(index: int) -> None:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        done = bad = failed = 0
        # Uncounted: the first signature with a key may set up (a scheme checked once);
        # a failure shows again below.
        with contextlib.suppress(Exception):
            client.sign(key, hashlib.new(hash_alg.hashlib_name, b"warm-up").digest(),
                        hash_alg, scheme)
        start.wait()
        while not stop.is_set():
            digest = hashlib.new(hash_alg.hashlib_name,
                                 f"{os.getpid()}:{index}:{done}:{failed}".encode()).digest()
            t0 = time.perf_counter()
            try:
                signature = client.sign(key, digest, hash_alg, scheme)
            except BusyError:
                # Fail fast: the broker refused at once. A well-behaved client backs off
                # and tries again; the refusal is not a failure.
                errors[BUSY] = errors.get(BUSY, 0) + 1
                stop.wait(random.uniform(0.2, 0.5))
                continue
            except Exception as exc:
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if done % check_every == 0 and not verify(key.public_key, key.key_type, signature,
                                                      digest, hash_alg, scheme):
                bad += 1
            done += 1
        report.add_signer(index, done, failed, bad, latencies, errors)

    sampler_stop = threading.Event()
    sampler = threading.Thread(target=sample_sessions, args=(client, sampler_stop, report),
                               daemon=True)
    report.seconds = run_for(signer, clients, start, stop, seconds,
                             sampler.start if sample else None)
    sampler_stop.set()
    if sample:
        sampler.join()
    return report
