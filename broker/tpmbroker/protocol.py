"""The wire protocol (docs/protocol.md): pure encode and decode, no I/O.

Every message is a frozen dataclass whose ``FIELDS`` list its wire layout; one
generic encoder and decoder serve them all, so the layout is written once.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
from typing import Any, ClassVar, TypeAlias

from .errors import (
    FrameTooLargeError,
    ProtocolError,
    Status,
    UnknownOpcodeError,
    UnsupportedVersionError,
)

VERSION = 1
MAX_FRAME = 65536
HEADER = struct.Struct(">IBBHII")  # length, version, opcode, flags, request_id, timeout_ms
HEADER_SIZE = HEADER.size
MIN_LENGTH = HEADER_SIZE - 4
MAX_LENGTH = MAX_FRAME - 4
RESPONSE_BIT = 0x80
CONNECTION_ERROR = 0x00  # opcode of an error about the whole connection
MAX_FIELD = 0xFFFF


class Opcode(enum.IntEnum):
    HELLO = 0x01
    LOAD = 0x02
    SIGN = 0x03
    GENERATE = 0x04
    STATUS = 0x05
    UNLOAD = 0x06
    RANDOM = 0x07


class KeySource(enum.IntEnum):
    TSS2_DER = 1
    PERSISTENT_HANDLE = 2


class KeyType(enum.IntEnum):
    EC = 1
    RSA = 2


class Scheme(enum.IntEnum):
    ECDSA = 1
    PKCS1 = 2
    PSS = 3


class HashAlg(enum.IntEnum):
    """TPM2_ALG ids, so the broker passes them straight to the TPM."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D

    @property
    def digest_size(self) -> int:
        return _DIGEST_SIZES[self]

    @property
    def hashlib_name(self) -> str:
        return self.name.lower()

    @classmethod
    def from_name(cls, name: str) -> HashAlg:
        """Accepts 'sha256', 'SHA2-256', 'SHA-256' and the like."""
        key = name.upper().replace("-", "").replace("_", "")
        key = {"SHA2256": "SHA256", "SHA2384": "SHA384", "SHA2512": "SHA512"}.get(key, key)
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unsupported hash {name!r}") from None


_DIGEST_SIZES = {HashAlg.SHA1: 20, HashAlg.SHA256: 32, HashAlg.SHA384: 48, HashAlg.SHA512: 64}


class Curve(enum.IntEnum):
    """TPM2_ECC_CURVE ids."""

    NONE = 0x0000
    P256 = 0x0003
    P384 = 0x0004


STORAGE_PRIMARY = 0x40000001


def key_id_for(source: KeySource, key: bytes) -> bytes:
    """SHA-256 over source ‖ key: the same blob always has the same id."""
    return hashlib.sha256(bytes([source]) + key).digest()


# --- messages -------------------------------------------------------------------

class Message:
    """A request or a successful response body. Subclasses are frozen dataclasses."""

    OPCODE: ClassVar[Opcode]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    OPCODE = Opcode.HELLO
    FIELDS = (("max_version", "u8"), ("client", "str"))
    max_version: int = VERSION
    client: str = ""


@dataclasses.dataclass(frozen=True)
class Load(Message):
    OPCODE = Opcode.LOAD
    FIELDS = (("source", "u8"), ("key", "bytes"), ("auth", "bytes"))
    source: int
    key: bytes
    auth: bytes = b""

    def __repr__(self) -> str:  # never print passwords
        return f"Load(source={self.source}, key=<{len(self.key)} bytes>, auth=<hidden>)"


@dataclasses.dataclass(frozen=True)
class Sign(Message):
    OPCODE = Opcode.SIGN
    FIELDS = (("key_id", "bytes"), ("scheme", "u8"), ("hash", "u16"), ("digest", "bytes"))
    key_id: bytes
    scheme: int
    hash: int
    digest: bytes


@dataclasses.dataclass(frozen=True)
class Generate(Message):
    OPCODE = Opcode.GENERATE
    FIELDS = (("key_type", "u8"), ("param", "u16"), ("auth", "bytes"), ("parent", "u32"))
    key_type: int
    param: int
    auth: bytes = b""
    parent: int = 0

    def __repr__(self) -> str:
        return (f"Generate(key_type={self.key_type}, param={self.param}, auth=<hidden>, "
                f"parent=0x{self.parent:08x})")


@dataclasses.dataclass(frozen=True)
class StatusRequest(Message):
    OPCODE = Opcode.STATUS


@dataclasses.dataclass(frozen=True)
class Unload(Message):
    OPCODE = Opcode.UNLOAD
    FIELDS = (("key_id", "bytes"),)
    key_id: bytes


# --- RANDOM: bytes from the TPM's random number generator ---------------------------

MAX_RANDOM = 1024  # bytes per RANDOM request; a larger count is UNSUPPORTED


@dataclasses.dataclass(frozen=True)
class Random(Message):
    OPCODE = Opcode.RANDOM
    FIELDS = (("count", "u16"),)
    count: int


@dataclasses.dataclass(frozen=True)
class RandomResult(Message):
    OPCODE = Opcode.RANDOM
    FIELDS = (("random", "bytes"),)
    random: bytes

    def __repr__(self) -> str:  # random bytes may become keys: never print them
        return f"RandomResult(random=<{len(self.random)} bytes>)"


