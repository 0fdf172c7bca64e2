"""DECRYPT: RSA decryption (TPM2_RSA_Decrypt) with a key LOADed on this connection.

The plaintext crosses the TPM's bus encrypted (response parameter encryption) and
never appears in logs: the result's repr hides it. PKCS#1 v1.5 with implicit rejection
answers a bad padding with a synthetic message, never an error (tpm/depad.c).
"""

from __future__ import annotations

import dataclasses
import struct

from ..definitions import DecryptFlag, Opcode
from ..protocol import BytesResult, Message

KNOWN_FLAGS = int(DecryptFlag.IMPLICIT_REJECTION)
_U16 = struct.Struct(">H")
_MIDDLE = struct.Struct(">BBHHH")  # padding, flags, hash, MGF1 hash, label length


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

    @classmethod
    def decode_body(cls, body: bytes | memoryview, pos: int) -> Message:
        # Unrolled as SIGN's is: anything off goes to the general decoder, which says what.
        try:
            (key_len,) = _U16.unpack_from(body, pos)
            key_end = pos + 2 + key_len
            padding, flags, hash, mgf1_hash, label_len = _MIDDLE.unpack_from(body, key_end)
            label_end = key_end + 8 + label_len
            (ciphertext_len,) = _U16.unpack_from(body, label_end)
        except struct.error:
            return super().decode_body(body, pos)
        if label_end + 2 + ciphertext_len != len(body):
            return super().decode_body(body, pos)
        return cls(bytes(body[pos + 2:key_end]), padding, flags, hash, mgf1_hash,
                   bytes(body[key_end + 8:label_end]), bytes(body[label_end + 2:]))


@dataclasses.dataclass(frozen=True)
class DecryptResult(BytesResult):
    OPCODE = Opcode.DECRYPT
    FIELDS = (("plaintext", "bytes"),)
    plaintext: bytes

    def __repr__(self) -> str:  # decrypted secrets are never printed
        return f"DecryptResult(plaintext=<{len(self.plaintext)} bytes>)"
