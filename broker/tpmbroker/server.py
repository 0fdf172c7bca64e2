"""The broker daemon: Unix socket server in front of one TPM worker thread.

asyncio handles connections and framing; every TPM operation goes through the
fair queue to the worker thread, the only code that touches the TPM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import itertools
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from . import protocol as p
from .errors import (
    DeadlineError,
    InternalError,
    PermissionDeniedError,
    ProtocolError,
    Status,
    TpmBrokerError,
    UnknownKeyError,
)
from .scheduler import FairQueue, Job

log = logging.getLogger("tpmbroker.server")

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0
MAX_IN_FLIGHT = 64
# Hundreds of clients connect at once when a service starts; asyncio's default is 100.
LISTEN_BACKLOG = 1024


class Worker(Protocol):
    """What the server needs of the TPM worker (tpmbroker.tpm.TpmWorker)."""

    def open(self, deadline: float) -> None: ...
    def close(self) -> None: ...
    def load_key(self, source: p.KeySource, key: bytes, deadline: float) -> Any: ...
    def sign(self, key_id: bytes, auth: bytes, scheme: p.Scheme, hash_alg: p.HashAlg,
             digest: bytes, deadline: float) -> bytes: ...
    def generate_key(self, key_type: p.KeyType, param: int, auth: bytes, parent: int,
                     deadline: float) -> tuple[bytes, bytes]: ...
    def status(self) -> dict[str, object]: ...


@dataclasses.dataclass
class ServerConfig:
    socket_path: str
    socket_mode: int = 0o660
    socket_group: str | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    default_timeout: float = DEFAULT_TIMEOUT


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


class Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.signatures = 0
        self.errors = 0
        self.by_status: dict[str, int] = {}
        self.connections = 0
        self.connections_total = 0
        self.refused_peers = 0

    def error(self, status: int) -> None:
        self.errors += 1
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        self.by_status[name] = self.by_status.get(name, 0) + 1


class Connection:
    """One client connection: its frames, its loaded keys and their passwords."""

    _ids = itertools.count(1)

    def __init__(self, server: BrokerServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: PeerCred) -> None:
        self.id = next(self._ids)
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.keys: dict[bytes, bytes] = {}  # key id -> auth this connection presented
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, request_id: int, opcode: int, result: p.Message | p.ErrorResult) -> None:
        if self.writer.is_closing():
            return
        if isinstance(result, p.ErrorResult):
            self.server.stats.error(result.status)
        self.writer.write(p.encode_response(request_id, opcode, result))

    async def serve(self) -> None:
        frames = p.FrameReader()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                try:
                    batch = frames.feed(data)
                except ProtocolError as exc:  # bad length: framing is lost, say why and close
                    self.send(0, p.CONNECTION_ERROR, p.ErrorResult(exc.status, str(exc)))
                    log.warning("conn %d (uid %d): %s; closing", self.id, self.peer.uid, exc)
                    return
                for header, body in batch:
                    self.dispatch(header, body)
                await self.writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            await self.close()

    def dispatch(self, header: p.Header, body: bytes) -> None:
        opcode = header.opcode & ~p.RESPONSE_BIT
        try:
            msg = p.decode_request(header, body)
        except TpmBrokerError as exc:
            self.send(header.request_id, opcode, p.ErrorResult(exc.status, str(exc)))
            return
        if self.in_flight >= MAX_IN_FLIGHT:
            self.send(header.request_id, opcode, p.ErrorResult(
                Status.OVERLOADED, f"more than {MAX_IN_FLIGHT} requests in flight"))
            return
        timeout = (header.timeout_ms / 1000 if header.timeout_ms
                   else self.server.config.default_timeout)
        timeout = min(timeout, MAX_TIMEOUT)
        # The worker's deadline comes a little before the client's, so that an error that
        # says why (no sessions, TPM unreachable) reaches the client before it gives up.
        deadline = time.monotonic() + timeout - _answer_margin(timeout)
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self.handle(header.request_id, msg, deadline))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, request_id: int, msg: p.Message, deadline: float) -> None:
        try:
            result = await self.execute(msg, deadline)
            self.send(request_id, msg.OPCODE, result)
        except TpmBrokerError as exc:
            self.send(request_id, msg.OPCODE, p.ErrorResult(exc.status, exc.message, exc.tpm_rc))
        except Exception as exc:  # never let a bug take the connection down silently
            log.exception("conn %d: internal error", self.id)
            self.send(request_id, msg.OPCODE, p.ErrorResult(Status.INTERNAL, repr(exc)))
        finally:
            self.in_flight -= 1

    async def execute(self, msg: p.Message, deadline: float) -> p.Message:
        server = self.server
        if isinstance(msg, p.Hello):
            return p.HelloResult(p.VERSION, f"tpmbroker/{__version__}", p.MAX_FRAME)
        if isinstance(msg, p.Load):
            source = p.KeySource(msg.source) if msg.source in (1, 2) else None
            if source is None:
                raise ProtocolError(f"unknown key source {msg.source}")
            info = await server.submit(self.id, deadline,
                                       lambda: server.worker.load_key(source, msg.key, deadline))
            self.keys[info.key_id] = msg.auth
            return p.LoadResult(info.key_id, info.key_type, info.bits, info.curve,
                                info.public_key)
        if isinstance(msg, p.Sign):
            auth = self.keys.get(msg.key_id)
            if auth is None:
                raise UnknownKeyError("key not loaded on this connection; send LOAD first")
            scheme, hash_alg = _scheme_and_hash(msg)
            signature: bytes = await server.submit(
                self.id, deadline,
                lambda: server.worker.sign(msg.key_id, auth, scheme, hash_alg, msg.digest,
                                           deadline))
            server.stats.signatures += 1
            return p.SignResult(signature)
        if isinstance(msg, p.Generate):
            key_type = _enum(p.KeyType, msg.key_type, "key type")
            der, spki = await server.submit(
                self.id, deadline,
                lambda: server.worker.generate_key(key_type, msg.param, msg.auth, msg.parent,
                                                   deadline))
            return p.GenerateResult(der, spki)
        if isinstance(msg, p.StatusRequest):
            tpm = await server.submit(self.id, deadline, server.worker.status)
            return p.StatusResult(json.dumps(server.status(tpm), sort_keys=True))
        if isinstance(msg, p.Unload):
            self.keys.pop(msg.key_id, None)
            return p.UnloadResult()
        raise InternalError(f"no handler for {type(msg).__name__}")

    async def close(self) -> None:
        for job in self.server.queue.drop_owner(self.id):
            job.cancelled = True
        for task in list(self.tasks):
            task.cancel()
        self.keys.clear()
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


def _answer_margin(timeout: float) -> float:
    return min(0.25, max(0.0, timeout) * 0.1)


def _enum(cls: Any, value: int, what: str) -> Any:
    from .errors import UnsupportedError

    try:
        return cls(value)
    except ValueError:
        raise UnsupportedError(f"unknown {what} {value}") from None


def _scheme_and_hash(msg: p.Sign) -> tuple[p.Scheme, p.HashAlg]:
    from .errors import BadDigestError

    scheme = _enum(p.Scheme, msg.scheme, "signature scheme")
    hash_alg = _enum(p.HashAlg, msg.hash, "hash algorithm")
    if len(msg.digest) != hash_alg.digest_size:
        raise BadDigestError(f"digest of {len(msg.digest)} bytes for {hash_alg.name}, "
                             f"which needs {hash_alg.digest_size}")
    return scheme, hash_alg


class BrokerServer:
    def __init__(self, config: ServerConfig, worker: Worker) -> None:
        self.config = config
        self.worker = worker
        self.queue = FairQueue()
        self.stats = Stats()
        self.connections: dict[int, Connection] = {}
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._own_uid = os.geteuid()

    # --- worker thread -------------------------------------------------------------

    def _worker_main(self) -> None:
        while True:
            job = self.queue.next()
            if job is None:
                return
            if job.cancelled:
                continue
            if time.monotonic() >= job.deadline:
                job.done(None, DeadlineError("deadline passed while queued for the TPM"))
                continue
            try:
                result = job.run()
            except BaseException as exc:
                job.done(None, exc)
            else:
                job.done(result, None)

    async def submit(self, owner: int, deadline: float, run: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            loop.call_soon_threadsafe(settle)

        job = Job(owner, deadline, run, done)
        self.queue.put(job)
        wait = deadline - time.monotonic() + _answer_margin(deadline - time.monotonic())
        try:
            return await asyncio.wait_for(future, max(0.0, wait))
        except asyncio.TimeoutError:
            job.cancelled = True
            raise DeadlineError("deadline passed before the TPM could serve the request") from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    # --- connections -----------------------------------------------------------------

    def _allowed(self, peer: PeerCred) -> bool:
        if peer.uid in (0, self._own_uid) or peer.uid in self.config.allow_uids:
            return True
        if not self.config.allow_gids:
            return False
        groups = {peer.gid} | _supplementary_groups(peer.pid)
        return bool(groups & self.config.allow_gids)

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        if not self._allowed(peer):
            self.stats.refused_peers += 1
            log.warning("refused pid %d uid %d gid %d: not in the allowed uids/gids",
                        peer.pid, peer.uid, peer.gid)
            err = PermissionDeniedError(f"uid {peer.uid} is not allowed to use this broker")
            writer.write(p.encode_response(0, p.CONNECTION_ERROR,
                                            p.ErrorResult(err.status, str(err))))
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()
            return
        conn = Connection(self, reader, writer, peer)
        self.connections[conn.id] = conn
        self.stats.connections_total += 1
        log.info("conn %d: pid %d uid %d gid %d", conn.id, peer.pid, peer.uid, peer.gid)
        try:
            await conn.serve()
        finally:
            self.connections.pop(conn.id, None)
            log.debug("conn %d closed", conn.id)

    def status(self, tpm: dict[str, object]) -> dict[str, object]:
        return {
            "version": __version__,
            **tpm,
            "queue_depth": self.queue.depth,
            "connections": len(self.connections),
            "connections_total": self.stats.connections_total,
            "signatures": self.stats.signatures,
            "errors": self.stats.errors,
            "errors_by_status": dict(self.stats.by_status),
            "refused_peers": self.stats.refused_peers,
            "uptime_s": round(time.monotonic() - self.stats.started, 3),
        }

    # --- lifecycle ---------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = Path(self.config.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # left over by a broker that died
                else:
                    probe.close()
                    raise OSError(f"another broker is already listening on {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window in which the socket is open to everyone
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self.config.socket_group is not None:
            gid = grp.getgrnam(self.config.socket_group).gr_gid
            os.chown(path, -1, gid)
        os.chmod(path, self.config.socket_mode)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    async def start(self, open_timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._worker_main, name="tpm-worker",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + open_timeout
        # The TPM context lives on the worker thread from the first command on.
        await self.submit(0, deadline, lambda: self.worker.open(deadline))
        sock = self._bind()
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock,
                                                       limit=p.MAX_FRAME, backlog=LISTEN_BACKLOG)
        log.info("listening on %s (mode %o)", self.config.socket_path, self.config.socket_mode)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            await conn.close()
        with contextlib.suppress(Exception):
            await self.submit(0, time.monotonic() + 10, self.worker.close)
        for job in self.queue.close():
            job.cancelled = True
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        with contextlib.suppress(FileNotFoundError):
            Path(self.config.socket_path).unlink()

