"""DERIVE: ECDH with a TPM key (TPM2_ECDH_ZGen). The client sends the peer's public
point; the TPM multiplies it by the key's private scalar and the broker answers the
shared point's x-coordinate, Z, the raw ECDH secret any KDF then takes (RFC 5753,
SP 800-56A). Both the peer point and the shared point cross the TPM's bus encrypted."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result

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
