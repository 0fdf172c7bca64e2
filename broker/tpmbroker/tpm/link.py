"""The link to the TPM: the connection, its recovery and a clean start.

`Link` is the one connection the worker talks through: raw commands (tpm/command.py)
and, for the rare setup commands where tpm2-pytss's ESAPI stays simpler (CreatePrimary,
Load, ReadPublic, GetCapability), an ESAPI context over the same bytes.

Byte transports:

tss2's swtpm TCTI opens a new TCP connection for every command (about 130 µs and a
TIME_WAIT socket each); `SwtpmSocket` keeps one connection open and speaks the MS
simulator framing swtpm's command port expects. swtpm serves one connection at a time,
so ESAPI must then share that connection: `TransportTcti` gives it one. Commands cannot
be queued ahead on the connection: swtpm reads greedily and takes a second command's
bytes as part of the first (TPM_RC_COMMAND_SIZE).

A clean start: a TPM without a resource manager in front (swtpm or mssim over TCP,
/dev/tpm0) keeps whatever transient objects and sessions a client that died left behind,
and with them its few slots full (every Load then fails with TPM_RC_OBJECT_MEMORY). On
such a TPM the broker is the only client, so at each connect it flushes every transient
object and session it finds, as tpm2-abrmd's --flush-all does. Behind a resource manager
(/dev/tpmrm0, tpm2-abrmd) the handles it lists may be other users', and it touches none.
When the broker stops, it ends with TPM2_Shutdown(STATE) on a TPM it owns alone: the next
TPM2_Startup is then orderly, and a restart does not count toward the dictionary-attack
lockout (docs/broker.md, "Starts and stops").
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Any

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT, TPM2_SU, TSS2_RC
from tpm2_pytss.TCTI import PyTCTI
from tpm2_pytss.TCTILdr import TCTILdr
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..errors import TpmUnavailableError
from .rc import Kind, classify
from .turnaround import TurnAround

MAX_RESPONSE = 4096
CONNECT_BACKOFF_FIRST = 0.01
CONNECT_BACKOFF_MAX = 0.5
TPM_SEND_COMMAND = 8
CC_FLUSH_CONTEXT = 0x00000165
ST_NO_SESSIONS = 0x8001
# Handle ranges a client leaves behind: transient objects, loaded and saved sessions.
LEFTOVER_RANGES = (int(TPM2_HT.TRANSIENT) << 24, int(TPM2_HT.LOADED_SESSION) << 24,
                   int(TPM2_HT.SAVED_SESSION) << 24)
_FLUSH = struct.Struct(">HIII")  # tag, size, command code, flushHandle
_SEND_HEADER = struct.Struct(">IBI")  # command, locality, length
_U32 = struct.Struct(">I")


def io_error() -> TSS2_Exception:
    return TSS2_Exception(int(TSS2_RC.TCTI_RC_IO_ERROR))


def frame_command(command: bytes, locality: int = 0) -> bytes:
    """A command as swtpm's command port takes it: TPM_SEND_COMMAND, locality, length."""
    return _SEND_HEADER.pack(TPM_SEND_COMMAND, locality, len(command)) + command


def split_response(data: bytes | bytearray) -> bytes | None:
    """The response in `data` (u32 length, response, u32 acknowledgement 0), or None
    while incomplete. OSError when the bytes cannot be a response."""
    if len(data) < 4:
        return None
    (size,) = _U32.unpack_from(data)
    if size > MAX_RESPONSE:
        raise OSError(f"response of {size} bytes")
    if len(data) < size + 8:
        return None
    if len(data) != size + 8 or data[size + 4:] != b"\0\0\0\0":
        raise OSError("unexpected bytes after the response")
    return bytes(data[4:size + 4])


