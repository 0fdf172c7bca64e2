"""`python -m benchmarks` end to end, briefly: every system runs and every output is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.results import BROKER as BROKER_SYSTEMS
from benchmarks.results import SYSTEMS

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
        if pt["system"].startswith("direct-"):
            assert pt["clients"] == 1 and pt["signatures"] > 0, pt
    assert {pt["clients"] for pt in points if pt["system"] == "client"} == {1, 4}

    table = (out / "bench.md").read_text()
    for system in SYSTEMS:
        assert f"| {system} | ec:P-256 |" in table
    # The verdict on the targets comes with the figures (those at 8 and 64 signers are
    # left out of a run without such points).
    assert "Against the targets:" in table
    assert {c["target"] for c in data["targets"]} == {
        "one signer: p50 at most 150 µs over the direct loop's",
        "2x tpm2-openssl-1.1 at equal concurrency", "broker CPU <= 100 µs per signature",
        "broker RSS <= 100 MB with 1001 idle connections"}
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "[" in run.stderr  # the progress bar
