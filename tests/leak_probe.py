"""Run only by test_no_leftovers.py: starts every kind of helper process, then fails."""

from __future__ import annotations

from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd, Broker


def test_starts_everything_then_fails(swtpm: Swtpm, abrmd: Abrmd,
                                      abrmd_broker: Broker) -> None:
    assert abrmd_broker.alive and abrmd.proc is not None and swtpm.proc is not None
    raise AssertionError("deliberate failure: teardown must still stop everything")
