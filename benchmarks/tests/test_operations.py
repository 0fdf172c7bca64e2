"""The direct loops of decryption and ECDH: the TPM command itself, checked, on a swtpm."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import operations as ops
from benchmarks.systems import CHECK_EVERY
from tpmbroker.simulator import Swtpm


@pytest.mark.parametrize("key_label", ["rsa:2048 decrypt", "ec:P-256 derive"])
@pytest.mark.parametrize("hmac", [False, True])
def test_direct_loop_runs_the_operation(tmp_path: Path, key_label: str, hmac: bool) -> None:
    with Swtpm(tmp_path / "tpm") as tpm:
        work = ops.make_work(tpm.tcti, key_label)
        report = ops.run_direct(tpm.tcti, work, 0.3, hmac=hmac)
        assert report.failures == 0, report.errors
        assert report.signatures > 0 and report.bad_signatures == 0
        assert report.max_active_sessions == (1 if hmac else 0)

        # A wrong expectation is caught: the loop compares what the TPM returned.
        wrong = ops.Work(work.key, work.op, work.data, bytes(len(work.expected)),
                         work.peer_point)
        report = ops.run_direct(tpm.tcti, wrong, 0.2, hmac=hmac)
        checked = (report.signatures + CHECK_EVERY - 1) // CHECK_EVERY
        assert report.signatures > 0 and report.bad_signatures == checked
