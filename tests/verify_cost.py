"""What verifying every signature the broker returns costs, per signature.

    .venv/bin/python -m tests.verify_cost [SECONDS]

Python client: `check_signature` (the code Client.sign runs) with and without
verification, over signatures of real software keys; the difference is the verification.
Provider: benchmarks/loadgen.c signs through tpmbroker.so against the honest fake broker
(tests/malicious_broker.py) for SECONDS (default 3) with TPMBROKER_VERIFY=1 and =0, one
thread; the difference of the median latencies is what the provider's verification adds
to a signature. (The fake answers in microseconds; a TPM takes milliseconds.)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tpmbroker import protocol as p
from tpmbroker.client import LoadedKey
from tpmbroker.keyref import KeySpec
from tpmbroker.paths import provider_path
from tpmbroker.verification import check_signature

from .malicious_broker import FakeBroker

ROOT = Path(__file__).resolve().parent.parent
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def keys() -> dict[str, Key]:
    return {
        "EC P-256": ec.generate_private_key(ec.SECP256R1()),
        "EC P-384": ec.generate_private_key(ec.SECP384R1()),
        "RSA-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "RSA-3072": rsa.generate_private_key(public_exponent=65537, key_size=3072),
    }


def python_cost(key: Key, rounds: int = 2000) -> tuple[float, float]:
    """(µs per check without verification, µs per check with it)."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = os.urandom(32)
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = p.Curve.P256 if key.curve.key_size == 256 else p.Curve.P384
        loaded = LoadedKey(KeySpec(p.KeySource.TSS2_DER, b""), bytes(32), p.KeyType.EC,
                           key.curve.key_size, curve, spki)
        sig, scheme = key.sign(digest, ec.ECDSA(prehashed)), p.Scheme.ECDSA
    else:
        loaded = LoadedKey(KeySpec(p.KeySource.TSS2_DER, b""), bytes(32), p.KeyType.RSA,
                           key.key_size, p.Curve.NONE, spki)
        sig, scheme = key.sign(digest, padding.PKCS1v15(), prehashed), p.Scheme.PKCS1
    out = []
    for verify in (False, True):
        t0 = time.perf_counter()
        for _ in range(rounds):
            check_signature(loaded, digest, p.Hash.SHA256, scheme, sig, verify=verify)
        out.append((time.perf_counter() - t0) / rounds * 1e6)
    return out[0], out[1]


def loadgen(tmp: Path) -> Path:
    exe = tmp / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "loadgen.c"),
                    "-lcrypto", "-lpthread"], check=True)
    return exe


def provider_cost(exe: Path, key: Key, tmp: Path, seconds: float) -> tuple[float, float]:
    """(median µs per signature with TPMBROKER_VERIFY=0, with =1) through the honest fake."""
    with FakeBroker(str(tmp / "fake.sock"), key=key) as fake:
        (tmp / "key.pem").write_bytes(fake.key_pem())
        (tmp / "pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        medians = []
        for verify in ("0", "1"):
            env = dict(os.environ, TPMBROKER_SOCKET=fake.path, TPMBROKER_VERIFY=verify)
            env.pop("OPENSSL_CONF", None)
            res = subprocess.run([str(exe), "timed", str(provider_path().parent),
                                  str(tmp / "key.pem"), str(tmp / "pub.pem"), "1",
                                  str(seconds)], capture_output=True, text=True, env=env,
                                 check=True)
            line = next(x for x in res.stdout.splitlines() if x.startswith("latencies_us"))
            medians.append(statistics.median(int(v) for v in line.split()[1:]))
    return medians[0], medians[1]


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print("per signature, µs      python: check  +verify   provider: verify=0  verify=1  (+)")
    with tempfile.TemporaryDirectory(prefix="verify-cost-") as d:
        tmp = Path(d)
        exe = loadgen(tmp)
        for name, key in keys().items():
            plain, verified = python_cost(key)
            off, on = provider_cost(exe, key, tmp, seconds)
            print(f"{name:10}  {plain:17.1f} {verified - plain:+8.1f}   "
                  f"{off:17.0f} {on:9.0f} {on - off:+6.0f}")


if __name__ == "__main__":
    main()
