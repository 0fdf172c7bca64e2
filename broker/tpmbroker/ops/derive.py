"""DERIVE: ECDH with a TPM key (TPM2_ECDH_ZGen). The client sends the peer's public
point; the TPM multiplies it by the key's private scalar and the broker answers the
shared point's x-coordinate, Z, the raw ECDH secret any KDF then takes (RFC 5753,
SP 800-56A). Both the peer point and the shared point cross the TPM's bus encrypted."""

from __future__ import annotations

import dataclasses
import struct

from ..definitions import Opcode
from ..protocol import BytesResult, Message

_U16 = struct.Struct(">H")

# The largest uncompressed point the broker accepts: P-521's 1 + 2 * 66 bytes.
MAX_POINT = 133


@dataclasses.dataclass(frozen=True)
class Derive(Message):
    OPCODE = Opcode.DERIVE
    FIELDS = (("key_id", "bytes"), ("point", "bytes"))
    key_id: bytes
    point: bytes  # the peer's public key: an uncompressed SEC1 point, 0x04 || x || y

    @classmethod
    def decode_body(cls, body: bytes | memoryview, pos: int) -> Message:
        # Unrolled as SIGN's is: anything off goes to the general decoder, which says what.
        try:
            (key_len,) = _U16.unpack_from(body, pos)
            key_end = pos + 2 + key_len
            (point_len,) = _U16.unpack_from(body, key_end)
        except struct.error:
            return super().decode_body(body, pos)
        if key_end + 2 + point_len != len(body):
            return super().decode_body(body, pos)
        return cls(bytes(body[pos + 2:key_end]), bytes(body[key_end + 2:]))


@dataclasses.dataclass(frozen=True)
class DeriveResult(BytesResult):
    OPCODE = Opcode.DERIVE
    FIELDS = (("secret", "bytes"),)
    secret: bytes  # Z: the shared point's x-coordinate, as long as the curve's field

    def __repr__(self) -> str:  # a shared secret: never print it
        return f"DeriveResult(secret=<{len(self.secret)} bytes>)"
