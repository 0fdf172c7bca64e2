"""The lane: the event loop's own path to the TPM, for the common signature.

Handing a request to the worker thread and back costs two thread switches, with the GIL
handed over each time: more CPU than the signature. So when a job's operation can
prepare its TPM command without talking to the TPM (tpmbroker.procedures.sign: key resident,
pool session ready, a swtpm link), the lane sends that command on the TPM's socket and
reads the answer when the loop says it is readable. Anything else, or anything unusual
on the way, goes to the worker thread, which has recovery.

The link has one owner at a time. The server starts a job on the lane only while the
worker thread is idle, and calls `release()` before it hands the next job to the worker
thread; between the two, only this class reads or writes the socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import DeadlineError, NotForLane, TpmUnavailableError
from .scheduler import FairQueue, Job
from .tpm.link import split_response

if TYPE_CHECKING:
    from .tpm.worker import TpmWorker

log = logging.getLogger("tpmbroker.lane")

# How long past its request's deadline a command on the lane may stay unanswered before
# the TPM connection is given up (the worker then reconnects and recovers).
GRACE = 5.0


class _OutOnTheTpm:
    """The one command the lane has out on the TPM socket."""

    __slots__ = ("command", "give_up_at", "job", "received", "sent", "sock")

    def __init__(self, job: Job, command: Any, sock: socket.socket, give_up_at: float,
                 sent: float) -> None:
        self.job = job
        self.command = command  # the worker's LaneCommand
        self.sock = sock
        self.give_up_at = give_up_at  # after this the TPM counts as stuck
        self.sent = sent  # when the command went to the TPM
        self.received = b""


class Lane:
    def __init__(self, worker: TpmWorker, queue: FairQueue,
                 to_worker: Callable[[Job], None], idle: Callable[[], None],
                 measured: Callable[[Job, float], None] | None = None) -> None:
        self.worker = worker
        # told how long the TPM took for each job served (tpmbroker.admission)
        self.measured = measured
        self.queue = queue
        self.to_worker = to_worker  # gives a job back to the queue, for the worker thread
        self.idle = idle  # called when the lane has finished a command (the server pumps)
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the server's start
        self.served = 0
        self._out: _OutOnTheTpm | None = None
        # With two pool sessions, the next command is prepared (HMAC, encryption) on the
        # other one while the TPM works on the current one, and sent the moment its
        # answer arrives: the TPM does not wait for the broker's arithmetic.
        self._next: tuple[Job, Any] | None = None
        # The TPM socket stays registered with the loop between commands (adding and
        # removing a reader costs a fifth of a signature); never while the worker thread
        # may close it or reconnect.
        self._reader: socket.socket | None = None
        # One watchdog, re-armed only when it fires: a timer per command (call_at and
        # cancel) cost more than the rest of the bookkeeping.
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return self._out is not None

    def jobs(self) -> list[Job]:
        """The job whose command is out on the TPM and the one prepared next, if any."""
        jobs = [self._out.job] if self._out is not None else []
        if self._next is not None:
            jobs.append(self._next[0])
        return jobs

    def start(self, job: Job) -> bool:
        """Send `job`'s command if it can take the lane; False: the worker thread's."""
        sock = self.worker.lane_socket()
        if sock is None:
            # No socket of ours (tss2's TCTIs: /dev/tpmrm0, tpm2-abrmd), or none open: a
            # command prepared here would be thrown away and prepared again there.
            return False
        command = self._prepare(job)
        return command is not None and self._send(job, command, sock)

    @property
    def has_next(self) -> bool:
        """A command is prepared to go out as soon as the TPM answers the current one."""
        return self._next is not None

    def prepare_next(self) -> None:
        """While a command is out, prepare the next job's (if it can take the lane)."""
        if self._next is not None or self._out is None:
            return
        while (job := self.queue.pop()) is not None:
            if job.cancelled:
                continue
            if time.monotonic() >= job.deadline:
                job.done(None, DeadlineError("deadline passed while queued for the TPM"))
                continue
            command = self._prepare(job) if job.lane is not None else None
            if command is None:
                self.queue.push_front(job)  # its turn comes when the TPM is free
            else:
                self._next = (job, command)
            return

    def release(self) -> None:
        """Stop watching the socket: the worker thread is about to use the link."""
        if self._reader is not None:
            assert self.loop is not None
            self.loop.remove_reader(self._reader.fileno())
            self._reader = None

    def stop(self) -> None:
        self._drop_next()
        if self._out is not None:  # its answer would find no one to give it to
            self._abort(self._end().command)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.release()

    # --- inside ------------------------------------------------------------------------

    @staticmethod
    def _prepare(job: Job) -> Any:
        """The worker's prepared command for `job`, or None (the worker thread's then)."""
        try:
            assert job.lane is not None
            return job.lane()
        except Exception:  # anything unusual: the worker thread's path says what
            return None

    def _send(self, job: Job, command: Any, sock: socket.socket | None) -> bool:
        """Send on `sock`, the link's socket (asked for by the caller), if it has one."""
        if sock is None:
            self.worker.lane_cancel(command)
            return False
        self.worker.link.turnaround.sent(command.pending.command)
        try:
            sent = sock.send(command.frame)
        except OSError:
            sent = -1
        if sent != len(command.frame):
            self._abort(command)
            return False  # the worker thread reconnects and serves it
        loop = self.loop
        assert loop is not None
        now = time.monotonic()
        give_up_at = max(job.deadline, now) + GRACE
        self._out = _OutOnTheTpm(job, command, sock, give_up_at, now)
        if self._watchdog is None:
            self._watchdog = loop.call_at(give_up_at, self._watch)
        if self._reader is not sock:
            self.release()
            loop.add_reader(sock.fileno(), self._readable)
            self._reader = sock
        return True

    def _send_next(self) -> None:
        queued, self._next = self._next, None
        if queued is None:
            return
        job, command = queued
        if job.cancelled or time.monotonic() >= job.deadline:
            self.worker.lane_cancel(command)
            if not job.cancelled:
                job.done(None, DeadlineError("deadline passed while queued for the TPM"))
        elif not self._send(job, command, self.worker.lane_socket()):
            self.to_worker(job)

    def _drop_next(self) -> None:
        """The TPM link is in doubt: the prepared command goes back, unsent."""
        queued, self._next = self._next, None
        if queued is not None:
            self.worker.lane_cancel(queued[1])
            self.to_worker(queued[0])

    def _abort(self, command: Any) -> None:
        """The TPM connection is in an unknown state: let the worker drop it."""
        self.release()
        self.worker.lane_abort(command)

    def _end(self) -> _OutOnTheTpm:
        out = self._out
        assert out is not None
        self._out = None
        return out

    def _readable(self) -> None:
        out = self._out
        if out is None:  # the TPM spoke unasked: it closed, or the framing is lost
            self._abort(None)
            return
        response = None
        try:
            data = out.sock.recv(65536)
            if data:
                received = out.received + data if out.received else data
                response = split_response(received)
                if response is None:
                    out.received = received
                    return  # more to come
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end()
        job = out.job
        if response is None:  # the connection broke: its fate is unknown
            self._drop_next()
            self._abort(out.command)
            self.to_worker(job)
        else:
            now = time.monotonic()
            took = now - out.sent
            self.worker.link.turnaround.answered(now)
            self._send_next()  # the TPM starts on the next one while we finish this
            try:
                result = self.worker.lane_finish(out.command, response)
            except NotForLane:
                self.to_worker(job)
            except Exception as exc:
                job.done(None, exc)
            else:
                self.served += 1
                if self.measured is not None:
                    self.measured(job, took)
                job.done(result, None)
        self.idle()

    def _watch(self) -> None:
        self._watchdog = None
        out = self._out
        if out is None:
            return  # re-armed by the next command sent
        loop = self.loop
        assert loop is not None
        if time.monotonic() < out.give_up_at:
            self._watchdog = loop.call_at(out.give_up_at, self._watch)
            return
        self._end()
        log.warning("the TPM did not answer a command for %.0f s; reconnecting", GRACE)
        self._drop_next()
        self._abort(out.command)
        out.job.done(None, TpmUnavailableError("the TPM did not answer"))
        self.idle()
