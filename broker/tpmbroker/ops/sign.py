"""SIGN: the TPM signs a digest the client computed, with a key LOADed on this
connection. The common case is served on the event loop's lane (tpmbroker.server)."""

from __future__ import annotations

import dataclasses
import struct

from ..definitions import MAX_FIELD, RESPONSE_BIT, VERSION, Hash, Opcode, Scheme, Status
from ..errors import BadDigestError, UnsupportedError
from ..protocol import Message, Result
from .base import Request

_U16 = struct.Struct(">H")
_MIDDLE = struct.Struct(">BHH")  # scheme, hash, digest length
_RESULT_HEAD = struct.Struct(">IBBHIIHH")  # frame header, status, signature length


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
class SignResult(Result):
    OPCODE = Opcode.SIGN
    FIELDS = (("signature", "bytes"),)
    signature: bytes  # DER ECDSA-Sig-Value, or the RSA signature at the modulus' length

    def encode_frame(self, request_id: int, opcode: int) -> bytes:
        # The answer that goes out thousands of times a second, in one pack.
        signature = self.signature
        if len(signature) > MAX_FIELD:
            return super().encode_frame(request_id, opcode)  # which says what is wrong
        return _RESULT_HEAD.pack(_RESULT_HEAD.size - 4 + len(signature), VERSION,
                                 opcode | RESPONSE_BIT, 0, request_id, 0, Status.OK,
                                 len(signature)) + signature


def scheme_and_hash(scheme: int, hash: int) -> tuple[Scheme, Hash]:
    try:
        return Scheme(scheme), Hash(hash)
    except ValueError:
        raise UnsupportedError(f"unknown signature scheme {scheme} or hash algorithm "
                               f"{hash}") from None


def serve(request: Request, msg: Sign) -> None:
    auth = request.key_auth(msg.key_id, ("sign",))
    scheme, hash = scheme_and_hash(msg.scheme, msg.hash)
    key_id, digest = msg.key_id, msg.digest
    if len(digest) != hash.digest_size:
        raise BadDigestError(f"digest of {len(digest)} bytes for {hash.name}, "
                             f"which needs {hash.digest_size}")
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    # Password attempts the dictionary-attack shield refuses are answered now, unqueued.
    worker.check_password(key_id, auth, peer)
    request.submit(lambda: worker.sign(key_id, auth, scheme, hash, digest, deadline,
                                       peer=peer),
                   SignResult,
                   lane=lambda: worker.lane_sign(key_id, auth, scheme, hash, digest,
                                                 peer=peer))
