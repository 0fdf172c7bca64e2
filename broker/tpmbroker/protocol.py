"""The wire protocol (docs/protocol.md): pure encode and decode, no I/O.

Every message is a frozen dataclass whose ``FIELDS`` list its wire layout; one
generic encoder and decoder serve them all, so the layout is written once. The
messages themselves live with their operation (tpmbroker.ops.*); this module frames
them and knows them through the registry their definition fills.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import struct
from typing import Any, ClassVar

from .definitions import (
    CONNECTION_ERROR,
    HEADER_SIZE,
    KEY_ID_SIZE,
    MAX_FIELD,
    MAX_FRAME,
    MAX_MESSAGE,
    MAX_RANDOM,
    RESPONSE_BIT,
    STORAGE_PRIMARY,
    VERSION,
    Curve,
    DecryptFlag,
    Hash,
    KeySource,
    KeyType,
    Opcode,
    Padding,
    Scheme,
    Usage,
)
from .errors import (
    FrameTooLargeError,
    ProtocolError,
    Status,
    UnknownOpcodeError,
    UnsupportedVersionError,
)

# The shared numbers are re-exported: codec users find them here.
__all__ = [
    "CONNECTION_ERROR",
    "HEADER",
    "HEADER_SIZE",
    "KEY_ID_SIZE",
    "MAX_FIELD",
    "MAX_FRAME",
    "MAX_LENGTH",
    "MAX_MESSAGE",
    "MAX_RANDOM",
    "MIN_LENGTH",
    "REQUESTS",
    "RESPONSE_BIT",
    "RESULTS",
    "STORAGE_PRIMARY",
    "VERSION",
    "Curve",
    "DecryptFlag",
    "ErrorResult",
    "FrameReader",
    "Hash",
    "Header",
    "KeySource",
    "KeyType",
    "Message",
    "Opcode",
    "Padding",
    "Result",
    "Scheme",
    "Status",
    "Usage",
    "check_header",
    "decode_header",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "key_id_for",
]

HEADER = struct.Struct(">IBBHII")  # length, version, opcode, flags, request_id, timeout_ms
assert HEADER.size == HEADER_SIZE
MIN_LENGTH = HEADER_SIZE - 4
MAX_LENGTH = MAX_FRAME - 4


def key_id_for(source: KeySource, key: bytes) -> bytes:
    """SHA-256 over source ‖ key: the same blob always has the same id."""
    return hashlib.sha256(bytes([source]) + key).digest()


# --- messages -------------------------------------------------------------------

REQUESTS: dict[int, type[Message]] = {}
RESULTS: dict[int, type[Message]] = {}


class Message:
    """A request or a successful response body. Subclasses are frozen dataclasses,
    one pair per operation, each in its module under tpmbroker.ops; defining one
    registers it with the codec."""

    OPCODE: ClassVar[Opcode]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    IS_RESULT: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "OPCODE" not in cls.__dict__:
            return  # an abstract kind of message (Result)
        registry = RESULTS if cls.IS_RESULT else REQUESTS
        if cls.OPCODE in registry:
            raise TypeError(f"two {'results' if cls.IS_RESULT else 'requests'} for "
                            f"{cls.OPCODE!r}: {registry[cls.OPCODE].__name__}, {cls.__name__}")
        registry[cls.OPCODE] = cls

    def encode_body(self, out: bytearray) -> None:
        for name, kind in self.FIELDS:
            _put(out, kind, getattr(self, name))

    @classmethod
    def decode_body(cls, body: bytes | memoryview, pos: int) -> Message:
        return _decode_fields(cls, memoryview(body), pos)

    def encode_frame(self, request_id: int, opcode: int) -> bytes:
        """The whole response frame for this result (status OK)."""
        body = bytearray(_OK)
        self.encode_body(body)
        return _frame(opcode | RESPONSE_BIT, request_id, 0, body)


class Result(Message):
    """A successful response body."""

    IS_RESULT = True


class BytesResult(Result):
    """A result that is one bytes field (a signature, a plaintext, a shared secret): the
    answers that go out thousands of times a second, framed in one pack."""

    def encode_frame(self, request_id: int, opcode: int) -> bytes:
        value: bytes = getattr(self, self.FIELDS[0][0])
        if len(value) > MAX_FIELD:
            return super().encode_frame(request_id, opcode)  # which says what is wrong
        return _ONE_FIELD_RESULT.pack(_ONE_FIELD_RESULT.size - 4 + len(value), VERSION,
                                      opcode | RESPONSE_BIT, 0, request_id, 0, Status.OK,
                                      len(value)) + value


@dataclasses.dataclass(frozen=True)
class ErrorResult:
    """A response whose status is not OK."""

    status: int
    message: str
    tpm_rc: int = 0


def _registered() -> bool:
    """Every operation's messages are registered once tpmbroker.ops is imported."""
    if not REQUESTS:
        importlib.import_module(f"{__package__}.ops")
    return True


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    opcode: int
    flags: int
    request_id: int
    timeout_ms: int

    @property
    def is_response(self) -> bool:
        return bool(self.opcode & RESPONSE_BIT)


# --- field codec ------------------------------------------------------------------

_INTS = {"u8": struct.Struct(">B"), "u16": struct.Struct(">H"), "u32": struct.Struct(">I")}
_LEN = _INTS["u16"]
_OK = _LEN.pack(Status.OK)
_ONE_FIELD_RESULT = struct.Struct(">IBBHIIHH")  # frame header, status, the field's length


