"""DERIVE: ECDH with a TPM key (TPM2_ECDH_ZGen). The client sends the peer's public
point; the TPM multiplies it by the key's private scalar and the broker answers the
shared point's x-coordinate, Z, the raw ECDH secret any KDF then takes (RFC 5753,
SP 800-56A). Both the peer point and the shared point cross the TPM's bus encrypted."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..errors import BadDigestError
from ..protocol import Message, Result
from .base import Request

# The largest uncompressed point the broker accepts: P-521's 1 + 2 * 66 bytes.
MAX_POINT = 133


@dataclasses.dataclass(frozen=True)
class Derive(Message):
    OPCODE = Opcode.DERIVE
    FIELDS = (("key_id", "bytes"), ("point", "bytes"))
    key_id: bytes
    point: bytes  # the peer's public key: an uncompressed SEC1 point, 0x04 || x || y


@dataclasses.dataclass(frozen=True)
class DeriveResult(Result):
    OPCODE = Opcode.DERIVE
    FIELDS = (("secret", "bytes"),)
    secret: bytes  # Z: the shared point's x-coordinate, as long as the curve's field

    def __repr__(self) -> str:  # a shared secret: never print it
        return f"DeriveResult(secret=<{len(self.secret)} bytes>)"


def serve(request: Request, msg: Derive) -> None:
    auth = request.key_auth(msg.key_id, ("derive",))
    point = msg.point
    if not (3 <= len(point) <= MAX_POINT and len(point) % 2 == 1 and point[0] == 0x04):
        raise BadDigestError("the peer's public key must be an uncompressed EC point "
                             f"(0x04, x, y), not {len(point)} bytes starting "
                             f"{point[:1].hex() or 'with nothing'}")
    key_id, worker, deadline, peer = msg.key_id, request.worker, request.deadline, \
        request.peer_uid
    # Password attempts the dictionary-attack shield refuses are answered now, unqueued.
    worker.check_password(key_id, auth, peer)

    def served(secret: bytes) -> DeriveResult:
        request.count("derivations")
        return DeriveResult(secret)

    request.submit(lambda: worker.derive(key_id, auth, point, deadline, peer=peer), served)
