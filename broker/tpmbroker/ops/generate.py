"""GENERATE: a new key made inside the TPM, returned as a TSS2 PRIVATE KEY."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode, Usage
from ..errors import ProtocolError
from ..protocol import Message, Result, _put, _take


@dataclasses.dataclass(frozen=True)
class Generate(Message):
    """The base fields, then an optional tail `u8 usage`, `u16 hash`, `bytes parent_auth`
    (docs/protocol.md): sent only when one is set, so a request without them is the
    version-1 frame; parent_auth, added last, may be absent from a tail."""

    OPCODE = Opcode.GENERATE
    FIELDS = (("key_type", "u8"), ("param", "u16"), ("auth", "bytes"), ("parent", "u32"))
    TAIL = (("usage", "u8"), ("hash", "u16"), ("parent_auth", "bytes?"), ("policy", "bytes?"))
    key_type: int
    param: int  # curve for EC, bits for RSA and RSA-PSS
    auth: bytes = b""
    parent: int = 0
    usage: int = Usage.DEFAULT  # Usage
    # The key's hash, 0 = SHA-256: its nameAlg, and an RSA-PSS key's scheme hash too.
    hash: int = 0
    parent_auth: bytes = b""  # the parent's password; omitted when empty
    # The key's policy, DER SEQUENCE OF TPMPolicy (keypolicy.py); a PolicyPCR entry
    # without a digest takes the PCRs' current values. Omitted when empty.
    policy: bytes = b""

    def __repr__(self) -> str:
        return (f"Generate(key_type={self.key_type}, param={self.param}, auth=<hidden>, "
                f"parent=0x{self.parent:08x}, usage={self.usage}, hash=0x{self.hash:04x}, "
                f"parent_auth=<hidden>, policy=<{len(self.policy)} bytes>)")

    def encode_body(self, out: bytearray) -> None:
        super().encode_body(out)
        if self.usage or self.hash or self.parent_auth or self.policy:
            for name, kind in self.TAIL:
                if name == "parent_auth" and self.policy:
                    kind = "bytes"  # written even when empty: the policy follows it
                _put(out, kind, getattr(self, name))

    @classmethod
    def decode_body(cls, body: bytes | memoryview, pos: int) -> Message:
        view = memoryview(body)
        values: dict[str, object] = {}
        for name, kind in cls.FIELDS:
            values[name], pos = _take(view, pos, kind)
        if pos == len(view):
            return cls(**values)  # type: ignore[arg-type]
        for name, kind in cls.TAIL:
            values[name], pos = _take(view, pos, kind)
        if pos != len(view):
            raise ProtocolError(f"{len(view) - pos} trailing bytes after {cls.__name__}")
        return cls(**values)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class GenerateResult(Result):
    OPCODE = Opcode.GENERATE
    FIELDS = (("key", "bytes"), ("public_key", "bytes"))
    key: bytes  # TSS2 PRIVATE KEY, DER
    public_key: bytes  # SubjectPublicKeyInfo, DER