# "bytes?" is a trailing field added to a message after its first release: absent means
# empty, and an empty one is not written, so frames without it keep their bytes.
OPTIONAL_BYTES = "bytes?"


def _put(out: bytearray, kind: str, value: Any) -> None:
    if kind == OPTIONAL_BYTES:
        if not value:
            return
        kind = "bytes"
    if kind in _INTS:
        try:
            out += _INTS[kind].pack(int(value))
        except struct.error:
            raise ProtocolError(f"{kind} field out of range: {value!r}") from None
        return
    raw = value.encode("utf-8") if kind == "str" else bytes(value)
    if len(raw) > MAX_FIELD:
        raise ProtocolError(f"field of {len(raw)} bytes exceeds {MAX_FIELD}")
    out += _LEN.pack(len(raw))
    out += raw


def _take(body: memoryview, pos: int, kind: str) -> tuple[Any, int]:
    if kind == OPTIONAL_BYTES:
        if pos == len(body):
            return b"", pos
        kind = "bytes"
    if kind in _INTS:
        fmt = _INTS[kind]
        if pos + fmt.size > len(body):
            raise ProtocolError("body truncated")
        return fmt.unpack_from(body, pos)[0], pos + fmt.size
    if pos + 2 > len(body):
        raise ProtocolError("body truncated")
    (n,) = _LEN.unpack_from(body, pos)
    pos += 2
    if pos + n > len(body):
        raise ProtocolError("body truncated")
    raw = bytes(body[pos:pos + n])
    if kind == "str":
        try:
            return raw.decode("utf-8"), pos + n
        except UnicodeDecodeError:
            raise ProtocolError("string field is not UTF-8") from None
    return raw, pos + n


def _decode_fields(cls: type[Message], body: memoryview, pos: int) -> Message:
    values: dict[str, Any] = {}
    for name, kind in cls.FIELDS:
        values[name], pos = _take(body, pos, kind)
    if pos != len(body):
        raise ProtocolError(f"{len(body) - pos} trailing bytes after {cls.__name__}")
    return cls(**values)


def _frame(opcode: int, request_id: int, timeout_ms: int, body: bytes | bytearray) -> bytes:
    length = HEADER_SIZE - 4 + len(body)
    if length > MAX_LENGTH:
        raise FrameTooLargeError(f"frame of {length + 4} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(length, VERSION, opcode, 0, request_id, timeout_ms) + body


# --- frames -------------------------------------------------------------------------

def encode_request(request_id: int, msg: Message, timeout_ms: int = 0) -> bytes:
    body = bytearray()
    msg.encode_body(body)
    return _frame(msg.OPCODE, request_id, timeout_ms, body)


def encode_response(request_id: int, opcode: int, result: Message | ErrorResult) -> bytes:
    if isinstance(result, ErrorResult):
        body = bytearray()
        _put(body, "u16", result.status)
        _put(body, "u32", result.tpm_rc)
        _put(body, "str", result.message[:1024])
        return _frame(opcode | RESPONSE_BIT, request_id, 0, body)
    return result.encode_frame(request_id, opcode)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse the 16 header bytes. Raises only for a length that breaks framing."""
    length, version, opcode, flags, request_id, timeout_ms = HEADER.unpack_from(data, 0)
    if length < MIN_LENGTH:
        raise ProtocolError(f"frame length {length} below the header size")
    if length > MAX_LENGTH:
        raise FrameTooLargeError(f"frame of {length + 4} bytes exceeds {MAX_FRAME}")
    return Header(version, opcode, flags, request_id, timeout_ms)


def check_header(header: Header) -> None:
    """Checks that can be answered without closing the connection."""
    if header.version != VERSION:
        raise UnsupportedVersionError(f"protocol version {header.version}; this side speaks 1")
    if header.flags:
        raise ProtocolError(f"unknown flags 0x{header.flags:04x}")


def decode_request(header: Header, body: bytes | memoryview) -> Message:
    check_header(header)
    cls = REQUESTS.get(header.opcode) or (_registered() and REQUESTS.get(header.opcode))
    if not cls:
        raise UnknownOpcodeError(f"unknown opcode 0x{header.opcode:02x}")
    return cls.decode_body(body, 0)


def decode_response(header: Header, body: bytes | memoryview) -> Message | ErrorResult:
    check_header(header)
    if not header.is_response:
        raise UnknownOpcodeError(f"0x{header.opcode:02x} is not a response opcode")
    view = memoryview(body)
    status, pos = _take(view, 0, "u16")
    if status == Status.OK:
        # An error may answer any opcode, even one this side does not know; a result not.
        _registered()
        cls = RESULTS.get(header.opcode & ~RESPONSE_BIT)
        if cls is None:
            raise UnknownOpcodeError(f"unexpected response opcode 0x{header.opcode:02x}")
        return cls.decode_body(view, pos)
    tpm_rc, pos = _take(view, pos, "u32")
    message, pos = _take(view, pos, "str")
    if pos != len(view):
        raise ProtocolError("trailing bytes after error response")
    return ErrorResult(status, message, tpm_rc)


class FrameReader:
    """Splits a byte stream into (header, body) pairs; feed it whatever arrived."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Header, bytes]]:
        self._buf += data
        frames: list[tuple[Header, bytes]] = []
        while len(self._buf) >= HEADER_SIZE:
            header = decode_header(self._buf)
            (length,) = struct.unpack_from(">I", self._buf, 0)
            end = 4 + length
            if len(self._buf) < end:
                break
            frames.append((header, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
