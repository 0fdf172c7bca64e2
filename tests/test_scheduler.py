"""The fair queue: connections take turns, whatever each has queued."""

from __future__ import annotations

import pytest

from tpmbroker.scheduler import FairQueue, Job


def job(owner: int, tag: str) -> Job:
    def done(result: object, error: BaseException | None) -> None:
        raise AssertionError("not called here")

    j = Job(owner, 0.0, lambda: tag, done)
    return j


def drain(queue: FairQueue) -> list[str]:
    out = []
    while (j := queue.pop()) is not None:
        out.append(j.run())
    return out


def test_owners_take_turns() -> None:
    queue = FairQueue()
    for i in range(5):
        queue.put(job(1, f"a{i}"))
    queue.put(job(2, "b0"))
    queue.put(job(3, "c0"))
    queue.put(job(2, "b1"))
    assert queue.depth == 8
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    assert queue.depth == 0


def test_push_front_makes_a_job_next_again() -> None:
    queue = FairQueue()
    queue.put(job(1, "a0"))
    queue.put(job(2, "b0"))
    queue.put(job(1, "a1"))
    first = queue.pop()
    assert first is not None and first.run() == "a0"
    queue.push_front(first)
    assert drain(queue) == ["a0", "b0", "a1"]


def test_dropping_an_owner_and_closing() -> None:
    queue = FairQueue()
    queue.put(job(1, "a0"))
    queue.put(job(2, "b0"))
    queue.put(job(1, "a1"))
    assert [j.run() for j in queue.drop_owner(1)] == ["a0", "a1"]
    assert queue.depth == 1
    assert queue.drop_owner(7) == []
    assert [j.run() for j in queue.close()] == ["b0"]
    with pytest.raises(RuntimeError):
        queue.put(job(3, "c0"))
    assert queue.pop() is None
