"""A fair queue in front of the TPM.

Connections take turns (round robin), so one client with a thousand queued
signatures cannot starve another with one. The server's event loop puts jobs in,
takes the next one out whenever the TPM is free (pop) and drops a connection's
queue when it closes.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any


class Job:
    """One request for the TPM worker; `run` is called on the worker thread."""

    __slots__ = ("cancelled", "deadline", "done", "fast", "owner", "run")

    def __init__(self, owner: int, deadline: float, run: Callable[[], Any],
                 done: Callable[[Any, BaseException | None], None],
                 fast: Callable[[], Any] | None = None) -> None:
        self.owner = owner
        self.deadline = deadline
        self.run = run  # on the worker thread
        self.done = done  # the server calls it on the event loop with (result, error)
        self.fast = fast  # a way to serve it from the event loop, tried first
        self.cancelled = False


class FairQueue:
    def __init__(self) -> None:
        self._queues: collections.OrderedDict[int, collections.deque[Job]] = (
            collections.OrderedDict())
        self._cond = threading.Condition()
        self._closed = False
        self._depth = 0

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("queue closed")
            queue = self._queues.get(job.owner)
            if queue is None:
                queue = self._queues[job.owner] = collections.deque()
            queue.append(job)
            self._depth += 1
            self._cond.notify()

    def push_front(self, job: Job) -> None:
        """Put back a job that was taken out but not served: it is next again."""
        with self._cond:
            queue = self._queues.get(job.owner)
            if queue is None:
                queue = self._queues[job.owner] = collections.deque()
            queue.appendleft(job)
            self._queues.move_to_end(job.owner, last=False)
            self._depth += 1
            self._cond.notify()

    def pop(self) -> Job | None:
        """The next job, taking owners in turn; None when there is none."""
        return self.next(timeout=0)

    def next(self, timeout: float | None = None) -> Job | None:
        """The next job, taking owners in turn; None when closed (or on timeout)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queues:
                if self._closed:
                    return None
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            owner, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            self._depth -= 1
            del self._queues[owner]
            if queue:
                self._queues[owner] = queue  # back of the line
            return job

    def drop_owner(self, owner: int) -> list[Job]:
        """Remove and return every queued job of a closed connection."""
        with self._cond:
            queue = self._queues.pop(owner, None)
            if not queue:
                return []
            self._depth -= len(queue)
            return list(queue)

    def close(self) -> list[Job]:
        with self._cond:
            self._closed = True
            pending = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._depth = 0
            self._cond.notify_all()
            return pending

    @property
    def depth(self) -> int:
        return self._depth
