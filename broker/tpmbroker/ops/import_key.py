"""IMPORT: a key wrapped to this TPM's parent becomes a loadable key file (TPM2_Import).

The client sends an importable TSS2 PRIVATE KEY (OID 2.23.133.10.1.4): the key's public
area, its sensitive area encrypted under a seed, and the seed encrypted to the parent's
public key (tpmbroker/wrap.py makes one). Only this TPM can recover the seed, so the
broker and the TPM's bus see nothing of the private key in the clear. The broker runs
TPM2_Import through a pool session and answers the loadable TSS2 PRIVATE KEY (OID
2.23.133.10.1.3).

A request with an empty `key` imports nothing: the answer carries the public area
(TPM2B_PUBLIC) of `parent` alone, the key a client wraps to.
"""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class Import(Message):
    OPCODE = Opcode.IMPORT
    FIELDS = (("parent", "u32"), ("key", "bytes"), ("parent_auth", "bytes?"))
    parent: int  # with an empty key: whose public area to answer; 0 = 0x40000001
    key: bytes = b""  # an importable TSS2 PRIVATE KEY (DER), or nothing
    parent_auth: bytes = b""  # the parent's password; trailing, omitted when empty

    def __repr__(self) -> str:  # never print passwords
        return (f"Import(parent=0x{self.parent:08x}, key=<{len(self.key)} bytes>, "
                "parent_auth=<hidden>)")


@dataclasses.dataclass(frozen=True)
class ImportResult(Result):
    OPCODE = Opcode.IMPORT
    FIELDS = (("parent_public", "bytes"), ("key", "bytes"))
    parent_public: bytes  # TPM2B_PUBLIC of the parent the key was (or is to be) wrapped to
    key: bytes = b""  # the loadable TSS2 PRIVATE KEY (DER); empty when nothing was imported
