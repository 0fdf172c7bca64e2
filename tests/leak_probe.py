"""Run only by test_no_leftovers.py: starts every kind of helper process, then fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd, Broker


@pytest.fixture
def broker_on_abrmd(abrmd: Abrmd, tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(abrmd.tcti, tmp_path / "broker", env=abrmd.env()).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_starts_everything_then_fails(swtpm: Swtpm, abrmd: Abrmd,
                                      broker_on_abrmd: Broker) -> None:
    assert broker_on_abrmd.alive and abrmd.proc is not None and swtpm.proc is not None
    raise AssertionError("deliberate failure: teardown must still stop everything")
