"""Fail fast (tpmbroker.admission): the service-time estimate, the work the fair queue
holds ahead of a request, and the admission decision."""

from __future__ import annotations

import time

import pytest

from tpmbroker.admission import MAX_JUMP, Admission, ServiceTimes
from tpmbroker.errors import BusyError
from tpmbroker.scheduler import FairQueue, Job

SIGN = (3, b"key")  # a kind of work: (opcode, key id)


def job(owner: int, seconds_left: float = 1.0, kind: object = SIGN) -> Job:
    def done(result: object, error: BaseException | None) -> None:
        raise AssertionError("not called here")

    return Job(owner, time.monotonic() + seconds_left, lambda: None, done, kind=kind)


def admitted(admission: Admission, j: Job, checked: bool = True,
             in_service: tuple[Job, ...] = ()) -> bool:
    try:
        admission.admit(j, checked, in_service)
    except BusyError:
        return False
    admission.queue.put(j)
    return True


def test_service_times_average_and_resist_outliers() -> None:
    times = ServiceTimes()
    assert times.get(SIGN) is None
    times.record(SIGN, 0.010)
    assert times.get(SIGN) == pytest.approx(0.010)
    for _ in range(50):
        times.record(SIGN, 0.050)
    assert times.get(SIGN) == pytest.approx(0.050, rel=0.01)
    before = times.get(SIGN)
    assert before is not None
    times.record(SIGN, 30.0)  # a signature that waited out a TPM restart
    assert times.get(SIGN) == pytest.approx(before + 0.2 * (before * MAX_JUMP - before))
    assert times.snapshot() == {"SIGN": pytest.approx(1000 * (times.get(SIGN) or 0), rel=1e-3)}


def test_queue_keeps_its_work_and_the_current_rounds() -> None:
    queue = FairQueue()
    jobs: dict[int, list[Job]] = {}
    for owner, cost in ((1, 1.0), (1, 2.0), (2, 4.0), (1, 8.0), (3, 16.0)):
        j = job(owner)
        j.cost = cost
        jobs.setdefault(owner, []).append(j)
        queue.put(j)
    assert (queue.work, queue.head_work) == (31.0, 21.0)  # heads: 1, 4, 16
    assert queue.queued(1) == 3 and queue.queued(7) == 0
    # A job of owner 1 at position 3: its own 3, and up to 4 of each other owner's.
    assert queue.work_ahead(1, 3) == 31.0
    # A new owner's first job waits for the current round only.
    assert queue.work_ahead(9, 0) == 21.0
    first = queue.pop()  # owner 1's first: its second is now a head
    assert first is jobs[1][0]
    assert (queue.work, queue.head_work) == (30.0, 22.0)
    queue.push_front(first)
    assert (queue.work, queue.head_work) == (31.0, 21.0)
    assert [j.cost for j in queue.drop_owner(1)] == [1.0, 2.0, 8.0]
    assert (queue.work, queue.head_work) == (20.0, 20.0)
    while queue.pop() is not None:
        pass
    assert (queue.work, queue.head_work) == (0.0, 0.0)


def test_refused_when_the_work_ahead_exceeds_the_deadline() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.050)
    for owner in range(10):  # 10 x 50 ms queued, one each
        assert admitted(admission, job(owner, seconds_left=2.0))
    late = job(99, seconds_left=0.5)
    with pytest.raises(BusyError) as refusal:
        admission.admit(late, True, ())
    assert refusal.value.expected_wait_ms == 550
    assert "exceeds the deadline" in str(refusal.value)
    assert not late.queued and admission.refused == 1
    # With the deadline to wait it, the same connection's request is admitted.
    assert admitted(admission, job(99, seconds_left=0.6))


