"""The soak: 256 mixed signers against one broker for a long time; nothing fails, and the
broker's memory and descriptors stay flat.

Opt-in (it runs for minutes): TPMBROKER_SOAK_SECONDS=600 .venv/bin/pytest -q -s
tests/test_soak.py. The signers: provider threads in C (the load generator, EC and RSA)
and Python clients (tpmbroker load), over ECDSA with SHA-256 and SHA-384, RSA PKCS#1 and
RSA-PSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

SECONDS = float(os.environ.get("TPMBROKER_SOAK_SECONDS", "0"))
ROOT = Path(__file__).resolve().parent.parent
TPMBROKER = [sys.executable, "-m", "tpmbroker.cli"]
pytestmark = pytest.mark.skipif(SECONDS <= 0, reason="opt-in: set TPMBROKER_SOAK_SECONDS")
SAMPLE_EVERY = 10.0
WARM_UP = 30.0  # allocations settle: pools, caches, the first connections


def broker_usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(SECONDS + 300)  # the suite's 600 s limit is for ordinary tests
def test_soak_256_mixed_signers(swtpm: Swtpm, tmp_path: Path) -> None:
    loadgen = tmp_path / "loadgen"
    subprocess.run(["gcc", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(loadgen),
                    str(ROOT / "benchmarks" / "loadgen.c"), "-lcrypto", "-lpthread"],
                   check=True, capture_output=True)
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    env = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
    try:
        keys = {}
        for name, alg in (("ec", "ec:P-256"), ("rsa", "rsa:2048")):
            keys[name] = tmp_path / f"{name}.pem"
            subprocess.run([*TPMBROKER, "keygen", "--alg", alg, "-o", str(keys[name])],
                           check=True, capture_output=True, env=env, timeout=120)
            subprocess.run([*TPMBROKER, "pubkey", str(keys[name]), "-o",
                            str(tmp_path / f"{name}.pub")],
                           check=True, capture_output=True, env=env, timeout=60)
        moddir = str(provider_path().parent)
        seconds = f"{SECONDS:.0f}"
        signers = [  # 256 in all
            [str(loadgen), "timed", moddir, str(keys["ec"]), str(tmp_path / "ec.pub"), "64",
             seconds],
            [str(loadgen), "timed", moddir, str(keys["rsa"]), str(tmp_path / "rsa.pub"), "32",
             seconds],
            [*TPMBROKER, "load", "--key", str(keys["ec"]), "--clients", "64", "--seconds",
             seconds, "--json"],
            [*TPMBROKER, "load", "--key", str(keys["ec"]), "--clients", "32", "--hash",
             "sha384", "--seconds", seconds, "--json"],
            [*TPMBROKER, "load", "--key", str(keys["rsa"]), "--clients", "32", "--scheme",
             "pkcs1", "--seconds", seconds, "--json"],
            [*TPMBROKER, "load", "--key", str(keys["rsa"]), "--clients", "32", "--scheme",
             "pss", "--seconds", seconds, "--json"],
        ]
        # Files, not pipes: the load generator prints every latency at the end, more than
        # a pipe holds, and nobody reads the pipes until all signers are done.
        logs = [(tmp_path / f"signer{i}.out", tmp_path / f"signer{i}.err")
                for i in range(len(signers))]
        procs = []
        for cmd, (out_path, err_path) in zip(signers, logs, strict=True):
            with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
                procs.append(subprocess.Popen(cmd, stdout=out_file, stderr=err_file,
                                              env=env))
        assert broker.proc is not None
        samples: list[tuple[float, int, int]] = []
        start = time.monotonic()
        while any(p.poll() is None for p in procs):
            samples.append((time.monotonic() - start, *broker_usage(broker.proc.pid)))
            time.sleep(SAMPLE_EVERY)
        for proc in procs:
            proc.wait()
        outputs = [(o.read_text(), e.read_text()) for o, e in logs]
        status = json.loads(subprocess.run([*TPMBROKER, "status", "--json"], check=True,
                                           capture_output=True, env=env).stdout)
    finally:
        broker.stop()
    signed = 0
    for (out, err), proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, out + err
        if out.lstrip().startswith("{"):
            report = json.loads(out)
            assert report["failures"] == 0 and report["bad_signatures"] == 0, report
            signed += report["signatures"]
        else:
            threads = [line for line in out.splitlines() if line.startswith("thread ")]
            assert threads and all(" failed 0 bad 0 " in line for line in threads), out
            signed += sum(int(line.split()[3]) for line in threads)
    steady = [(t, rss, fds) for t, rss, fds in samples if t >= WARM_UP]
    assert len(steady) >= 3, samples
    first, last = steady[0], steady[-1]
    print(f"\nsoak: {signed} signatures in {SECONDS:.0f} s by 256 signers; broker RSS "
          f"{first[1]} -> {last[1]} KiB (max {max(s[1] for s in steady)}), descriptors "
          f"{first[2]} -> {last[2]}; errors by status {status.get('errors_by_status')}")
    assert status["errors"] == 0, status
    # Flat: within 10 % (and 4 MiB) of where the steady state began; descriptors equal.
    assert max(s[1] for s in steady) <= first[1] * 1.1 + 4096, samples
    assert last[2] == first[2], samples
