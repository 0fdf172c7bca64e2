"""Fail fast: admit a request only if the TPM can serve it before its deadline.

The broker knows its queue (tpmbroker.scheduler) and how long the TPM has recently taken
for each kind of work: an exponentially weighted moving average of the time the TPM was
held, per operation and key (so a P-256 key and an RSA-2048 key each have their own).
When a request arrives, its expected wait is

    the work on the TPM now  +  the work queued ahead of it  +  its own service time

where "ahead" follows the fair queue's round robin: a connection with k requests queued
gets its new one served in round k, after at most k + 1 of every other connection's.
A request whose expected wait exceeds its remaining deadline is answered BUSY at once,
with the estimate, instead of waiting its deadline out. Admission is decided once, on
arrival; an admitted request is never refused later and keeps its place:

- a request that joins the current round lands ahead of every connection's later
  rounds, so it is admitted only if the pipelined requests already admitted there
  still meet their deadlines with it ahead of them (their slack is kept in a heap);
- nothing is refused while nothing is ahead of it (an idle TPM serves whatever comes,
  so a stale estimate corrects itself), nor when the estimate is unknown (a key's first
  requests), nor when the client gave no deadline of its own (timeout 0: the broker's
  default applies, as before).

Only the event loop uses this module: no locks.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Hashable, Iterable

from .definitions import Opcode
from .errors import BusyError
from .scheduler import FairQueue, Job

# Weight of the newest sample in the moving average: about the last ten count.
ALPHA = 0.2
# A sample is taken as at most this many times the current estimate (a signature that
# waited out a TPM restart says little about the next one); the estimate still follows a
# slower TPM within a few samples.
MAX_JUMP = 4.0
# How long a refused connection keeps its claim to go first (tpmbroker.admission): its
# client is expected to try again within this time.
WAITING_HOLD = 2.0
# The share of a request's remaining time the estimate may fill: the estimate is an
# average, and a request admitted with no room to spare misses its deadline by the jitter
# of the TPM and of the host (seen on the chip model: 1 in 900 at 100 %).
SAFETY = 0.95
# Kinds of work remembered (per operation and key): the broker keeps at most 4096 keys.
MAX_KINDS = 8192


class ServiceTimes:
    """The TPM's recent service time per kind of work, in seconds."""

    def __init__(self) -> None:
        self._ewma: dict[Hashable, float] = {}

    def get(self, kind: Hashable) -> float | None:
        return self._ewma.get(kind)

    def record(self, kind: Hashable, seconds: float) -> None:
        ewma = self._ewma
        old = ewma.get(kind)
        if old is None:
            if len(ewma) >= MAX_KINDS:
                del ewma[next(iter(ewma))]  # the oldest kind seen
            ewma[kind] = seconds
        else:
            ewma[kind] = old + ALPHA * (min(seconds, old * MAX_JUMP) - old)

    def snapshot(self) -> dict[str, float]:
        """Milliseconds per operation, averaged over its keys (status)."""
        by_op: dict[str, list[float]] = {}
        for kind, seconds in self._ewma.items():
            op = kind[0] if isinstance(kind, tuple) else kind
            name = Opcode(op).name if isinstance(op, int) and op in set(Opcode) else str(op)
            by_op.setdefault(name, []).append(seconds)
        return {name: round(1000 * sum(v) / len(v), 3) for name, v in by_op.items()}


class Admission:
    """The admission decision and the bookkeeping it needs."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.times = ServiceTimes()
        self.refused = 0
        # Pipelined requests already admitted behind the current round, by the latest
        # time (less `_ahead`) they may start and still meet their deadlines.
        self._protected: list[tuple[float, int, Job]] = []
        self._ahead = 0.0  # work admitted into the current round since (seconds)
        self._seq = itertools.count()
        # Connections refused lately, oldest first (owner -> when). While there are any,
        # a connection not among them is admitted only if the queue keeps room for one
        # request of each: otherwise the connections just served, whose next request
        # comes the moment a place frees, would take every place and the refused ones
        # none.
        self._waiting: collections.OrderedDict[int, float] = collections.OrderedDict()

    def admit(self, job: Job, checked: bool, in_service: Iterable[Job]) -> None:
        """Give `job` its estimated cost, or raise BusyError. `checked`: the client gave a
        deadline of its own; `in_service`: the jobs out of the queue on the TPM now."""
        own = self.times.get(job.kind) if job.kind is not None else None
        job.cost = own or 0.0
        if own is None:
            return
        queue = self.queue
        queued = queue.queued(job.owner)
        if not checked:
            if queued == 0:
                self._ahead += own
            return
        now = time.monotonic()
        remaining = job.deadline - now
        budget = remaining * SAFETY
        busy = sum(j.cost for j in in_service)
        if queued == 0:
            wait = busy + queue.head_work  # the end of the current round
        elif busy + queue.work + own <= budget:
            wait = busy + queue.work  # more than it can be: fits anyway
        else:
            wait = busy + queue.work_ahead(job.owner, queued)
        if wait <= 0.0:  # nothing ahead of it: the TPM serves it now
            self._waiting.pop(job.owner, None)
            return
        if wait + own > budget:
            self._refuse(job.owner, now, wait + own, remaining)
        waiting = self._waiting
        if waiting and job.owner not in waiting:
            while waiting and next(iter(waiting.values())) < now - WAITING_HOLD:
                waiting.popitem(last=False)  # it did not come back
            reserve = len(waiting) * own
            if wait + own + reserve > budget:
                self._refuse(job.owner, now, wait + own + reserve, remaining,
                             "connections refused before go first")
        if queued == 0:
            if not self._fits_ahead_of_admitted(own):
                self._refuse(job.owner, now, wait + own + self._protected_wait(), remaining,
                             "requests already admitted would miss their deadlines")
            self._ahead += own
        else:
            slack = budget - wait - own
            heapq.heappush(self._protected, (slack + self._ahead, next(self._seq), job))
        waiting.pop(job.owner, None)

    def _fits_ahead_of_admitted(self, own: float) -> bool:
        heap = self._protected
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)  # served, cancelled or dropped since
        if not heap:
            self._ahead = 0.0
            return True
        return heap[0][0] - self._ahead >= own

    def _protected_wait(self) -> float:
        """How much admitted work the protected requests still wait for, at most."""
        return max(0.0, self.queue.work - self.queue.head_work)

    def _refuse(self, owner: int, now: float, wait: float, remaining: float,
                why: str = "") -> None:
        self.refused += 1
        self._waiting[owner] = now  # its claim lasts while it keeps trying
        self._waiting.move_to_end(owner)
        because = f" ({why})" if why else ""
        raise BusyError(f"tpmbroker is busy: expected wait {round(wait * 1000)} ms exceeds "
                        f"the deadline ({max(0, round(remaining * 1000))} ms left){because}")