def test_round_robin_position_decides_the_wait() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    for _ in range(20):  # one connection pipelines 20 (2 s of work)
        assert admitted(admission, job(1, seconds_left=5.0))
    # Another connection's first request is served in the current round: 100 ms ahead.
    assert admitted(admission, job(2, seconds_left=0.25))
    # Its second waits one more round: 1 more of owner 1's, its own first, then itself.
    with pytest.raises(BusyError) as refusal:
        admission.admit(job(2, seconds_left=0.35), True, ())
    assert refusal.value.expected_wait_ms == 400


def test_the_job_on_the_tpm_counts() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    on_tpm = job(5)
    on_tpm.cost = 0.3
    assert admitted(admission, job(1, seconds_left=0.35))  # nothing ahead
    with pytest.raises(BusyError):
        admission.admit(job(2, seconds_left=0.35), True, (on_tpm,))


def test_never_refused_without_an_estimate_a_deadline_or_anything_ahead() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    for owner in range(10):
        assert admitted(admission, job(owner, seconds_left=10.0))
    # A key the broker has not timed yet: admitted (cold start), at no cost.
    cold = job(20, seconds_left=0.01, kind=(3, b"other key"))
    assert admitted(admission, cold) and cold.cost == 0.0
    # A client that sent no deadline (timeout 0: the broker's default applies).
    assert admitted(admission, job(21, seconds_left=0.01), checked=False)
    # Work the broker does not time (key generation).
    assert admitted(admission, job(22, seconds_left=0.01, kind=None))
    # An idle TPM serves whatever comes, even if its estimate says it is too slow.
    idle = Admission(FairQueue())
    idle.times.record(SIGN, 5.0)
    assert admitted(idle, job(1, seconds_left=1.0))


def test_admitted_pipelined_requests_keep_their_place() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    # Owner 1 pipelines 5: its 5th waits 400 ms and has 50 ms to spare.
    for _ in range(4):
        assert admitted(admission, job(1, seconds_left=5.0))
    assert admitted(admission, job(1, seconds_left=0.55))
    # A newcomer would be served in the current round, ahead of owner 1's 2nd to 5th,
    # and push the 5th past its deadline: refused, although it would meet its own.
    with pytest.raises(BusyError) as refusal:
        admission.admit(job(2, seconds_left=5.0), True, ())
    assert "already admitted" in str(refusal.value)
    # Once owner 1's tight request has been served, newcomers are admitted again.
    while admission.queue.pop() is not None:
        pass
    assert admitted(admission, job(3, seconds_left=5.0))
    assert admitted(admission, job(4, seconds_left=5.0))  # 100 ms ahead of it now


def test_refused_connections_go_first_while_they_keep_trying() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    for owner in range(3):
        assert admitted(admission, job(owner, seconds_left=1.0))  # 300 ms queued
    # Owner 10 needs 400 ms with 350 left: refused, and it waits its turn.
    assert not admitted(admission, job(10, seconds_left=0.35))
    admission.queue.pop()  # 200 ms queued now
    # Owner 11, not refused before, would fit (300 ms of 320) but must leave owner 10 a
    # place: refused.
    with pytest.raises(BusyError) as refusal:
        admission.admit(job(11, seconds_left=0.32), True, ())
    assert "refused before go first" in str(refusal.value)
    # Owner 10 comes back and is admitted; its claim ends.
    assert admitted(admission, job(10, seconds_left=0.35))
    # Owner 11's claim stands now: it goes before a connection never refused.
    with pytest.raises(BusyError):
        admission.admit(job(12, seconds_left=0.45), True, ())
    assert admitted(admission, job(11, seconds_left=0.45))


def test_a_claim_ends_when_its_connection_is_served_by_an_idle_tpm() -> None:
    admission = Admission(FairQueue())
    admission.times.record(SIGN, 0.100)
    assert admitted(admission, job(1, seconds_left=1.0))
    assert not admitted(admission, job(10, seconds_left=0.15))  # 200 ms with 150 left
    admission.queue.pop()
    assert admitted(admission, job(10, seconds_left=0.15))  # nothing ahead now
    # No claim is left standing: the next connection needs no room kept for one.
    assert admitted(admission, job(11, seconds_left=0.25))
