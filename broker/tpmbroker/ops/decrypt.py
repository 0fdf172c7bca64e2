"""DECRYPT: RSA decryption (TPM2_RSA_Decrypt) with a key LOADed on this connection.

The plaintext crosses the TPM's bus encrypted (response parameter encryption) and
never appears in logs: the result's repr hides it. PKCS#1 v1.5 with implicit rejection
answers a bad padding with a synthetic message, never an error (tpm/depad.c).
"""

from __future__ import annotations

import dataclasses

from ..definitions import DecryptFlag, Opcode
from ..protocol import Message, Result

KNOWN_FLAGS = int(DecryptFlag.IMPLICIT_REJECTION)


@dataclasses.dataclass(frozen=True)
class Decrypt(Message):
    OPCODE = Opcode.DECRYPT
    FIELDS = (("key_id", "bytes"), ("padding", "u8"), ("flags", "u8"), ("hash", "u16"),
              ("mgf1_hash", "u16"), ("label", "bytes"), ("ciphertext", "bytes"))
    key_id: bytes
    padding: int
    flags: int
    hash: int  # OAEP: the label and digest hash; 0 otherwise
    mgf1_hash: int  # OAEP: MGF1's hash; 0 otherwise
    label: bytes  # OAEP: the label, exactly as the encrypter used it
    ciphertext: bytes


@dataclasses.dataclass(frozen=True)
class DecryptResult(Result):
    OPCODE = Opcode.DECRYPT
    FIELDS = (("plaintext", "bytes"),)
    plaintext: bytes

    def __repr__(self) -> str:  # decrypted secrets are never printed
        return f"DecryptResult(plaintext=<{len(self.plaintext)} bytes>)"
