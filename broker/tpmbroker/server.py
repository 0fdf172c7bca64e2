"""The broker daemon: Unix socket server in front of the TPM.

asyncio handles connections and framing, and dispatches each request to its
operation (tpmbroker.ops) through the opcode table. Every TPM job goes through the
fair queue, one at a time: on the lane (tpmbroker.lane) when its operation can
prepare the command on the event loop, else on the worker thread (tpmbroker.tpm),
which has recovery. Connections are asyncio Protocols (no stream or task per
request) and each request's deadline is a loop timer.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ops, procedures
from . import protocol as p
from .access import AccessPolicy, AccessPolicyError, Peer, load_policy
from .admission import Admission
from .audit import Usage, audit
from .errors import (
    AuthFailedError,
    DeadlineError,
    PermissionDeniedError,
    ProtocolError,
    ShuttingDownError,
    Status,
    TpmBrokerError,
    UnknownKeyError,
)
from .lane import Lane
from .listener import Listener, bind
from .metrics import SERVICE_BOUNDS, TextfileWriter
from .scheduler import FairQueue, Job
from .tpm.worker import TpmWorker
from .version import __version__

log = logging.getLogger("tpmbroker.server")

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0
MAX_IN_FLIGHT = 64
FRAME_TIMEOUT = 5.0
# An orderly stop (SIGTERM, SIGINT): requests already received have this long to be
# served before the rest are answered SHUTTING_DOWN; then answers have FLUSH_SECONDS to
# leave, and the worker CLOSE_SECONDS to flush the TPM and send TPM2_Shutdown(STATE).
# All of it must fit in systemd's TimeoutStopSec (contrib/systemd/tpmbroker.service).
DRAIN_SECONDS = 5.0
READ_GRACE_SECONDS = 0.05
FLUSH_SECONDS = 1.0
CLOSE_SECONDS = 8.0
JOIN_SECONDS = 3.0


# The procedures' table (opcode -> serve), read on every request.
_SERVE = procedures.SERVE


@dataclasses.dataclass
class ServerConfig:
    socket_path: str
    socket_mode: int = 0o660
    socket_group: str | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    default_timeout: float = DEFAULT_TIMEOUT
    max_keys_per_connection: int = 1024
    # An incomplete frame older than this closes its connection (slowloris).
    frame_timeout: float = FRAME_TIMEOUT
    policy: AccessPolicy | None = None  # per-key access control (tpmbroker.access)
    policy_path: str | None = None  # where it was read from: SIGHUP reads it again
    usage_interval: float = 3600.0  # seconds between audit usage summaries
    # Who may change persistent handles (PERSIST, EVICT), besides root and the broker's
    # own uid (docs/security.md, Persistent handles).
    admin_uids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()
    # Prometheus metrics written to this file (node_exporter's textfile collector reads
    # it) every metrics_interval seconds; None: none (tpmbroker.metrics).
    metrics_file: str | None = None
    metrics_interval: float = 15.0


@dataclasses.dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def _supplementary_groups(pid: int) -> set[int]:
    # SO_PEERCRED names only the primary group; /proc tells the rest while the peer lives.
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def _answer_margin(timeout: float) -> float:
    """How much earlier than the client's deadline the worker's falls.

    So that an error that says why (no sessions, TPM unreachable) reaches the client
    before it gives up waiting.
    """
    return min(0.25, max(0.0, timeout) * 0.1)


class Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.served: collections.Counter[str] = collections.Counter()  # ops' own counters
        self.answered: collections.Counter[int] = collections.Counter()  # successes by opcode
        self.errors = 0
        self.by_status: collections.Counter[str] = collections.Counter()
        self.connections_total = 0
        self.refused_peers = 0
        self.refused_keys = 0
        # (operation, key type) -> answers (metrics); opcode -> TPM service time counts
        # per tpmbroker.metrics.SERVICE_BOUNDS bucket, the last one +Inf.
        # (opcode, KeyType): named only when the metrics are written, off the hot path.
        self.by_key_type: collections.Counter[tuple[int, int]] = collections.Counter()
        self.service: dict[int, list[int]] = {}

    def served_by(self, opcode: int, seconds: float) -> None:
        counts = self.service.get(opcode)
        if counts is None:
            counts = self.service[opcode] = [0] * (len(SERVICE_BOUNDS) + 1)
        counts[bisect.bisect_left(SERVICE_BOUNDS, seconds)] += 1

    def error(self, status: int) -> None:
        self.errors += 1
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        self.by_status[name] += 1


class Connection(asyncio.Protocol):
    """One client connection: its frames, its loaded keys and their passwords."""

    _ids = itertools.count(1)

    def __init__(self, server: BrokerServer) -> None:
        self.id = next(self._ids)
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = PeerCred(0, -1, -1)
        self.frames = p.FrameReader()
        self.keys: dict[bytes, bytes] = {}  # key id -> auth this connection presented
        self.in_flight: set[Request] = set()  # submitted, not answered yet
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.key_names: dict[bytes, tuple[str, bytes]] = {}  # key id -> (name, public key)
        self._who: Peer | None = None
        self._frame_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_credentials(transport.get_extra_info("socket"))
        server = self.server
        if not server.allowed(self.peer):
            server.stats.refused_peers += 1
            audit("peer_refused", pid=self.peer.pid, uid=self.peer.uid, gid=self.peer.gid,
                  exe=self.who.exe)
            log.warning("refused pid %d uid %d gid %d: not in the allowed uids/gids",
                        self.peer.pid, self.peer.uid, self.peer.gid)
            err = PermissionDeniedError(f"uid {self.peer.uid} is not allowed to use this broker")
            self.send(0, p.CONNECTION_ERROR, p.ErrorResult(err.status, str(err)))
            transport.close()
            return
        server.connections[self.id] = self
        server.stats.connections_total += 1
        log.info("conn %d: pid %d uid %d gid %d", self.id, self.peer.pid, self.peer.uid,
                 self.peer.gid)

    def data_received(self, data: bytes) -> None:
        try:
            batch = self.frames.feed(data)
        except ProtocolError as exc:  # bad length: framing is lost, say why and close
            log.warning("conn %d (uid %d): %s; closing", self.id, self.peer.uid, exc)
            self.send(0, p.CONNECTION_ERROR, p.ErrorResult(exc.status, str(exc)))
            assert self.transport is not None
            self.transport.close()
            return
        for header, body in batch:
            self.dispatch(header, body)
        if batch or self._frame_timer is None or not self.frames.pending:
            self._watch_frame()  # a frame started (or none is left): its clock starts

    def _watch_frame(self) -> None:
        """Time the incomplete frame in the buffer, if any, from now on."""
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        if self.frames.pending and self.transport is not None:
            self._frame_timer = self.server.loop.call_later(
                self.server.config.frame_timeout, self._frame_too_slow)

    def _frame_too_slow(self) -> None:
        self._frame_timer = None
        timeout = self.server.config.frame_timeout
        log.warning("conn %d (uid %d): incomplete frame (%d bytes) for %.0f s; closing",
                    self.id, self.peer.uid, self.frames.pending, timeout)
        err = DeadlineError(f"incomplete frame ({self.frames.pending} bytes) for more than "
                            f"{timeout:g} s")
        self.send(0, p.CONNECTION_ERROR, p.ErrorResult(err.status, str(err)))
        assert self.transport is not None
        self.transport.close()

    def eof_received(self) -> bool:
        # shutdown(SHUT_WR) after the requests: they are still answered, then we close.
        self.eof = True
        if self.frames.pending:
            self.send(0, p.CONNECTION_ERROR, p.ErrorResult(
                Status.MALFORMED, f"connection half-closed inside a frame "
                                  f"({self.frames.pending} bytes)"))
        self._close_if_done()
        return True  # keep the write side open for the answers

    def _close_if_done(self) -> None:
        if self.eof and not self.in_flight and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
        self.server.connections.pop(self.id, None)
        for job in self.server.queue.drop_owner(self.id):
            job.cancelled = True
        for request in self.in_flight:
            request.settle(cancel=True)
        self.in_flight.clear()
        self.keys.clear()
        log.debug("conn %d closed", self.id)

    # A client that sends but does not read: stop reading it until its answers drain.
    # Not reading is then the broker's choice: the incomplete frame's clock stops.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._watch_frame()

    # --- requests ------------------------------------------------------------------------

    def send(self, request_id: int, opcode: int, result: p.Message | p.ErrorResult) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(result, p.ErrorResult):
            self.server.stats.error(result.status)
        self.transport.write(p.encode_response(request_id, opcode, result))

    def fail(self, request_id: int, opcode: int, exc: BaseException) -> None:
        if isinstance(exc, TpmBrokerError):
            self.send(request_id, opcode, p.ErrorResult(exc.status, exc.message, exc.tpm_rc))
        else:  # a bug: say so, keep serving
            log.error("conn %d: internal error", self.id, exc_info=exc)
            self.send(request_id, opcode, p.ErrorResult(Status.INTERNAL, repr(exc)))

    def dispatch(self, header: p.Header, body: bytes) -> None:
        opcode = header.opcode & ~p.RESPONSE_BIT
        request_id = header.request_id
        if self.server.stopping:
            self.fail(request_id, opcode, ShuttingDownError(
                "the broker is shutting down; connect again to its successor"))
            return
        try:
            msg = p.decode_request(header, body)
            if len(self.in_flight) >= MAX_IN_FLIGHT:
                self.send(request_id, opcode, p.ErrorResult(
                    Status.OVERLOADED, f"more than {MAX_IN_FLIGHT} requests in flight"))
                return
            timeout = (min(header.timeout_ms / 1000, MAX_TIMEOUT) if header.timeout_ms
                       else self.server.config.default_timeout)
            client_deadline = time.monotonic() + timeout
            margin = _answer_margin(timeout)
            # The worker's deadline comes first, so that its errors (no sessions, TPM
            # unreachable) are the answer; the broker's own DEADLINE answer still comes
            # before the client stops waiting.
            request = Request(self, request_id, opcode, client_deadline - margin / 2,
                              client_deadline - margin, header.timeout_ms != 0)
            _SERVE[msg.OPCODE](request, msg)
        except Exception as exc:
            self.fail(request_id, opcode, exc)

    def remember_key(self, key_id: bytes, auth: bytes) -> None:
        self.keys.pop(key_id, None)
        self.keys[key_id] = auth
        while len(self.keys) > self.server.config.max_keys_per_connection:
            # Forget the connection's least recently used key: memory stays bounded and
            # a client that uses it again gets UNKNOWN_KEY and loads it again.
            oldest = next(iter(self.keys))
            del self.keys[oldest]
            self.key_names.pop(oldest, None)

    @property
    def who(self) -> Peer:
        """The peer as the key policy sees it (groups, executable), read once."""
        if self._who is None:
            self._who = Peer.of(self.peer.pid, self.peer.uid, self.peer.gid)
        return self._who

    def check_key(self, key_id: bytes, public_key: bytes,
                  operations: tuple[str, ...] = ()) -> None:
        """PermissionDeniedError unless the key policy lets this peer use the key, and
        do each of `operations` with it (tpmbroker.access.OPERATIONS; none: LOAD)."""
        policy = self.server.config.policy
        if policy is None:
            self.key_names[key_id] = (key_id.hex()[:16], b"")
            return
        decision = policy.decide(self.who, key_id, public_key, operations)
        if not decision.allowed:
            self.server.stats.refused_keys += 1
            audit("key_refused", pid=self.peer.pid, uid=self.peer.uid, exe=self.who.exe,
                  key=decision.key, operation=decision.operation, reason=decision.reason)
            if decision.operation is None:  # the key itself, not one use of it
                self.keys.pop(key_id, None)
                self.key_names.pop(key_id, None)
            raise PermissionDeniedError(f"key {decision.key}: {decision.reason}")
        self.key_names[key_id] = (decision.key, public_key)

    def key_name(self, key_id: bytes) -> str:
        known = self.key_names.get(key_id)
        return known[0] if known is not None else key_id.hex()[:16]

    def signed(self, request: Request, error: BaseException | None) -> None:
        """Audit trail of one SIGN: usage, or an auth failure."""
        assert request.key_id is not None
        if error is None:
            self.server.usage.add(self.peer.uid, self.who.exe, self.key_name(request.key_id))
        elif isinstance(error, AuthFailedError):
            audit("auth_failure", pid=self.peer.pid, uid=self.peer.uid, exe=self.who.exe,
                  key=self.key_name(request.key_id), tpm_rc=f"0x{error.tpm_rc:x}")

    def shut_down(self) -> int:
        """The broker is stopping: answer every request still pending SHUTTING_DOWN, then
        close once the answers are written. Returns how many were answered so."""
        in_flight, self.in_flight = self.in_flight, set()
        for item in in_flight:
            item.settle(cancel=True)
            self.fail(item.request_id, item.opcode, ShuttingDownError(
                "the broker is shutting down before it could serve the request"))
        if self.transport is not None:
            self.transport.close()
        return len(in_flight)

    def expire(self, request: Request) -> None:
        if request not in self.in_flight:
            return  # answered already
        self.in_flight.remove(request)
        request.settle(cancel=True)
        self.fail(request.request_id, request.opcode,
                  DeadlineError("deadline passed before the TPM could serve the request"))
        self._close_if_done()

    def complete(self, request: Request, result: Any, error: BaseException | None) -> None:
        if request not in self.in_flight:
            return  # expired, or the connection is gone
        self.in_flight.remove(request)
        finish = request.finish
        request.settle()
        if request.key_id is not None:
            self.signed(request, error)
        if error is None:
            assert finish is not None
            try:
                self.send(request.request_id, request.opcode, finish(result))
            except Exception as exc:
                self.fail(request.request_id, request.opcode, exc)
            else:
                stats = self.server.stats
                stats.answered[request.opcode] += 1
                if request.key_id is not None:
                    key = self.server.worker.known(request.key_id)
                    if key is not None:
                        stats.by_key_type[(request.opcode, key.info.key_type)] += 1
        else:
            self.fail(request.request_id, request.opcode, error)
        self._close_if_done()


class Request:
    """One request, from its decoded frame to its answer: what its procedure sees of it
    (tpmbroker.procedures.Request), and, once submitted, its TPM work (a scheduler Job),
    how its result becomes the answer, and the timer of its deadline."""

    __slots__ = ("checked", "conn", "deadline", "finish", "job", "key_id", "opcode",
                 "reply_by", "request_id", "timer", "worker")

    def __init__(self, conn: Connection, request_id: int, opcode: int, reply_by: float,
                 deadline: float, checked: bool = False) -> None:
        self.conn = conn
        self.request_id = request_id
        self.opcode = opcode
        self.reply_by = reply_by  # the broker's own DEADLINE answer goes out then
        self.deadline = deadline  # the TPM work must be done by then
        self.checked = checked  # the client set the deadline: admission may refuse (BUSY)
        self.worker: TpmWorker = conn.server.worker
        self.key_id: bytes | None = None  # the loaded key this request uses, if any
        self.finish: Callable[[Any], p.Message] | None = None  # result -> answer, on the loop
        self.job: Job | None = None
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, result: Any, error: BaseException | None) -> None:
        """The TPM work is done (the scheduler calls this on the event loop)."""
        self.conn.complete(self, result, error)

    def settle(self, cancel: bool = False) -> None:
        """Answered, or never to be: the deadline's timer stops; with `cancel` the TPM
        work is dropped where it waits. The request, its job and `finish` (often a closure
        over the request) refer to one another: cut here, reference counting frees them
        at once. Left to the cycle collector, they made it run every few dozen requests."""
        if self.timer is not None:
            self.timer.cancel()
        job, self.job, self.finish, self.timer = self.job, None, None, None
        if cancel and job is not None:
            job.cancelled = True

    @property
    def peer_uid(self) -> int:
        return self.conn.peer.uid

    def reply(self, result: p.Message) -> None:
        self.conn.send(self.request_id, self.opcode, result)

    def submit(self, run: Callable[[], Any], finish: Callable[[Any], p.Message],
               lane: Callable[[], Any] | None = None) -> None:
        conn = self.conn
        server = conn.server
        self.finish = finish
        # Service times are measured per operation and key; a key's generation varies
        # by seconds with the TPM's luck and is never refused.
        kind = None if self.opcode == p.Opcode.GENERATE else (self.opcode, self.key_id)
        self.job = Job(conn.id, self.deadline, run, self, lane, kind)
        server.admission.admit(self.job, self.checked, server.in_service())  # or BUSY
        self.timer = server.loop.call_at(self.reply_by, conn.expire, self)
        conn.in_flight.add(self)
        server.enqueue(self.job)

    def key_auth(self, key_id: bytes, operations: tuple[str, ...] = ()) -> bytes:
        keys = self.conn.keys
        auth = keys.pop(key_id, None)
        if auth is None:
            raise UnknownKeyError("key not loaded on this connection; send LOAD first")
        keys[key_id] = auth  # most recently used last
        if self.conn.server.config.policy is not None:  # refused since it was loaded?
            self.conn.check_key(key_id, self.conn.key_names.get(key_id, ("", b""))[1],
                                operations)
        self.key_id = key_id
        return auth

    def check_key(self, key_id: bytes, public_key: bytes) -> None:
        self.conn.check_key(key_id, public_key)

    def remember_key(self, key_id: bytes, auth: bytes) -> None:
        self.conn.remember_key(key_id, auth)

    def forget_key(self, key_id: bytes) -> None:
        self.conn.keys.pop(key_id, None)
        self.conn.key_names.pop(key_id, None)

    def broker_status(self, tpm: dict[str, object]) -> dict[str, object]:
        return self.conn.server.status(tpm)

    def count(self, what: str, n: int = 1) -> None:
        self.conn.server.stats.served[what] += n

    @property
    def peer_is_admin(self) -> bool:
        return self.conn.server.admin(self.conn.peer)

    def key_holders(self) -> dict[str, list[int]]:
        holders: dict[str, list[int]] = {}
        for conn in self.conn.server.connections.values():
            for key_id in conn.keys:
                holders.setdefault(key_id.hex(), []).append(conn.peer.uid)
        return holders

    def audit(self, event: str, **fields: object) -> None:
        peer = self.conn.peer
        audit(event, logging.WARNING, pid=peer.pid, uid=peer.uid, exe=self.conn.who.exe,
              **fields)


class BrokerServer:
    def __init__(self, config: ServerConfig, worker: TpmWorker) -> None:
        self.config = config
        self.worker = worker
        self.queue = FairQueue()
        self.stats = Stats()
        self.connections: dict[int, Connection] = {}
        self.usage = Usage()
        self._usage_timer: asyncio.TimerHandle | None = None
        self.metrics: TextfileWriter | None = None
        self._thread: threading.Thread | None = None
        self._server: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_uid = os.geteuid()
        # The TPM does one thing at a time: a job on the worker thread, or the lane's
        # command; the link belongs to whichever of the two has the TPM.
        self._worker_busy = False
        self.lane = Lane(worker, self.queue, self._to_worker, self._pump, self._measured)
        # Turn-around counts only while more TPM work is ready (tpm/turnaround.py).
        worker.link.turnaround.waiting = lambda: self.queue.depth > 0 or self.lane.has_next
        self.admission = Admission(self.queue)
        self._on_worker: Job | None = None  # the job the worker thread has
        self._handoff: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Results cross back from the worker thread through a deque and one wake-up.
        self._done: collections.deque[tuple[Job, Any, BaseException | None, float]] = (
            collections.deque())
        self._wakeup_pending = False
        self.stopping = False
        self._socket_inode: int | None = None
        self._activated = False  # the socket came from systemd (listener.activated_socket)
        self.socket_path = config.socket_path  # where clients connect

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    # --- taking turns at the TPM (event loop) ---------------------------------------------

    def enqueue(self, job: Job) -> None:
        self.queue.put(job)
        self._pump()

    def _pump(self) -> None:
        """Start the next job if the TPM is free: on the lane if it can, else on the
        worker thread."""
        while not (self._worker_busy or self.lane.busy):
            job = self.queue.pop()
            if job is None:
                return
            if job.cancelled:
                continue
            if time.monotonic() >= job.deadline:
                job.done(None, DeadlineError("deadline passed while queued for the TPM"))
                continue
            if job.lane is not None and self.lane.start(job):
                break
            self.lane.release()  # the worker thread may reconnect or close the link
            self._worker_busy = True
            self._on_worker = job
            self._handoff.put(job)
        if self.lane.busy:
            self.lane.prepare_next()

    def in_service(self) -> list[Job]:
        """The jobs out of the queue and on (or next for) the TPM."""
        jobs = self.lane.jobs()
        if self._on_worker is not None:
            jobs.append(self._on_worker)
        return jobs

    def _measured(self, job: Job, seconds: float) -> None:
        """A job held the TPM `seconds` and succeeded: the admission's estimate learns."""
        if job.kind is not None:
            self.admission.times.record(job.kind, seconds)
            if isinstance(job.kind, tuple):  # (opcode, key id)
                self.stats.served_by(job.kind[0], seconds)

    def _to_worker(self, job: Job) -> None:
        job.lane = None
        self.queue.push_front(job)  # it was its turn

    # --- the worker thread -------------------------------------------------------------------

    def _worker_main(self) -> None:
        while True:
            job = self._handoff.get()
            if job is None:
                return
            started = time.monotonic()
            try:
                result = job.run()
            except BaseException as exc:
                self._finished(job, None, exc, 0.0)
            else:
                self._finished(job, result, None, time.monotonic() - started)

    def _finished(self, job: Job, result: Any, error: BaseException | None,
                  seconds: float) -> None:
        self._done.append((job, result, error, seconds))
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._wakeup_pending = False  # before draining: a later append wakes us again
        while self._done:
            job, result, error, seconds = self._done.popleft()
            self._worker_busy = False  # the worker thread runs one job at a time
            self._on_worker = None
            if error is None:
                self._measured(job, seconds)
            job.done(result, error)
        self._pump()

    async def call(self, deadline: float, run: Callable[[], Any]) -> Any:
        """Run one worker call outside any connection (start-up, shut-down)."""
        future: asyncio.Future[Any] = self.loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.enqueue(Job(0, deadline, run, settle))
        return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()) + 1.0)

    # --- connections -----------------------------------------------------------------

    def allowed(self, peer: PeerCred) -> bool:
        if peer.uid in (0, self._own_uid) or peer.uid in self.config.allow_uids:
            return True
        if not self.config.allow_gids:
            return False
        groups = {peer.gid} | _supplementary_groups(peer.pid)
        return bool(groups & self.config.allow_gids)

    def admin(self, peer: PeerCred) -> bool:
        """May `peer` change the TPM's persistent handles (PERSIST, EVICT)?"""
        if peer.uid in (0, self._own_uid) or peer.uid in self.config.admin_uids:
            return True
        if not self.config.admin_gids:
            return False
        groups = {peer.gid} | _supplementary_groups(peer.pid)
        return bool(groups & self.config.admin_gids)

    def reload_policy(self) -> bool:
        """SIGHUP: read the access policy file again. A policy that does not load is
        refused, saying where, and the one in force stays; every request checks the policy
        in force when it is served."""
        path = self.config.policy_path
        if path is None:
            log.info("SIGHUP: no access policy (--policy) to read again")
            return False
        try:
            policy = load_policy(path)
        except AccessPolicyError as exc:
            log.error("SIGHUP: the access policy was not changed: %s", exc)
            audit("policy_refused", path=path, reason=str(exc))
            return False
        self.config.policy = policy
        log.info("SIGHUP: access policy %s: %d key(s), default %s", path, len(policy.rules),
                 policy.default_name)
        audit("policy_reloaded", level=logging.INFO, path=path, keys=len(policy.rules))
        return True

    def status(self, tpm: dict[str, object]) -> dict[str, object]:
        return {
            "version": __version__,
            **tpm,
            "queue_depth": self.queue.depth,
            "connections": len(self.connections),
            "connections_total": self.stats.connections_total,
            "signatures": (self.stats.answered[p.Opcode.SIGN]
                           + self.stats.answered[p.Opcode.SIGN_MESSAGE]),
            **dict.fromkeys(ops.COUNTERS, 0),
            **self.stats.served,
            "lane_commands": self.lane.served,
            "busy_refusals": self.admission.refused,
            "tpm_service_ms": self.admission.times.snapshot(),
            "errors": self.stats.errors,
            "errors_by_status": dict(self.stats.by_status),
            "refused_peers": self.stats.refused_peers,
            "refused_keys": self.stats.refused_keys,
            "uptime_s": round(time.monotonic() - self.stats.started, 3),
            # passes of the cycle collector by generation: a request served leaves no
            # cycle, so these stay still under load (each pass stops the event loop)
            "gc_collections": [generation["collections"] for generation in gc.get_stats()],
        }

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, open_timeout: float = 30.0) -> None:
        self._loop = asyncio.get_running_loop()
        self.lane.loop = self._loop
        self._thread = threading.Thread(target=self._worker_main, name="tpm-worker",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + open_timeout
        # The TPM context lives on the worker thread from the first command on.
        await self.call(deadline, lambda: self.worker.open(deadline))
        bound = bind(self.config.socket_path, self.config.socket_mode,
                     self.config.socket_group)
        sock, self.socket_path, self._socket_inode = bound.sock, bound.path, bound.inode
        self._activated = bound.activated
        self._server = Listener(self.loop, sock, lambda: Connection(self))
        self._usage_timer = self.loop.call_later(self.config.usage_interval, self._usage)
        if self.config.metrics_file is not None:
            self.metrics = TextfileWriter(self, self.config.metrics_file,
                                          self.config.metrics_interval)
            self.metrics.start()
        if self._activated:
            log.info("listening on %s (systemd's socket: its mode and owner are the socket "
                     "unit's)", self.socket_path)
        else:
            log.info("listening on %s (mode %o)", self.socket_path, self.config.socket_mode)

    def _usage(self) -> None:
        self.usage.summary()
        self._usage_timer = self.loop.call_later(self.config.usage_interval, self._usage)

    async def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """An orderly stop: accept no more; serve what was received within `drain`
        seconds and answer the rest SHUTTING_DOWN; flush the TPM and end with
        TPM2_Shutdown(STATE) where the broker owns it alone; remove the socket."""
        if self._usage_timer is not None:
            self._usage_timer.cancel()
            self.usage.summary()  # the last interval's signatures
        self.stopping = True
        if self._server is not None:
            self._server.close()
        # Frames already in the connections' sockets are read (and queued, or answered
        # SHUTTING_DOWN) before anything is closed.
        await asyncio.sleep(READ_GRACE_SECONDS)
        in_flight = sum(len(conn.in_flight) for conn in self.connections.values())
        log.info("stopping: %d requests in flight on %d connections", in_flight,
                 len(self.connections))
        end = time.monotonic() + drain
        while (time.monotonic() < end and self._loop is not None
               and any(conn.in_flight for conn in self.connections.values())):
            await asyncio.sleep(0.01)
        refused = sum(conn.shut_down() for conn in list(self.connections.values()))
        if refused:
            log.warning("stopping: %d requests not served within %.0f s answered "
                        "SHUTTING_DOWN", refused, drain)
        end = time.monotonic() + FLUSH_SECONDS
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.01)  # closing connections write their last answers
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.abort()  # a client that does not read its answers
        self.lane.stop()
        if self._loop is not None:
            with contextlib.suppress(Exception):
                await self.call(time.monotonic() + CLOSE_SECONDS, self.worker.close)
        for job in self.queue.close():
            job.cancelled = True
        self._handoff.put(None)
        if self._thread is not None:
            await self.loop.run_in_executor(None, self._thread.join, JOIN_SECONDS)
        self._remove_socket()
        if self.metrics is not None:
            await self.metrics.stop()

    def _remove_socket(self) -> None:
        """Unlink the socket, unless a successor has bound its own there already or
        systemd holds it."""
        if self._activated:
            return
        path = Path(self.config.socket_path)
        with contextlib.suppress(FileNotFoundError):
            if self._socket_inode is None or path.lstat().st_ino == self._socket_inode:
                path.unlink()
