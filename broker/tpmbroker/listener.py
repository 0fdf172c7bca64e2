"""The broker's listening socket (made, or systemd's), and its accept loop, with back-off
when the process runs out of descriptors.

asyncio's own loop (3.11) answers EMFILE by logging a traceback and scheduling a retry for
every slot of the backlog it tried — a thousand tracebacks per burst and a busy loop. Here a
failed accept stops accepting for a while (0.1 s, doubling to 2 s, back to the start after
an accept succeeds), and says so in one line at most every 30 s. Clients that connect
meanwhile wait in the kernel's backlog and are served when descriptors free up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import grp
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tpmbroker.server")

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FIRST_PAUSE = 0.1
MAX_PAUSE = 2.0
LOG_EVERY = 30.0
ACCEPTS_PER_WAKEUP = 64
# Hundreds of clients connect at once when a service starts; asyncio's default is 100.
LISTEN_BACKLOG = 1024
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor systemd passes


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation, tpmbroker.socket), or None
    when the broker was started without one. The socket outlives the broker, so clients
    that connect while it restarts wait in its backlog for the next one instead of
    finding no socket. Read once: the variables are removed, as sd_listen_fds(1) does,
    so no process the broker starts takes them for its own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise OSError(f"socket activation passed {count or 'no'} sockets; the broker takes "
                      "one, its Unix socket (one ListenStream= in tpmbroker.socket)")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if (sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        sock.detach()
        raise OSError("the socket systemd passed is not a listening Unix stream socket "
                      "(ListenStream=PATH in tpmbroker.socket)")
    sock.set_inheritable(False)
    return sock


@dataclasses.dataclass(frozen=True)
class Bound:
    sock: socket.socket  # listening, non-blocking
    path: str
    inode: int | None  # of the socket file the broker made; None: systemd's
    activated: bool  # systemd's (socket activation): never unlinked by the broker


def bind(path_name: str, mode: int, group: str | None) -> Bound:
    """The socket systemd passed, as it is, else a new one at `path_name` with `mode`
    and `group`: a stale one left by a broker that died is replaced, a live one refused."""
    activated = activated_socket()
    if activated is not None:
        activated.setblocking(False)
        return Bound(activated, activated.getsockname(), None, True)
    path = Path(path_name)
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
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)
    inode = path.lstat().st_ino
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return Bound(sock, str(path), inode, False)


class Listener:
    """Accepts on a listening socket and hands each connection to `factory`'s protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.pause = FIRST_PAUSE
        self.paused_total = 0  # accept failures for want of descriptors
        self._suppressed = 0
        self._last_log = -LOG_EVERY
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[object]] = set()
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    log.warning("accept failed: %s", exc)
                    return
                self._back_off(exc)
                return
            self.pause = FIRST_PAUSE
            conn.setblocking(False)
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as exc:
            conn.close()
            log.debug("could not set up an accepted connection: %s", exc)

    def _back_off(self, exc: OSError) -> None:
        self.paused_total += 1
        self.loop.remove_reader(self.sock.fileno())
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("accept paused: %s; retrying in %.1f s%s", exc.strerror, self.pause, more)
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        self._resume = self.loop.call_later(self.pause, self._restart)
        self.pause = min(self.pause * 2, MAX_PAUSE)

    def _restart(self) -> None:
        self._resume = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        """Stop accepting and close the listening socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