class SwtpmSocket:
    """One persistent TCP connection to swtpm's (or the MS simulator's) command port.

    Thread-safe: a command and its response are one critical section. After any error
    the connection is dropped and the next command opens a new one.
    """

    def __init__(self, host: str, port: int, timeout: float = 60.0, locality: int = 0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.locality = locality
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.turnaround = TurnAround()  # the Link gives its own

    def transact(self, command: bytes) -> bytes:
        with self._lock:
            try:
                sock = self._sock or self._connect()
                self.turnaround.sent(command)
                sock.sendall(frame_command(command, self.locality))
                response = self._read_response(sock)
            except OSError as exc:
                self._drop()
                raise io_error() from exc
            self.turnaround.answered()
            return response

    def open(self) -> None:
        """Connect now (TSS2_Exception if the TPM cannot be reached)."""
        with self._lock:
            if self._sock is None:
                try:
                    self._connect()
                except OSError as exc:
                    raise io_error() from exc

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        return sock

    @staticmethod
    def _read_response(sock: socket.socket) -> bytes:
        data = b""
        while True:
            chunk = sock.recv(MAX_RESPONSE + 8 - len(data))
            if not chunk:
                raise OSError("connection closed by the TPM")
            data += chunk
            response = split_response(data)
            if response is not None:
                return response

    @property
    def connected_socket(self) -> socket.socket | None:
        """The open connection, for a caller that drives one command itself (the
        server's event loop); None when not connected."""
        return self._sock

    def drop(self) -> None:
        """Close the connection after a command whose outcome is unknown."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        with self._lock:
            self._drop()


class TctiTransport:
    """Any tss2 TCTI (tabrmd, mssim, swtpm, device) through tpm2-pytss's transmit/receive."""

    def __init__(self, tcti: Any) -> None:
        self.tcti = tcti
        self._lock = threading.Lock()
        self.turnaround = TurnAround()  # the Link gives its own

    def transact(self, command: bytes) -> bytes:
        with self._lock:
            self.turnaround.sent(command)
            self.tcti.transmit(command)
            response = bytes(self.tcti.receive(MAX_RESPONSE))
            self.turnaround.answered()
            return response

    def open(self) -> None:
        """tss2 TCTIs connect when they are loaded."""

    def close(self) -> None:
        """The TCTI is finalized by whoever loaded it (TCTILdr.close)."""


class TransportTcti(PyTCTI):  # type: ignore[misc]
    """A TCTI for ESAPI over a transport, so ESAPI and raw commands share one link."""

    def __init__(self, transport: SwtpmSocket) -> None:
        super().__init__(max_size=MAX_RESPONSE, magic=b"TPMBRKR\0")
        self.transport = transport
        self._response: bytes | None = None

    def do_transmit(self, command: bytes) -> None:
        self._response = self.transport.transact(bytes(command))

    def do_receive(self, timeout: int) -> bytes:
        response, self._response = self._response, None
        if response is None:
            raise TSS2_Exception(int(TSS2_RC.TCTI_RC_BAD_SEQUENCE))
        return response

    def do_finalize(self) -> None:
        self.transport.close()


def parse_tcti(tcti: str) -> tuple[str, dict[str, str], str]:
    """(name, key=value options, raw config) of a tpm2-tools style TCTI string."""
    name, _, config = tcti.partition(":")
    options: dict[str, str] = {}
    for part in config.split(","):
        key, sep, value = part.partition("=")
        if sep:
            options[key.strip()] = value.strip()
    return name.strip(), options, config


Transport = SwtpmSocket | TctiTransport


def owns_tpm_alone(tcti: str) -> bool:
    """Whether the broker is the TPM's only client through `tcti`: no resource manager
    between them (swtpm and mssim over TCP, a /dev/tpmN device). tabrmd, /dev/tpmrm*
    and anything unknown count as shared."""
    name, options, config = parse_tcti(tcti)
    if name in ("swtpm", "mssim"):
        return True
    if name == "device":
        path = options.get("path", config if config and "=" not in config else "")
        return path.startswith("/dev/tpm") and not path.startswith("/dev/tpmrm")
    return False


def open_transport(tcti: str, persistent: bool = True) -> tuple[Transport, Any]:
    """A transport for `tcti` and the TCTI object ESAPI should use alongside it.

    swtpm gets a persistent link of our own (when `persistent`); everything else goes
    through tss2's TCTI: the device TCTI already keeps its file open, tabrmd its D-Bus
    connection.
    """
    name, options, _ = parse_tcti(tcti)
    if persistent and name == "swtpm" and "path" not in options:  # TCP, not a Unix socket
        host = options.get("host", "localhost")
        port = int(options.get("port", "2321"))
        swtpm = SwtpmSocket(host, port)
        return swtpm, TransportTcti(swtpm)
    loaded = TCTILdr.parse(tcti)
    return TctiTransport(loaded), loaded


def close_tcti(tcti: Any) -> None:
    """Finalize a TCTI from open_transport once ESAPI is closed (ESAPI leaves TCTIs it
    did not load itself alone)."""
    with contextlib.suppress(TSS2_Exception):
        if isinstance(tcti, TransportTcti):
            tcti.transport.close()
        elif isinstance(tcti, TCTILdr):
            tcti.close()


class Link:
    """One connection to the TPM shared by raw commands and ESAPI; None of either while
    down. Only the worker thread calls it, except `lane_socket` (tpmbroker.lane)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.ectx: Any = None  # ESAPI over the same connection
        self.transport: Transport | None = None
        self._tcti_object: Any = None
        # No resource manager in front: leftovers are flushed, and stops are orderly.
        self.owns_tpm = owns_tpm_alone(tcti)
        self.turnaround = TurnAround()  # kept across reconnections

    @property
    def up(self) -> bool:
        return self.ectx is not None

    def tpm_property(self, prop: int) -> int | None:
        """A TPM property (TPM2_GetCapability TPM_CAP_TPM_PROPERTIES); None if the link
        is down or the TPM does not say."""
        if not self.up:
            return None
        try:
            _, data = self.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
        except TSS2_Exception:
            return None
        for entry in data.data.tpmProperties:
            if entry.property == prop:
                return int(entry.value)
        return None

    def tpm_properties(self, first: int, count: int) -> dict[int, int]:
        """`count` TPM properties from `first`, in one TPM2_GetCapability: property ->
        value, for those the TPM has."""
        _, data = self.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, first, count)
        return {int(entry.property): int(entry.value) for entry in data.data.tpmProperties}

    def has_algorithm(self, alg: int) -> bool:
        _, data = self.ectx.get_capability(TPM2_CAP.ALGS, alg, 1)
        return any(int(entry.alg) == int(alg) for entry in data.data.algorithms)

    def connect(self, deadline: float) -> tuple[int, int]:
        """Connect, retrying with backoff until `deadline`; start the TPM up if nobody
        did. Returns (resetCount, restartCount): the caller compares them with the last
        ones to tell whether the TPM kept what it held."""
        delay = CONNECT_BACKOFF_FIRST
        while True:
            try:
                self._open()
                break
            except (TSS2_Exception, RuntimeError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TpmUnavailableError(
                        f"cannot reach the TPM through {self.tcti!r}: {exc}") from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        return self._clock_counts()

    def _open(self) -> None:
        # swtpm serves one connection at a time and a resource manager keeps sessions per
        # connection: ESAPI and raw commands must share one.
        transport, tcti = open_transport(self.tcti)
        transport.turnaround = self.turnaround
        try:
            transport.open()
            ectx = ESAPI(tcti)
        except BaseException:
            close_tcti(tcti)
            raise
        self.transport, self._tcti_object, self.ectx = transport, tcti, ectx

    def _clock_counts(self) -> tuple[int, int]:
        try:
            info = self.ectx.read_clock()
        except TSS2_Exception as exc:
            if classify(exc) is not Kind.NEEDS_STARTUP:
                raise
            # Powered up without TPM2_Startup (no resource manager did it for us).
            self.ectx.startup(TPM2_SU.CLEAR)
            info = self.ectx.read_clock()
        return int(info.clockInfo.resetCount), int(info.clockInfo.restartCount)

    def leftover_handles(self) -> list[int]:
        """Every transient object and session the TPM holds now (TPM2_GetCapability
        HANDLES), whoever made them."""
        found: dict[int, None] = {}
        for first in LEFTOVER_RANGES:
            start = first
            while True:
                more, data = self.ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
                handles = [int(h) for h in data.data.handles]
                # Saved sessions are listed under 0x03000000 with their 0x02 handles.
                found.update(dict.fromkeys(handles))
                if not more or not handles:
                    break
                start = first | ((handles[-1] & 0xFFFFFF) + 1)
        return list(found)

    def flush_leftovers(self) -> tuple[int, int]:
        """A clean start on a TPM the broker owns alone: flush every transient object
        and session in it. Returns how many (objects, sessions) were flushed; none
        behind a resource manager, where they may belong to others."""
        if not self.owns_tpm:
            return 0, 0
        transport = self.require()
        objects = sessions = 0
        for handle in self.leftover_handles():
            # Raw, so that sessions (which ESAPI cannot name without their context) and
            # saved sessions flush like objects.
            response = transport.transact(_FLUSH.pack(ST_NO_SESSIONS, _FLUSH.size,
                                                      CC_FLUSH_CONTEXT, handle))
            if len(response) >= 10 and _U32.unpack_from(response, 6)[0] == 0:
                if handle >> 24 == TPM2_HT.TRANSIENT:
                    objects += 1
                else:
                    sessions += 1
        return objects, sessions

    def shutdown_state(self) -> bool:
        """TPM2_Shutdown(STATE) as the last command to a TPM the broker owns alone, so
        that its next Startup is orderly (a non-orderly one after a DA-protected key was
        used adds a failure to the lockout counter). False if not sent or refused."""
        if not self.owns_tpm or self.ectx is None:
            return False
        try:
            self.ectx.shutdown(TPM2_SU.STATE)
        except TSS2_Exception:
            return False
        return True

    def require(self) -> Transport:
        """The transport for a raw command; a TCTI error (recoverable) while down."""
        if self.transport is None:
            raise TSS2_Exception(int(TSS2_RC.TCTI_RC_NO_CONNECTION))
        return self.transport

    def flush(self, handle: int) -> None:
        """Flush a TPM handle; nothing if it is gone (or, under a resource manager, never
        ours)."""
        try:
            tr = self.ectx.tr_from_tpmpublic(handle)
            self.ectx.flush_context(tr)
        except TSS2_Exception:
            pass

    def lane_socket(self) -> socket.socket | None:
        """The open swtpm connection, for the event loop to drive one command itself;
        None when the link is down or is not a socket of ours."""
        transport = self.transport
        if not isinstance(transport, SwtpmSocket):
            return None
        return transport.connected_socket

    def drop_connection(self) -> None:
        """A command's fate is unknown: the next command reconnects."""
        if isinstance(self.transport, SwtpmSocket):
            self.transport.drop()

    def close(self) -> None:
        """Finalize ESAPI and the connection. Idempotent."""
        ectx, self.ectx = self.ectx, None
        if ectx is not None:
            with contextlib.suppress(TSS2_Exception):
                ectx.close()
        tcti, self.transport, self._tcti_object = self._tcti_object, None, None
        if tcti is not None:
            close_tcti(tcti)
