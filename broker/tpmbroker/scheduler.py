"""A fair queue in front of the TPM.

Connections take turns (round robin), so one client with a thousand queued
signatures cannot starve another with one. Only the server's event loop uses it:
it puts jobs in, takes the next one out whenever the TPM is free (pop), and drops
a connection's queue when it closes. No locks: one thread.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any


class Job:
    """One request for the TPM."""

    __slots__ = ("cancelled", "deadline", "done", "lane", "owner", "run")

    def __init__(self, owner: int, deadline: float, run: Callable[[], Any],
                 done: Callable[[Any, BaseException | None], None],
                 lane: Callable[[], Any] | None = None) -> None:
        self.owner = owner
        self.deadline = deadline
        self.run = run  # on the worker thread
        self.done = done  # the server calls it on the event loop with (result, error)
        self.lane = lane  # prepares its command for the lane (tpmbroker.server), tried first
        self.cancelled = False


class FairQueue:
    def __init__(self) -> None:
        # owner -> its jobs; the dict's order is the turn order
        self._queues: collections.OrderedDict[int, collections.deque[Job]] = (
            collections.OrderedDict())
        self._closed = False
        self._depth = 0

    def put(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("queue closed")
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = collections.deque()
        queue.append(job)
        self._depth += 1

    def push_front(self, job: Job) -> None:
        """Put back a job that was taken out but not served: it is next again."""
        if self._closed:
            return
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = collections.deque()
        queue.appendleft(job)
        self._queues.move_to_end(job.owner, last=False)
        self._depth += 1

    def pop(self) -> Job | None:
        """The next job, taking owners in turn; None when there is none."""
        if not self._queues:
            return None
        owner, queue = next(iter(self._queues.items()))
        job = queue.popleft()
        self._depth -= 1
        if queue:
            self._queues.move_to_end(owner)  # back of the line
        else:
            del self._queues[owner]
        return job

    def drop_owner(self, owner: int) -> list[Job]:
        """Remove and return every queued job of a closed connection."""
        queue = self._queues.pop(owner, None)
        if not queue:
            return []
        self._depth -= len(queue)
        return list(queue)

    def close(self) -> list[Job]:
        """Refuse new jobs; return the ones still waiting."""
        self._closed = True
        pending = [job for queue in self._queues.values() for job in queue]
        self._queues.clear()
        self._depth = 0
        return pending

    @property
    def depth(self) -> int:
        return self._depth
