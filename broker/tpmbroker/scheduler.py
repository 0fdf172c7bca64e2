"""A fair queue in front of the TPM.

Connections take turns (round robin), so one client with a thousand queued
signatures cannot starve another with one. Only the server's event loop uses it:
it puts jobs in, takes the next one out whenever the TPM is free (pop), and drops
a connection's queue when it closes. No locks: one thread.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Hashable
from typing import Any


class Job:
    """One request for the TPM."""

    __slots__ = ("cancelled", "cost", "deadline", "done", "kind", "lane", "owner", "queued",
                 "run")

    def __init__(self, owner: int, deadline: float, run: Callable[[], Any],
                 done: Callable[[Any, BaseException | None], None],
                 lane: Callable[[], Any] | None = None, kind: Hashable = None) -> None:
        self.owner = owner
        self.deadline = deadline
        self.run = run  # on the worker thread
        self.done = done  # the server calls it on the event loop with (result, error)
        self.lane = lane  # prepares its command for the lane (tpmbroker.server), tried first
        self.cancelled = False
        # What kind of TPM work it is (its service time is measured per kind), and its
        # expected service time in seconds (tpmbroker.admission; 0 when not known).
        self.kind = kind
        self.cost = 0.0
        self.queued = False  # in the queue now


class FairQueue:
    def __init__(self) -> None:
        # owner -> its jobs; the dict's order is the turn order
        self._queues: collections.OrderedDict[int, collections.deque[Job]] = (
            collections.OrderedDict())
        self._closed = False
        self._depth = 0
        # Expected seconds of TPM work queued, and of the jobs at the head of each
        # connection's queue (the current round), for admission (tpmbroker.admission).
        self.work = 0.0
        self.head_work = 0.0

    def put(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("queue closed")
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = collections.deque()
        if not queue:
            self.head_work += job.cost
        queue.append(job)
        job.queued = True
        self._depth += 1
        self.work += job.cost

    def push_front(self, job: Job) -> None:
        """Put back a job that was taken out but not served: it is next again."""
        if self._closed:
            return
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = collections.deque()
        if queue:
            self.head_work -= queue[0].cost
        self.head_work += job.cost
        queue.appendleft(job)
        job.queued = True
        self._queues.move_to_end(job.owner, last=False)
        self._depth += 1
        self.work += job.cost

    def pop(self) -> Job | None:
        """The next job, taking owners in turn; None when there is none."""
        if not self._queues:
            return None
        owner, queue = next(iter(self._queues.items()))
        job = queue.popleft()
        job.queued = False
        self._depth -= 1
        if queue:
            self._queues.move_to_end(owner)  # back of the line
            self.head_work += queue[0].cost - job.cost
            self.work -= job.cost
        else:
            del self._queues[owner]
            self._forget(job.cost)
        return job

    def _forget(self, head: float) -> None:
        if self._queues:
            self.head_work -= head
            self.work -= head
        else:  # empty: start from exact zeros again (no drift of float sums)
            self.head_work = self.work = 0.0

    def queued(self, owner: int) -> int:
        """How many jobs `owner` has queued."""
        queue = self._queues.get(owner)
        return len(queue) if queue is not None else 0

    def work_ahead(self, owner: int, position: int) -> float:
        """Expected work served before a job of `owner` at `position` in its queue: its
        own `position` jobs, and up to `position` + 1 of every other owner's (round
        robin; at most one round too many for owners behind it in turn)."""
        total = 0.0
        for other, queue in self._queues.items():
            take = position if other == owner else position + 1
            total += sum(job.cost for job in itertools.islice(queue, take))
        return total

    def drop_owner(self, owner: int) -> list[Job]:
        """Remove and return every queued job of a closed connection."""
        queue = self._queues.pop(owner, None)
        if not queue:
            return []
        self._depth -= len(queue)
        for job in queue:
            job.queued = False
        rest = sum(job.cost for job in queue) - queue[0].cost
        self._forget(queue[0].cost)
        self.work -= rest if self._queues else 0.0
        return list(queue)

    def close(self) -> list[Job]:
        """Refuse new jobs; return the ones still waiting."""
        self._closed = True
        pending = [job for queue in self._queues.values() for job in queue]
        for job in pending:
            job.queued = False
        self._queues.clear()
        self._depth = 0
        self.work = self.head_work = 0.0
        return pending

    @property
    def depth(self) -> int:
        return self._depth