@dataclasses.dataclass(frozen=True)
class HelloResult(Message):
    OPCODE = Opcode.HELLO
    FIELDS = (("version", "u8"), ("server", "str"), ("max_frame", "u32"))
    version: int
    server: str
    max_frame: int


@dataclasses.dataclass(frozen=True)
class LoadResult(Message):
    OPCODE = Opcode.LOAD
    FIELDS = (("key_id", "bytes"), ("key_type", "u8"), ("bits", "u16"), ("curve", "u16"),
              ("public_key", "bytes"))
    key_id: bytes
    key_type: int
    bits: int
    curve: int
    public_key: bytes


@dataclasses.dataclass(frozen=True)
class SignResult(Message):
    OPCODE = Opcode.SIGN
    FIELDS = (("signature", "bytes"),)
    signature: bytes


@dataclasses.dataclass(frozen=True)
class GenerateResult(Message):
    OPCODE = Opcode.GENERATE
    FIELDS = (("key", "bytes"), ("public_key", "bytes"))
    key: bytes
    public_key: bytes


@dataclasses.dataclass(frozen=True)
class StatusResult(Message):
    OPCODE = Opcode.STATUS
    FIELDS = (("json", "str"),)
    json: str


@dataclasses.dataclass(frozen=True)
class UnloadResult(Message):
    OPCODE = Opcode.UNLOAD


@dataclasses.dataclass(frozen=True)
class ErrorResult:
    """A response whose status is not OK."""

    status: int
    message: str
    tpm_rc: int = 0


Request: TypeAlias = Hello | Load | Sign | Generate | StatusRequest | Unload | Random
Result: TypeAlias = (
    HelloResult | LoadResult | SignResult | GenerateResult | StatusResult | UnloadResult
    | RandomResult
)

REQUESTS: dict[int, type[Message]] = {
    cls.OPCODE: cls for cls in (Hello, Load, Sign, Generate, StatusRequest, Unload, Random)
}
RESULTS: dict[int, type[Message]] = {
    cls.OPCODE: cls
    for cls in (HelloResult, LoadResult, SignResult, GenerateResult, StatusResult, UnloadResult,
                RandomResult)
}


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


def _put(out: bytearray, kind: str, value: Any) -> None:
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


def _encode_fields(msg: Message, out: bytearray) -> None:
    for name, kind in msg.FIELDS:
        _put(out, kind, getattr(msg, name))


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
    return HEADER.pack(length, VERSION, opcode, 0, request_id, timeout_ms) + bytes(body)


# --- frames -------------------------------------------------------------------------

def encode_request(request_id: int, msg: Message, timeout_ms: int = 0) -> bytes:
    body = bytearray()
    _encode_fields(msg, body)
    return _frame(msg.OPCODE, request_id, timeout_ms, body)


def encode_response(request_id: int, opcode: int, result: Message | ErrorResult) -> bytes:
    if type(result) is SignResult and len(result.signature) <= MAX_FIELD:
        signature = result.signature  # the common answer, in one pack
        return _SIGN_RESULT_HEAD.pack(
            _SIGN_RESULT_HEAD.size - 4 + len(signature), VERSION, opcode | RESPONSE_BIT, 0,
            request_id, 0, Status.OK, len(signature)) + signature
    body = bytearray()
    if isinstance(result, ErrorResult):
        _put(body, "u16", result.status)
        _put(body, "u32", result.tpm_rc)
        _put(body, "str", result.message[:1024])
    else:
        _put(body, "u16", Status.OK)
        _encode_fields(result, body)
    return _frame(opcode | RESPONSE_BIT, request_id, 0, body)


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


_U16 = _INTS["u16"]
_SIGN_MIDDLE = struct.Struct(">BHH")  # scheme, hash, digest length
_SIGN_RESULT_HEAD = struct.Struct(">IBBHIIHH")  # header, status, signature length


def decode_request(header: Header, body: bytes | memoryview) -> Message:
    check_header(header)
    if header.opcode == Opcode.SIGN:
        sign = _decode_sign(body)
        if sign is not None:
            return sign
    cls = REQUESTS.get(header.opcode)
    if cls is None:
        raise UnknownOpcodeError(f"unknown opcode 0x{header.opcode:02x}")
    return _decode_fields(cls, memoryview(body), 0)


def _decode_sign(body: bytes | memoryview) -> Sign | None:
    """SIGN, the request that comes thousands of times a second, unrolled; None when
    anything is off, and the general decoder says what."""
    try:
        (key_len,) = _U16.unpack_from(body, 0)
        scheme, hash_alg, digest_len = _SIGN_MIDDLE.unpack_from(body, 2 + key_len)
    except struct.error:
        return None
    start = 7 + key_len
    if start + digest_len != len(body):
        return None
    return Sign(bytes(body[2:2 + key_len]), scheme, hash_alg, bytes(body[start:]))


def decode_response(header: Header, body: bytes | memoryview) -> Message | ErrorResult:
    check_header(header)
    if not header.is_response:
        raise UnknownOpcodeError(f"0x{header.opcode:02x} is not a response opcode")
    view = memoryview(body)
    status, pos = _take(view, 0, "u16")
    if status == Status.OK:
        # An error may answer any opcode, even one this side does not know; a result not.
        cls = RESULTS.get(header.opcode & ~RESPONSE_BIT)
        if cls is None:
            raise UnknownOpcodeError(f"unexpected response opcode 0x{header.opcode:02x}")
        return _decode_fields(cls, view, pos)
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
