"""`python -m benchmarks` end to end, briefly: every system runs and every output is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.results import BROKER as BROKER_SYSTEMS
from benchmarks.results import DEFAULT_SYSTEMS as SYSTEMS

CHECKOUT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENSSL_CONF", "TPMBROKER_SOCKET", "TPMBROKER_TCTI",
                        "DBUS_SESSION_BUS_ADDRESS")}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--keys", "ec:P-256",
         "--clients", "1,4", "--seconds", "0.5", "--max-processes", "2", "--out", str(out)],
        cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    data = json.loads((out / "bench.json").read_text())
    points = data["points"]
    assert {pt["system"] for pt in points} == set(SYSTEMS)
    assert data["meta"]["command"].startswith("python -m benchmarks ")
    for pt in points:
        if pt["system"] in BROKER_SYSTEMS:
            assert pt["signatures"] > 0 and pt["failures"] == 0, pt
            assert pt["bad_signatures"] == 0, pt
            assert pt["max_active_sessions"] is not None
            assert pt["max_active_sessions"] <= 2, pt  # the broker's pool, whatever the load
            # this tree's broker has the turn-around histogram in its STATUS
            assert pt["turnaround"]["command"] == "TPM2_Sign", pt
            assert pt["turnaround"]["count"] is not None, pt
            assert pt["signer_cpu_us"] > 0, pt
        else:
            assert pt["turnaround"] is None and pt["signer_cpu_us"] is None, pt
        if pt["system"].startswith("direct-"):
            assert pt["clients"] == 1 and pt["signatures"] > 0, pt
    assert {pt["clients"] for pt in points if pt["system"] == "client"} == {1, 4}
    # Each tpm2-openssl line runs where it is installed, or says why not.
    modules = data["meta"].get("tpm2_openssl_modules", {})
    for pt in points:
        if pt["system"].startswith("tpm2-openssl-"):
            if pt["system"] in modules:
                assert pt["signatures"] > 0 and not pt["note"], pt
            else:
                line = pt["system"].rsplit("-", 1)[1]
                assert pt["note"].startswith(f"no tpm2-openssl {line} "), pt

    table = (out / "bench.md").read_text()
    for system in SYSTEMS:
        assert f"| {system} | ec:P-256 |" in table
    # The verdict on the targets comes with the figures (those at 8 and 64 signers are
    # left out of a run without such points).
    assert "Against the targets:" in table
    # tpm2-openssl is compared at each release line installed (1.1 on Debian 12, 1.3 on 13).
    assert {c["target"] for c in data["targets"]} == {
        "one signer: p50 at most 150 µs over the direct loop's",
        *(f"2x {system} at equal concurrency" for system in modules),
        "broker CPU <= 100 µs per signature",
        "broker RSS <= 100 MB with 1001 idle connections"}
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "[" in run.stderr  # the progress bar


def test_operations_and_verification_side_by_side(tmp_path: Path) -> None:
    """Decryption and ECDH beside their own direct loops; signing with and without the
    signer's verification, and the report's comparison of the two."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENSSL_CONF", "TPMBROKER_SOCKET", "TPMBROKER_TCTI",
                        "DBUS_SESSION_BUS_ADDRESS")}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--systems",
         "direct-password,direct-hmac,provider,client,provider-noverify,client-noverify",
         "--keys", "ec:P-256,rsa:2048", "--ops", "sign,decrypt,derive", "--clients", "1",
         "--seconds", "0.3", "--idle-connections", "0", "--out", str(out)],
        cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    points = json.loads((out / "bench.json").read_text())["points"]
    by = {(pt["system"], pt["key"]): pt for pt in points}
    for key, command in (("rsa:2048 decrypt", "TPM2_RSA_Decrypt"),
                         ("ec:P-256 derive", "TPM2_ECDH_ZGen")):
        for system in ("direct-password", "direct-hmac", "provider", "client"):
            pt = by[(system, key)]
            assert pt["signatures"] > 0 and pt["failures"] == 0, pt
            assert pt["bad_signatures"] == 0, pt
        assert by[("provider", key)]["turnaround"]["command"] == command
        assert (("provider-noverify", key)) not in by  # signing only
    for key in ("ec:P-256", "rsa:2048"):
        for system in ("provider-noverify", "client-noverify"):
            assert by[(system, key)]["signatures"] > 0, by[(system, key)]
    table = (out / "bench.md").read_text()
    assert "| rsa:2048 decrypt | 1 |" in table and "| ec:P-256 derive | 1 |" in table
    verification = table[table.index("The signer's verification"):]
    for system in ("provider", "client"):
        for key in ("ec:P-256", "rsa:2048"):
            assert f"| {system} | {key} | 1 |" in verification
