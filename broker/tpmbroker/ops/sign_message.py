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
import hashlib

from ..definitions import MAX_MESSAGE, Opcode
from ..errors import UnsupportedError
from ..protocol import Message
from .base import Request
from .sign import SignResult, scheme_and_hash


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


def serve(request: Request, msg: SignMessage) -> None:
    auth = request.key_auth(msg.key_id, ("sign",))
    scheme, hash = scheme_and_hash(msg.scheme, msg.hash)
    key_id, message = msg.key_id, msg.message
    if len(message) > MAX_MESSAGE:
        raise UnsupportedError(f"message of {len(message)} bytes: SIGN_MESSAGE carries at "
                               f"most {MAX_MESSAGE} (MAX_MESSAGE)")
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    worker.check_password(key_id, auth, peer)
    if worker.restricted(key_id) is False:
        # An ordinary key: hash here and sign the digest as SIGN does, lane and all.
        digest = hashlib.new(hash.hashlib_name, message).digest()
        request.submit(lambda: worker.sign(key_id, auth, scheme, hash, digest, deadline,
                                           peer=peer),
                       SignMessageResult,
                       lane=lambda: worker.lane_sign(key_id, auth, scheme, hash, digest,
                                                     peer=peer))
        return
    request.submit(lambda: worker.sign_message(key_id, auth, scheme, hash, message,
                                               deadline, peer=peer),
                   SignMessageResult)
