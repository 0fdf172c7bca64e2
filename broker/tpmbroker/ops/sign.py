"""SIGN: the TPM signs a digest the client computed, with a key LOADed on this
connection. The common case is served on the event loop's lane (tpmbroker.server)."""

from __future__ import annotations

import dataclasses
import struct

from ..definitions import MAX_FIELD, Hash, Opcode, Scheme
from ..errors import BadDigestError
from ..protocol import Message, Result
from .base import Request, member

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
    def decode_body(cls, body: memoryview, pos: int) -> Message:
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
class SignResult(Result):
    OPCODE = Opcode.SIGN
    FIELDS = (("signature", "bytes"),)
    signature: bytes  # DER ECDSA-Sig-Value, or the RSA signature at the modulus' length

    def encode_body(self, out: bytearray) -> None:
        # The answer that goes out thousands of times a second, unrolled.
        if len(self.signature) > MAX_FIELD:
            super().encode_body(out)  # which says what is wrong
            return
        out += _U16.pack(len(self.signature))
        out += self.signature


def serve(request: Request, msg: Sign) -> None:
    auth = request.key_auth(msg.key_id)
    scheme = member(Scheme, msg.scheme, "signature scheme")
    hash = member(Hash, msg.hash, "hash algorithm")
    if len(msg.digest) != hash.digest_size:
        raise BadDigestError(f"digest of {len(msg.digest)} bytes for {hash.name}, "
                             f"which needs {hash.digest_size}")
    worker, deadline = request.worker, request.deadline

    def signed(signature: bytes) -> SignResult:
        request.count("signatures")
        return SignResult(signature)

    request.submit(lambda: worker.sign(msg.key_id, auth, scheme, hash, msg.digest, deadline),
                   signed,
                   lane=lambda: worker.lane_sign(msg.key_id, auth, scheme, hash, msg.digest))
