"""SIGN_MESSAGE: the TPM signs a message, not a digest, with a key LOADed on this
connection.

Restricted signing keys (attestation keys, `tpm2_createak`) sign only a digest the TPM
made itself: the broker hashes the message in the TPM (TPM2_Hash, or a hash sequence
for longer messages), which yields the ticket TPM2_Sign wants. Any other key may be
signed through this operation too: the broker hashes the message itself and signs the
digest as SIGN does (so a client that does not know whether a key is restricted, one
loaded by handle, can always send the message).
"""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message
from .sign import SignResult


@dataclasses.dataclass(frozen=True)
class SignMessage(Message):
    OPCODE = Opcode.SIGN_MESSAGE
    FIELDS = (("key_id", "bytes"), ("scheme", "u8"), ("hash", "u16"), ("message", "bytes"))
    key_id: bytes
    scheme: int
    hash: int
    message: bytes

    def __repr__(self) -> str:  # messages may be long; their bytes say nothing in logs
        return (f"SignMessage(key_id={self.key_id.hex()[:16]}…, scheme={self.scheme}, "
                f"hash={self.hash}, message=<{len(self.message)} bytes>)")


@dataclasses.dataclass(frozen=True)
class SignMessageResult(SignResult):
    OPCODE = Opcode.SIGN_MESSAGE
