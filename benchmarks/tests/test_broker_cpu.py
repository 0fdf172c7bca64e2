"""`python -m benchmarks.broker_cpu`: every operation beside its key type's signature."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.broker_cpu import OPERATIONS, SIGNATURE_OF

CHECKOUT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (provider|client) \| 1 \| ([^|]+) \| (\d+) \((\d+)-(\d+)\) \| (.+) \|$")


def _run(*args: str) -> list[tuple[str, ...]]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENSSL_CONF", "TPMBROKER_SOCKET", "TPMBROKER_TCTI")}
    run = subprocess.run([sys.executable, "-m", "benchmarks.broker_cpu", *args],
                         cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [m.groups() for line in run.stdout.splitlines() if (m := ROW.match(line))]


def test_each_operation_gets_a_figure_and_a_ratio_to_its_signature() -> None:
    rows = _run("--rounds", "2", "--slice", "0.1", "--clients", "1")
    assert {(system, op.strip()) for system, op, *_ in rows} == {
        (system, op) for system in ("provider", "client") for op in OPERATIONS}
    for system, op, median, low, high, ratio in rows:
        assert 0 < int(low) <= int(median) <= int(high), (system, op)
        if op.strip() in SIGNATURE_OF:
            assert re.match(r"^\d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\); <= 1 in \d of 2 rounds; "
                            r"(met|not met)$", ratio), ratio
        else:
            assert ratio == "-"


def test_instructions_are_counted_and_the_same_round_after_round() -> None:
    """The point of the instruction meter: what CPU time cannot settle in a few rounds."""
    rows = _run("--meter", "instructions", "--rounds", "2", "--slice", "1.5", "--clients", "1",
                "--systems", "client")
    assert {op.strip() for _, op, *_ in rows} == set(OPERATIONS)
    for _, op, median, low, high, _ in rows:
        # An operation is some hundreds of thousands of instructions (a few thousand of
        # them in hashing alone); the two rounds agree to a few percent.
        assert 50 < int(low) <= int(median) <= int(high) < 5000, (op, low, high)
        assert int(high) <= 1.1 * int(low), (op, low, high)
