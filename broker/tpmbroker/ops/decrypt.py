"""DECRYPT: RSA decryption (TPM2_RSA_Decrypt) with a key LOADed on this connection.

The plaintext crosses the TPM's bus encrypted (response parameter encryption) and
never appears in logs: the result's repr hides it. PKCS#1 v1.5 with implicit rejection
answers a bad padding with a synthetic message, never an error (tpm/depad.c).
"""

from __future__ import annotations

import dataclasses

from ..definitions import DecryptFlag, Hash, Opcode, Padding
from ..errors import UnsupportedError
from ..protocol import Message, Result
from .base import Request, member

_KNOWN_FLAGS = int(DecryptFlag.IMPLICIT_REJECTION)


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


def serve(request: Request, msg: Decrypt) -> None:
    padding = member(Padding, msg.padding, "padding")
    if msg.flags & ~_KNOWN_FLAGS:
        raise UnsupportedError(f"unknown DECRYPT flags 0x{msg.flags & ~_KNOWN_FLAGS:02x}")
    implicit = bool(msg.flags & DecryptFlag.IMPLICIT_REJECTION)
    # With a key that can sign (an unknown key counts as one), raw decryption is m^d mod n,
    # a signature by another name, and PKCS#1 v1.5 that answers a bad padding with an
    # error is a Bleichenbacher oracle, which computes m^d too: the key policy must grant
    # sign as well as decrypt. OAEP and implicit rejection give no such answer.
    gives_signatures = (padding is Padding.NONE or (padding is Padding.PKCS1 and not implicit))
    rights = ("decrypt", "sign") if gives_signatures and request.worker.signs(msg.key_id) \
        is not False else ("decrypt",)
    auth = request.key_auth(msg.key_id, rights)
    if padding is Padding.OAEP:
        hash = member(Hash, msg.hash, "OAEP hash")
        mgf1 = member(Hash, msg.mgf1_hash or msg.hash, "MGF1 hash")
    elif msg.hash or msg.mgf1_hash or msg.label:
        raise UnsupportedError(f"{padding.name} padding takes no hash, MGF1 hash or label")
    else:
        hash = mgf1 = Hash.SHA256  # unused
    if implicit and padding is not Padding.PKCS1:
        raise UnsupportedError("implicit rejection is for PKCS#1 v1.5 padding only")
    key_id, label, ciphertext = msg.key_id, msg.label, msg.ciphertext
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    worker.check_password(key_id, auth, peer)

    def served(plaintext: bytes) -> DecryptResult:
        request.count("decryptions")
        return DecryptResult(plaintext)

    request.submit(lambda: worker.decrypt(key_id, auth, padding, hash, mgf1, label,
                                          ciphertext, implicit, deadline, peer=peer),
                   served)
