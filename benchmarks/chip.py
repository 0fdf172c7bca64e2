"""A discrete TPM's timing, modelled in front of swtpm.

swtpm answers an ECDSA P-256 signature in about half a millisecond; a discrete TPM on an
SPI bus takes 25 ms or more, an RSA-2048 private operation about 80 ms, a salted
StartAuthSession about 40 ms. Designs that look alike on swtpm part ways on such a chip:
every extra command costs tens of milliseconds, and the chip serves one command at a
time whoever sends it.

`ChipRelay` sits between the TPM's users and swtpm (a TCP relay on a command port and the
control port after it, so a `swtpm:host=...,port=...` TCTI pointing at it works unchanged).
It passes each command to swtpm one at a time across all connections, and holds the
answer until the command's modelled duration (from `DISCRETE`, by command code and key
type) has passed since the chip took the command. It also measures what a chip's user
cannot see from outside: the time with a command in service ("TPM busy").

The table and its sources are in docs/benchmarks.md ("The chip model"). `none` is no
model: the relay still serialises and measures, but adds no time.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable

from tpmbroker.simulator import free_port_pair

# Command codes (TPM 2.0 Part 2, table 12).
CC = {
    "NV_UndefineSpace": 0x122, "EvictControl": 0x120, "HierarchyChangeAuth": 0x129,
    "NV_DefineSpace": 0x12A, "CreatePrimary": 0x131, "NV_Write": 0x137,
    "DictionaryAttackLockReset": 0x139, "SelfTest": 0x143, "Startup": 0x144,
    "Shutdown": 0x145, "StirRandom": 0x146, "ActivateCredential": 0x147,
    "PolicyNV": 0x149, "Create": 0x153, "ECDH_ZGen": 0x154, "Load": 0x157,
    "Quote": 0x158, "RSA_Decrypt": 0x159, "HMAC": 0x155, "SequenceUpdate": 0x15C,
    "Sign": 0x15D, "Unseal": 0x15E, "PolicySigned": 0x160, "ContextLoad": 0x161,
    "ContextSave": 0x162, "ECDH_KeyGen": 0x163, "FlushContext": 0x165,
    "LoadExternal": 0x167, "MakeCredential": 0x168, "NV_ReadPublic": 0x169,
    "PolicyAuthorize": 0x16A, "PolicyAuthValue": 0x16B, "PolicyCommandCode": 0x16C,
    "PolicyOR": 0x171, "PolicyPCR": 0x17F, "PolicyPassword": 0x18C, "ReadPublic": 0x173,
    "RSA_Encrypt": 0x174, "StartAuthSession": 0x176, "VerifySignature": 0x177,
    "GetCapability": 0x17A, "GetRandom": 0x17B, "GetTestResult": 0x17C, "Hash": 0x17D,
    "PCR_Read": 0x17E, "ReadClock": 0x181, "PCR_Extend": 0x182, "NV_Read": 0x14E,
    "HashSequenceStart": 0x186, "SequenceComplete": 0x13E, "TestParms": 0x18A,
    "CreateLoaded": 0x191, "PolicyGetDigest": 0x189, "PolicyRestart": 0x180,
}
NAMES = {code: name for name, code in CC.items()}

ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_RSASSA, ALG_RSAPSS = 0x0014, 0x0016
TPM_RH_NULL = 0x40000007


@dataclasses.dataclass(frozen=True)
class Model:
    """Per-command service times of one kind of chip, in seconds.

    `times` is keyed by command name, or by "name/rsa", "name/ecc" where the key type
    matters; `default` covers every command not in the table; `per_byte` adds time for
    commands whose work grows with their data (hashing, random numbers).
    """

    name: str
    times: dict[str, float]
    default: float
    per_byte: dict[str, float] = dataclasses.field(default_factory=dict)

    def duration(self, name: str, key_type: str | None = None, data_bytes: int = 0) -> float:
        base = self.times.get(f"{name}/{key_type}") if key_type else None
        if base is None:
            base = self.times.get(name, self.default)
        return base + self.per_byte.get(name, 0.0) * data_bytes


NONE = Model("none", {}, 0.0)

# A discrete TPM 2.0 of the Infineon SLB 9672 / Nuvoton NPCT75x / ST33KTPM class on SPI.
# Measured figures (wolfTPM examples/bench, docs/benchmarks.md gives the table and its
# sources); the rest are estimates, marked "est." there.
DISCRETE = Model("discrete", {
    "Sign/ecc": 0.025,              # ECDSA P-256: ST33KTPM 25.3, SLB9672 35.6, NPCT750 56.4
    "Sign/rsa": 0.080,              # RSA-2048 private: SLB9672 77.0, NPCT750 70.3, ST33K 90.8
    "RSA_Decrypt": 0.080,           # the same private operation
    "ECDH_ZGen": 0.025,             # est.: one P-256 point multiplication, as ECDSA sign
    "ECDH_KeyGen": 0.050,           # est.: a key pair and a multiplication
    "StartAuthSession": 0.040,      # salted (ECDH with the salt key), per the issue
    "StartAuthSession/unsalted": 0.005,  # est.
    "CreatePrimary/ecc": 0.150,     # ECC key generation: SLB9672 136, issue ">= 150"
    "CreatePrimary/rsa": 1.500,     # RSA-2048 key generation: SLB9672 1568
    "Create/ecc": 0.150,
    "Create/rsa": 1.500,
    "CreateLoaded/ecc": 0.165,
    "CreateLoaded/rsa": 1.515,
    "Load": 0.015,                  # unwrap and check the private part
    "LoadExternal": 0.010,          # est.
    "ContextSave": 0.005,           # est.: encrypt and MAC the context
    "ContextLoad": 0.005,           # est.
    "FlushContext": 0.001,          # est.
    "ReadPublic": 0.002, "NV_ReadPublic": 0.002,  # est.
    "GetCapability": 0.001, "GetTestResult": 0.001, "ReadClock": 0.001,  # est.
    "TestParms": 0.001, "PCR_Read": 0.002, "PolicyGetDigest": 0.001,  # est.
    "GetRandom": 0.001,             # + 45 µs a byte: SLB9672 RNG 22.4 KB/s
    "Hash": 0.002, "HashSequenceStart": 0.002, "SequenceUpdate": 0.002,
    "SequenceComplete": 0.003,      # + 12 µs a byte: SLB9672 SHA-256 85 KB/s
    "NV_Read": 0.005, "NV_Write": 0.030, "NV_DefineSpace": 0.050,  # est. (flash)
    "NV_UndefineSpace": 0.030, "EvictControl": 0.050,  # est. (flash)
    "VerifySignature/ecc": 0.024,   # SLB9672 ECDSA verify 24.1
    "VerifySignature/rsa": 0.009,   # SLB9672 RSA public 9.1
    "RSA_Encrypt": 0.009,
    "Startup": 0.020, "Shutdown": 0.020, "SelfTest": 0.100,  # est.
    "DictionaryAttackLockReset": 0.030,  # est. (writes NV)
}, default=0.005, per_byte={"GetRandom": 45e-6, "Hash": 12e-6, "SequenceUpdate": 12e-6})

MODELS = {m.name: m for m in (NONE, DISCRETE)}


# --- reading commands ---------------------------------------------------------------------

def _u16(data: bytes, at: int) -> int:
    return int(struct.unpack_from(">H", data, at)[0])


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from(">I", data, at)[0])


# handles before the authorization area, per command (Part 3)
_HANDLES = {CC["Sign"]: 1, CC["RSA_Decrypt"]: 1, CC["ECDH_ZGen"]: 1, CC["Load"]: 1,
            CC["CreatePrimary"]: 1, CC["Create"]: 1, CC["CreateLoaded"]: 1,
            CC["StartAuthSession"]: 2, CC["GetRandom"]: 0, CC["Hash"]: 0,
            CC["SequenceUpdate"]: 1, CC["VerifySignature"]: 1}


def _parameters(command: bytes, code: int) -> int:
    """Offset of the first parameter (after handles and any authorization area)."""
    at = 10 + 4 * _HANDLES.get(code, 0)
    if _u16(command, 0) == 0x8002:  # TPM_ST_SESSIONS
        at += 4 + _u32(command, at)
    return at


def _public_type(command: bytes, at: int) -> str | None:
    """The key type of a TPM2B_PUBLIC at `at`: "rsa", "ecc" or None."""
    if at + 4 > len(command):
        return None
    alg = _u16(command, at + 2)
    return "rsa" if alg == ALG_RSA else "ecc" if alg == ALG_ECC else None


@dataclasses.dataclass
class Classified:
    name: str
    key_type: str | None
    data_bytes: int = 0
    key_handle: int | None = None  # for Sign with a NULL scheme


def classify(command: bytes, handle_types: dict[int, str]) -> Classified:
    """What a command is, as far as its duration goes. Never raises on odd input."""
    if len(command) < 10:
        return Classified("?", None)
    code = _u32(command, 6)
    name = NAMES.get(code, f"0x{code:x}")
    try:
        at = _parameters(command, code)
        if code == CC["Sign"]:
            handle = _u32(command, 10)
            scheme = _u16(command, at + 2 + _u16(command, at))
            key = ("rsa" if scheme in (ALG_RSASSA, ALG_RSAPSS)
                   else handle_types.get(handle) if scheme == ALG_NULL else "ecc")
            return Classified(name, key or "ecc")
        if code in (CC["CreatePrimary"], CC["Create"], CC["CreateLoaded"]):
            at += 2 + _u16(command, at)  # inSensitive
            return Classified(name, _public_type(command, at) or "ecc")
        if code == CC["StartAuthSession"]:
            salted = _u32(command, 10) != TPM_RH_NULL
            return Classified(name, None if salted else "unsalted")
        if code == CC["VerifySignature"]:
            return Classified(name, handle_types.get(_u32(command, 10), "ecc"))
        if code == CC["GetRandom"]:
            return Classified(name, None, _u16(command, at))
        if code in (CC["Hash"], CC["SequenceUpdate"]):
            return Classified(name, None, _u16(command, at))
        if code == CC["Load"]:
            at += 2 + _u16(command, at)  # inPrivate
            return Classified(name, _public_type(command, at))
    except struct.error:
        pass
    return Classified(name, None)


# --- the relay ------------------------------------------------------------------------------

class ChipRelay:
    """swtpm behind the timing of `model`, one command at a time; measures TPM busy."""

    def __init__(self, port: int, model: Model = DISCRETE, host: str = "127.0.0.1",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = port
        self.host = host
        self.model = model
        self.clock = clock
        self._chip = threading.Lock()  # the chip: one command in service at a time
        self._stats = threading.Lock()
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._handle_types: dict[int, str] = {}
        self.counts: dict[str, int] = {}
        self.service: dict[str, float] = {}  # modelled seconds spent per command name
        self._closed = False
        self._listeners = self._listen_pair()
        self.port = self._listeners[0].getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self._listeners[0], self._serve),
                         daemon=True, name="chip-accept").start()
        threading.Thread(target=self._accept, args=(self._listeners[1], self._passthrough),
                         daemon=True, name="chip-ctrl").start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def _listen_pair(self) -> list[socket.socket]:
        for _ in range(20):
            port = free_port_pair(self.host)
            pair = [socket.socket(), socket.socket()]
            try:
                for offset, s in enumerate(pair):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((self.host, port + offset))
                    s.listen(128)
            except OSError:
                for s in pair:
                    s.close()
                continue
            return pair
        raise OSError("no two consecutive free ports for the chip relay")

    def _accept(self, listener: socket.socket,
                handler: Callable[[socket.socket], None]) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._stats:
                    self._sockets.append(client)
                threading.Thread(target=handler, args=(client,), daemon=True,
                                 name="chip-conn").start()

    @staticmethod
    def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
        data = bytearray()
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    @classmethod
    def _read_command(cls, sock: socket.socket) -> tuple[bytes, bytes] | None:
        """(framing, command): swtpm's command port takes a bare TPM command (tss2's swtpm
        TCTI) or one behind TPM_SEND_COMMAND, locality and length (the MS simulator
        framing, the broker's own link); the framing is returned as it came."""
        head = cls._recv_exact(sock, 6)
        if head is None:
            return None
        if head[:4] == b"\0\0\0\x08":  # TPM_SEND_COMMAND
            rest = cls._recv_exact(sock, 3)
            if rest is None:
                return None
            framing = head + rest
            command = cls._recv_exact(sock, _u32(framing, 5))
            return None if command is None else (framing, command)
        body = cls._recv_exact(sock, max(10, _u32(head, 2)) - 6)
        return None if body is None else (b"", head + body)

    @classmethod
    def _read_response(cls, sock: socket.socket, framed: bool) -> tuple[bytes, bytes] | None:
        """(what to pass back, the bare response)."""
        if framed:
            size = cls._recv_exact(sock, 4)
            if size is None:
                return None
            rest = cls._recv_exact(sock, _u32(size, 0) + 4)  # the response, then ack 0
            return None if rest is None else (size + rest, rest[:-4])
        head = cls._recv_exact(sock, 6)
        if head is None:
            return None
        body = cls._recv_exact(sock, max(10, _u32(head, 2)) - 6)
        return None if body is None else (head + body, head + body)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        with contextlib.suppress(OSError), client:
            upstream = socket.create_connection((self.host, self.target))
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (frame := self._read_command(client)) is not None:
                response = self.execute(frame[0], frame[1], upstream)
                if response is None:
                    break
                client.sendall(response)
        if upstream is not None:
            upstream.close()
        self._forget(client)

    def _forget(self, sock: socket.socket) -> None:
        # tss2's swtpm TCTI opens a connection per command: keep only the open ones
        with self._stats, contextlib.suppress(ValueError):
            self._sockets.remove(sock)

    def execute(self, framing: bytes, command: bytes, upstream: socket.socket) -> bytes | None:
        """Send one command through the chip: in turn, and no sooner than modelled.
        Returns the bytes to pass back, None when swtpm closed the connection."""
        with self._chip:
            start = self.clock()
            with self._stats:
                kind = classify(command, self._handle_types)
            upstream.sendall(framing + command)
            answer = self._read_response(upstream, bool(framing))
            duration = self.model.duration(kind.name, kind.key_type, kind.data_bytes)
            remaining = start + duration - self.clock()
            if remaining > 0:
                time.sleep(remaining)
            end = self.clock()
            with self._stats:
                self._starts.append(start)
                self._ends.append(end)
                self.counts[kind.name] = self.counts.get(kind.name, 0) + 1
                self.service[kind.name] = self.service.get(kind.name, 0.0) + (end - start)
                if answer is None:
                    return None
                response = answer[1]
                if kind.key_type in ("rsa", "ecc") and len(response) >= 14 and _u32(
                        response, 6) == 0 and kind.name in ("Load", "CreatePrimary",
                                                             "CreateLoaded"):
                    self._handle_types[_u32(response, 10)] = kind.key_type
        return answer[0]

    def _passthrough(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            upstream = socket.create_connection((self.host, self.target + 1))
            with upstream:
                while data := client.recv(65536):
                    upstream.sendall(data)
                    reply = upstream.recv(65536)
                    if not reply:
                        break
                    client.sendall(reply)
        self._forget(client)

    def busy(self, start: float, end: float) -> float:
        """Seconds within [start, end] (this relay's clock) with a command in service."""
        with self._stats:
            starts, ends = list(self._starts), list(self._ends)
        if end <= start:
            return 0.0
        total = 0.0
        # intervals are disjoint and in order: the chip serves one command at a time
        for index in range(max(0, bisect.bisect_left(ends, start)), len(starts)):
            s, e = starts[index], ends[index]
            if s >= end:
                break
            total += max(0.0, min(e, end) - max(s, start))
        return total

    def utilization(self, start: float, end: float) -> float | None:
        """TPM busy over [start, end]: the share of wall time with a command in service."""
        return None if end <= start else self.busy(start, end) / (end - start)

    def commands(self) -> int:
        with self._stats:
            return len(self._starts)

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._stats:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> ChipRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
