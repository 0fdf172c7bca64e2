"""Key references as clients give them: TSS2 PRIVATE KEY files (PEM or DER) or
persistent handles, and what LOAD sends for them."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from . import protocol as p
from .errors import BadKeyError
from .keyfile import to_der_if_pem
from .ops.load import Load

_HANDLE_RE = re.compile(r"^(?:handle:)?(0x81[0-9a-fA-F]{6})$")


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

    def load_request(self) -> Load:
        return Load(self.source, self.key, self.auth, self.parent_auth)

    @classmethod
    def from_handle(cls, handle: int, password: bytes | str | None = None) -> KeySpec:
        if not 0x81000000 <= handle <= 0x81FFFFFF:
            raise BadKeyError(f"0x{handle:08x} is not a persistent handle (0x81xxxxxx)")
        return cls(p.KeySource.PERSISTENT_HANDLE, handle.to_bytes(4, "big"), _auth(password))

    @classmethod
    def from_bytes(cls, data: bytes, password: bytes | str | None = None) -> KeySpec:
        """PEM (label TSS2 PRIVATE KEY) or DER."""
        der = to_der_if_pem(data)
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


def _auth(password: bytes | str | None) -> bytes:
    if password is None:
        return b""
    return password.encode() if isinstance(password, str) else bytes(password)
