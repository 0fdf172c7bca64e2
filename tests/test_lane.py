"""The lane (tpmbroker.lane) with a real TPM worker on a real swtpm."""

from __future__ import annotations

import time

from tpmbroker.lane import Lane
from tpmbroker.scheduler import FairQueue, Job
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm.link import parse_tcti
from tpmbroker.tpm.worker import TpmWorker


def test_a_link_without_a_socket_of_ours_prepares_nothing_for_the_lane(swtpm: Swtpm) -> None:
    """Through tss2's TCTIs (/dev/tpmrm0, tpm2-abrmd; here tss2's own swtpm TCTI) every
    command is the worker thread's. The lane must not prepare one (its HMAC, its
    encryption) for the worker thread to throw away and prepare again: that doubled the
    broker's cost of preparing every command for such a TPM."""
    _, _, config = parse_tcti(swtpm.tcti)
    prepared: list[str] = []
    for tcti in (swtpm.tcti, f"libtss2-tcti-swtpm.so.0:{config}"):
        deadline = time.monotonic() + 30
        worker = TpmWorker(tcti)
        worker.open(deadline)
        try:
            lane = Lane(worker, FairQueue(), to_worker=lambda job: None, idle=lambda: None)

            def prepare(tcti: str = tcti) -> None:
                prepared.append(tcti)  # and declines: None sends the job to the worker

            job = Job(1, deadline, run=lambda: None, done=lambda result, error: None,
                      lane=prepare)
            assert lane.start(job) is False
        finally:
            worker.close()
    # The swtpm socket the broker owns is asked; tss2's TCTI is not.
    assert prepared == [swtpm.tcti]
