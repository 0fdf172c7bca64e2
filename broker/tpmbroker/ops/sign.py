"""SIGN: the TPM signs a digest the client computed, with a key LOADed on this
connection. The common case is served on the event loop's lane (tpmbroker.server)."""

from __future__ import annotations

import dataclasses
import struct

from ..definitions import Hash, Opcode, Scheme
from ..errors import UnsupportedError
from ..protocol import BytesResult, Message

_U16 = struct.Struct(">H")
_MIDDLE = struct.Struct(">BHH")  # scheme, hash, digest length


@dataclasses.dataclass(frozen=True)
class Sign(Message):
    OPCODE = Opcode.SIGN
    FIELDS = (("key_id", "bytes"), ("scheme", "u8"), ("hash", "u16"), ("digest", "bytes"))
    key_id: bytes
    scheme: int
    hash: int
    digest: bytes

    @classmethod
    def decode_body(cls, body: bytes | memoryview, pos: int) -> Message:
        # The request that comes thousands of times a second, unrolled; anything off
        # goes to the general decoder, which says what.
        try:
            (key_len,) = _U16.unpack_from(body, pos)
            scheme, hash, digest_len = _MIDDLE.unpack_from(body, pos + 2 + key_len)
        except struct.error:
            return super().decode_body(body, pos)
        start = pos + 7 + key_len
        if start + digest_len != len(body):
            return super().decode_body(body, pos)
        return cls(bytes(body[pos + 2:pos + 2 + key_len]), scheme, hash, bytes(body[start:]))


@dataclasses.dataclass(frozen=True)
class SignResult(BytesResult):
    OPCODE = Opcode.SIGN
    FIELDS = (("signature", "bytes"),)
    signature: bytes  # DER ECDSA-Sig-Value, or the RSA signature at the modulus' length


def scheme_and_hash(scheme: int, hash: int) -> tuple[Scheme, Hash]:
    try:
        return Scheme(scheme), Hash(hash)
    except ValueError:
        raise UnsupportedError(f"unknown signature scheme {scheme} or hash algorithm "
                               f"{hash}") from None
