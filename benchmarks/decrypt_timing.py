"""Does a bad PKCS#1 v1.5 padding take a different time to decrypt than a good one?

Starts swtpm and a broker, makes an RSA-2048 key, then decrypts N good and N bad-padding
ciphertexts through the broker (Python client, implicit rejection on), in random order,
timing each round trip; and times the broker's depadding alone (tpm/depad.c) on good and
bad encoded blocks. Prints the distributions, the difference of the medians beside the
spread of the round trips themselves, and a Mann-Whitney U test (normal approximation).

    python -m benchmarks.decrypt_timing [-n 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.processes import BrokerProcess
from tpmbroker.simulator import Swtpm


def _raw(pub: rsa.RSAPublicKey, block: bytes) -> bytes:
    numbers = pub.public_numbers()
    return pow(int.from_bytes(block, "big"), numbers.e, numbers.n).to_bytes(len(block), "big")


def _summary(name: str, values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return (f"{name:>8}: n={len(values)} median {statistics.median(values):9.1f} "
            f"p5 {q[4]:9.1f} p25 {q[24]:9.1f} p75 {q[74]:9.1f} p95 {q[94]:9.1f} "
            f"stdev {statistics.stdev(values):8.1f}")


def mann_whitney(a: list[float], b: list[float]) -> tuple[float, float]:
    """(U statistic, two-sided p-value) by the normal approximation, ties averaged."""
    ranked = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    rank_a = sum(r for r, (_, group) in zip(ranks, ranked, strict=True) if group == 0)
    n1, n2 = len(a), len(b)
    u = rank_a - n1 * (n1 + 1) / 2
    mean, sd = n1 * n2 / 2, math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    z = (u - mean) / sd
    return u, math.erfc(abs(z) / math.sqrt(2))


def through_the_broker(socket: str, n: int) -> tuple[list[float], list[float]]:
    with Client(socket) as client:
        der, spki = client.generate_key(p.KeyType.RSA, 2048, usage=p.Usage.DECRYPT)
        key = client.load_key(der)
        pub = serialization.load_der_public_key(spki)
        assert isinstance(pub, rsa.RSAPublicKey)
        good = [(True, pub.encrypt(os.urandom(32), padding.PKCS1v15())) for _ in range(n)]
        bad = [(False, _raw(pub, b"\x00\x01" + os.urandom(254))) for _ in range(n)]
        jobs = good + bad
        random.shuffle(jobs)
        for _, ciphertext in jobs[:50]:  # warm up: key resident, secret derived
            client.decrypt(key, ciphertext)
        times: dict[bool, list[float]] = {True: [], False: []}
        for is_good, ciphertext in jobs:
            start = time.perf_counter_ns()
            client.decrypt(key, ciphertext)
            times[is_good].append((time.perf_counter_ns() - start) / 1000)
    return times[True], times[False]


def depadding_alone(n: int) -> tuple[list[float], list[float]]:
    from tpmbroker.tpm import depad

    secret, k = os.urandom(32), 256
    ct = os.urandom(k)
    bad_em = b"\x00\x01" + os.urandom(254)
    # The good message as long as the synthetic one: the output's length (public either
    # way) costs time of its own, and this compares good with bad, nothing else.
    length = len(depad.pkcs1(bad_em, ct, secret, True))
    good_em = b"\x00\x02" + bytes(random.randint(1, 255) for _ in range(k - 3 - length)) + \
        b"\x00" + os.urandom(length)
    jobs = [(True, good_em)] * n + [(False, bad_em)] * n
    random.shuffle(jobs)
    times: dict[bool, list[float]] = {True: [], False: []}
    for is_good, em in jobs:
        start = time.perf_counter_ns()
        depad.pkcs1(em, ct, secret, True)
        times[is_good].append((time.perf_counter_ns() - start) / 1000)
    return times[True], times[False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="ciphertexts of each kind")
    args = parser.parse_args()
    print("microseconds per decryption; good = valid PKCS#1 v1.5 padding, bad = invalid")
    with tempfile.TemporaryDirectory(prefix="decrypt-timing-") as tmp:
        tpm = Swtpm(Path(tmp) / "tpm")
        tpm.start()
        try:
            with BrokerProcess(tpm.tcti, Path(tmp) / "broker") as broker:
                good, bad = through_the_broker(broker.socket, args.n)
        finally:
            tpm.stop()
    print("round trip through the broker and swtpm:")
    print(_summary("good", good))
    print(_summary("bad", bad))
    diff = statistics.median(bad) - statistics.median(good)
    iqr = statistics.quantiles(good + bad, n=4)
    print(f"  median(bad) - median(good) = {diff:+.1f} us; interquartile range of all "
          f"round trips {iqr[2] - iqr[0]:.1f} us")
    u, pval = mann_whitney(good, bad)
    print(f"  Mann-Whitney U = {u:.0f}, two-sided p = {pval:.3f}")
    good_d, bad_d = depadding_alone(args.n * 10)
    print("depadding alone (tpm/depad.c through cffi, no TPM):")
    print(_summary("good", good_d))
    print(_summary("bad", bad_d))
    u, pval = mann_whitney(good_d, bad_d)
    print(f"  median(bad) - median(good) = "
          f"{statistics.median(bad_d) - statistics.median(good_d):+.2f} us; "
          f"Mann-Whitney U = {u:.0f}, two-sided p = {pval:.3f}")


if __name__ == "__main__":
    main()
