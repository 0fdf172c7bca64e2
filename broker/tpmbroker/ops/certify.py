"""CERTIFY: a key attestation statement for a key LOADed on this connection.

The broker's attestation key certifies the key's Name with TPM2_Certify over the
SHA-256 of the client's challenge, and the answer is the whole statement
(tpmbroker.attestation: the WebAuthn "tpm" format, with the EK certificate and the
attestation key's certificate), which anyone can check offline.
"""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Certify(Message):
    OPCODE = Opcode.CERTIFY
    FIELDS = (("key_id", "bytes"), ("challenge", "bytes"))
    key_id: bytes
    challenge: bytes


@dataclasses.dataclass(frozen=True)
class CertifyResult(Result):
    OPCODE = Opcode.CERTIFY
    FIELDS = (("statement", "bytes"),)
    statement: bytes
