"""Synchronous broker client: thread-safe, fork-safe, reconnecting, with deadlines.

A Client keeps a small pool of connections; each request borrows one for its
round trip, so threads never interleave on a socket. Keys are remembered by the
client, not the connection: a connection that has not loaded a key yet (a new
one, or one to a restarted broker) answers UNKNOWN_KEY, and the client loads the
key there and retries. After fork() the child drops the parent's connections
and opens its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from . import __version__, ops
from . import protocol as p
from .errors import (
    BrokerUnavailableError,
    DeadlineError,
    ProtocolError,
    ShuttingDownError,
    TpmBrokerError,
    UnknownKeyError,
    error_for_status,
)
from .keyfile import KeySpec
from .paths import default_socket

DEFAULT_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class LoadedKey:
    """A key the broker knows. Holds what is needed to load it again anywhere."""

    spec: KeySpec
    key_id: bytes
    key_type: p.KeyType
    bits: int
    curve: p.Curve
    public_key: bytes  # SubjectPublicKeyInfo DER

    def __repr__(self) -> str:
        return (f"LoadedKey({self.key_type.name}, {self.bits} bits, "
                f"id={self.key_id[:6].hex()}…)")


class _Connection:
    def __init__(self, path: str, deadline: float) -> None:
        self.sock = self._connect(path, deadline)
        self.reader = p.FrameReader()
        # key id -> the password it was loaded with here: the broker signs with that one
        self.loaded: dict[bytes, bytes] = {}
        self.next_id = 1

    @staticmethod
    def _connect(path: str, deadline: float) -> socket.socket:
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                # EAGAIN: the listen backlog is full for a moment; a broker is there.
                sock.close()
                if time.monotonic() + delay >= deadline:
                    raise DeadlineError(f"tpmbroker at {path} is too busy to accept a "
                                        "connection before the deadline") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                sock.close()
                raise BrokerUnavailableError(
                    f"cannot reach tpmbroker at {path}: {exc.strerror or exc}; is `tpmbroker "
                    f"serve` running there? (set TPMBROKER_SOCKET or pass socket=)") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def round_trip(self, msg: p.Message, deadline: float) -> p.Message:
        request_id = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFF) + 1
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        self._settimeout(deadline)
        try:
            self.sock.sendall(p.encode_request(request_id, msg, remaining_ms))
        except (BrokenPipeError, ConnectionResetError):
            # The broker may have said why before it closed (a process it does not
            # admit): that answer is already here to read.
            self._raise_connection_error(min(deadline, time.monotonic() + 0.2))
            raise
        while True:
            self._settimeout(deadline)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("broker closed the connection")
            for header, body in self.reader.feed(data):
                result = p.decode_response(header, body)
                if header.request_id == 0 and isinstance(result, p.ErrorResult):
                    raise error_for_status(result.status, result.message, result.tpm_rc)
                if header.request_id != request_id:
                    continue  # a late answer to a request we gave up on
                if isinstance(result, p.ErrorResult):
                    raise error_for_status(result.status, result.message, result.tpm_rc)
                return result

    def _raise_connection_error(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                self._settimeout(deadline)
                data = self.sock.recv(65536)
                if not data:
                    return
                for header, body in self.reader.feed(data):
                    result = p.decode_response(header, body)
                    if header.request_id == 0 and isinstance(result, p.ErrorResult):
                        raise error_for_status(result.status, result.message, result.tpm_rc)
        except (OSError, TimeoutError, ProtocolError):
            return

    def _settimeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)


class Client:
    """A client of one broker. Share one instance between threads; it survives fork()."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_connections: int = 16) -> None:
        self.socket_path = str(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self.max_connections = max_connections
        self._reset()
        _live_clients.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._idle: list[_Connection] = []
        self._open = 0

    def _after_fork_in_child(self) -> None:
        # The parent's sockets are shared with it: close our copies, never shut them down.
        for conn in self._idle:
            conn.close()
        self._reset()

    # --- connection pool ---------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, deadline: float) -> Iterator[_Connection]:
        if os.getpid() != self._pid:  # fork without os.register_at_fork (e.g. os.fork in C)
            self._after_fork_in_child()
        with self._available:
            while not self._idle and self._open >= self.max_connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._available.wait(remaining):
                    raise DeadlineError("no free connection to the broker before the deadline")
            if self._idle:
                conn = self._idle.pop()
            else:
                self._open += 1
                conn = None
        if conn is None:
            try:
                conn = _Connection(self.socket_path, deadline)
            except BaseException:
                self._release(None)
                raise
        healthy = False
        try:
            yield conn
            healthy = True
        except TpmBrokerError as exc:
            # A stopping broker's connection is of no further use: the next request
            # connects afresh, to its successor.
            healthy = not isinstance(exc, (ProtocolError, BrokerUnavailableError,
                                           ShuttingDownError))
            raise
        finally:
            self._release(conn if healthy else None)

    def _release(self, conn: _Connection | None) -> None:
        with self._available:
            if conn is None or os.getpid() != self._pid:
                self._open -= 1
                if conn is not None:
                    conn.close()
            else:
                self._idle.append(conn)
            self._available.notify()

    def _drop_idle(self) -> None:
        with self._available:
            for conn in self._idle:
                conn.close()
            self._open -= len(self._idle)
            self._idle.clear()

    def close(self) -> None:
        self._drop_idle()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------

    def _call(self, msg: p.Message, timeout: float | None = None,
              key: LoadedKey | None = None) -> p.Message:
        """One request, retried once on a fresh connection if the broker went away."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(2):
            try:
                with self._connection(deadline) as conn:
                    if key is not None and conn.loaded.get(key.key_id) != key.spec.auth:
                        self._load_on(conn, key.spec, deadline)
                    try:
                        return conn.round_trip(msg, deadline)
                    except UnknownKeyError:
                        if key is None:
                            raise
                        self._load_on(conn, key.spec, deadline)  # broker restarted or evicted
                        return conn.round_trip(msg, deadline)
            except TimeoutError:
                raise DeadlineError("the broker did not answer before the deadline") from None
            except (ConnectionError, BrokenPipeError) as exc:
                self._drop_idle()  # every idle connection went to the same dead broker
                if attempt or time.monotonic() >= deadline:
                    raise BrokerUnavailableError(
                        f"lost the connection to tpmbroker at {self.socket_path}: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _load_on(conn: _Connection, spec: KeySpec, deadline: float) -> ops.LoadResult:
        result = conn.round_trip(spec.load_request(), deadline)
        assert isinstance(result, ops.LoadResult)
        conn.loaded[result.key_id] = spec.auth
        return result

    def hello(self) -> ops.HelloResult:
        result = self._call(ops.Hello(p.VERSION, f"tpmbroker-python/{__version__}"))
        assert isinstance(result, ops.HelloResult)
        return result

    def load_key(self, key: KeySpec | bytes | str | os.PathLike[str] | int,
                 password: bytes | str | None = None,
                 timeout: float | None = None) -> LoadedKey:
        """Load a key: a KeySpec, PEM or DER bytes, a file path, or a persistent handle."""
        spec = key if isinstance(key, KeySpec) else KeySpec.from_any(key, password)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(2):
            try:
                with self._connection(deadline) as conn:
                    result = self._load_on(conn, spec, deadline)
                    return LoadedKey(spec, result.key_id, p.KeyType(result.key_type),
                                     result.bits, p.Curve(result.curve), result.public_key)
            except TimeoutError:
                raise DeadlineError("the broker did not answer before the deadline") from None
            except (ConnectionError, BrokenPipeError) as exc:
                self._drop_idle()
                if attempt:
                    raise BrokerUnavailableError(
                        f"lost the connection to tpmbroker at {self.socket_path}: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    def sign(self, key: LoadedKey, digest: bytes, hash_alg: p.Hash | str = p.Hash.SHA256,
             scheme: p.Scheme | None = None, timeout: float | None = None) -> bytes:
        """Sign a digest. ECDSA gives DER; RSA the big-endian signature."""
        hash_alg = hash_alg if isinstance(hash_alg, p.Hash) else p.Hash.from_name(hash_alg)
        if scheme is None:
            scheme = p.Scheme.ECDSA if key.key_type == p.KeyType.EC else p.Scheme.PKCS1
        result = self._call(ops.Sign(key.key_id, scheme, hash_alg, digest), timeout, key)
        assert isinstance(result, ops.SignResult)
        return result.signature

    def generate_key(self, key_type: p.KeyType, param: int, password: bytes | str | None = None,
                     parent: int = p.STORAGE_PRIMARY,
                     timeout: float | None = None) -> tuple[bytes, bytes]:
        """Create a key in the TPM: (TSS2 PRIVATE KEY DER, SubjectPublicKeyInfo DER)."""
        auth = password.encode() if isinstance(password, str) else (password or b"")
        result = self._call(ops.Generate(key_type, param, auth, parent),
                            timeout if timeout is not None else max(self.timeout, 120.0))
        assert isinstance(result, ops.GenerateResult)
        return result.key, result.public_key

    def random(self, count: int, timeout: float | None = None) -> bytes:
        """`count` bytes from the TPM's random number generator, asked for in requests of
        at most protocol.MAX_RANDOM bytes; `timeout` applies to each request."""
        if count < 0:
            raise ValueError("count must not be negative")
        out = bytearray()
        while len(out) < count:
            wanted = min(count - len(out), p.MAX_RANDOM)
            result = self._call(ops.Random(wanted), timeout)
            assert isinstance(result, ops.RandomResult)
            if len(result.random) != wanted:
                raise ProtocolError(f"the broker sent {len(result.random)} random bytes "
                                    f"for {wanted}")
            out += result.random
        return bytes(out)

    def nv_read(self, index: int, timeout: float | None = None) -> bytes:
        """The contents of NV index `index` (0x01xxxxxx), e.g. a certificate."""
        result = self._call(ops.NvRead(index), timeout)
        assert isinstance(result, ops.NvReadResult)
        return result.data

    def status(self, timeout: float | None = None) -> dict[str, object]:
        result = self._call(ops.StatusRequest(), timeout)
        assert isinstance(result, ops.StatusResult)
        data: dict[str, object] = json.loads(result.json)
        return data


_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_clients_in_child() -> None:
    for client in list(_live_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_clients_in_child)


def read_password_file(path: str | os.PathLike[str]) -> bytes:
    """A password file's first line, without its line ending."""
    data = Path(path).read_bytes()
    return data.split(b"\n", 1)[0].rstrip(b"\r")
