"""Key references as clients give them: TSS2 PRIVATE KEY files (PEM or DER) or handles."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from . import ops
from . import protocol as p
from .errors import BadKeyError

PEM_LABEL = "TSS2 PRIVATE KEY"
_PEM_RE = re.compile(
    rb"-----BEGIN TSS2 PRIVATE KEY-----\s*(.+?)\s*-----END TSS2 PRIVATE KEY-----", re.S)
_HANDLE_RE = re.compile(r"^(?:handle:)?(0x81[0-9a-fA-F]{6})$")


def pem_to_der(data: bytes) -> bytes:
    import base64
    import binascii

    match = _PEM_RE.search(data)
    if match is None:
        raise BadKeyError(f"no '-----BEGIN {PEM_LABEL}-----' block found")
    try:
        return base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error as exc:
        raise BadKeyError(f"bad base64 in {PEM_LABEL} PEM: {exc}") from None


def der_to_pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {PEM_LABEL}-----\n".encode() + b"\n".join(lines)
            + f"\n-----END {PEM_LABEL}-----\n".encode())


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """What LOAD sends: where the key comes from, its bytes, and its password."""

    source: p.KeySource
    key: bytes
    auth: bytes = dataclasses.field(default=b"", repr=False)
    # The password of the key's parent (a persistent parent's, or for 0x40000001 the owner
    # hierarchy's); LOAD carries it, the key id does not depend on it.
    parent_auth: bytes = dataclasses.field(default=b"", repr=False)

    @property
    def key_id(self) -> bytes:
        return p.key_id_for(self.source, self.key)

    def load_request(self) -> ops.Load:
        return ops.Load(self.source, self.key, self.auth, self.parent_auth)

    @classmethod
    def from_handle(cls, handle: int, password: bytes | str | None = None) -> KeySpec:
        if not 0x81000000 <= handle <= 0x81FFFFFF:
            raise BadKeyError(f"0x{handle:08x} is not a persistent handle (0x81xxxxxx)")
        return cls(p.KeySource.PERSISTENT_HANDLE, handle.to_bytes(4, "big"), _auth(password))

    @classmethod
    def from_bytes(cls, data: bytes, password: bytes | str | None = None) -> KeySpec:
        """PEM (label TSS2 PRIVATE KEY) or DER."""
        der = pem_to_der(data) if b"-----BEGIN" in data else data
        if not der.startswith(b"\x30"):
            raise BadKeyError("not a TSS2 PRIVATE KEY (PEM or DER expected)")
        return cls(p.KeySource.TSS2_DER, der, _auth(password))

    @classmethod
    def from_any(cls, key: bytes | str | os.PathLike[str] | int,
                 password: bytes | str | None = None,
                 parent_auth: bytes | str | None = None) -> KeySpec:
        spec = cls._from_any(key, password)
        if parent_auth:
            spec = dataclasses.replace(spec, parent_auth=_auth(parent_auth))
        return spec

    @classmethod
    def _from_any(cls, key: bytes | str | os.PathLike[str] | int,
                  password: bytes | str | None = None) -> KeySpec:
        if isinstance(key, int):
            return cls.from_handle(key, password)
        if isinstance(key, bytes):
            return cls.from_bytes(key, password)
        text = os.fspath(key)
        match = _HANDLE_RE.match(text)
        if match:
            return cls.from_handle(int(match.group(1), 16), password)
        try:
            data = Path(text).read_bytes()
        except OSError as exc:
            raise BadKeyError(f"cannot read key file {text}: {exc.strerror}") from None
        return cls.from_bytes(data, password)


def tss2_parent(der: bytes) -> int | None:
    """The parent field of a DER TSS2 PRIVATE KEY (SEQUENCE { type OID, [0] emptyAuth
    OPTIONAL, ..., parent INTEGER, ... }), or None where it does not read. The broker checks
    the whole key; this only decides whose password a client sends with it."""
    def element(pos: int) -> tuple[int, int, int]:  # (tag, start of contents, end)
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if not 1 <= count <= 3:
                raise ValueError("length")
            length = int.from_bytes(der[pos:pos + count], "big")
            pos += count
        return tag, pos, pos + length

    try:
        tag, pos, _end = element(0)
        if tag != 0x30:
            return None
        tag, _start, pos = element(pos)  # the type OID
        tag, start, end = element(pos)
        while tag & 0xE0 == 0xA0:  # [0] emptyAuth, [2] secret and the other [n] fields
            tag, start, end = element(end)
        if tag != 0x02 or not 1 <= end - start <= 5:
            return None
        return int.from_bytes(der[start:end], "big")
    except (IndexError, ValueError):
        return None


def _auth(password: bytes | str | None) -> bytes:
    if password is None:
        return b""
    return password.encode() if isinstance(password, str) else bytes(password)
