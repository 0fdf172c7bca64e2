"""PCR_READ: PCR values (TPM2_PCR_Read), e.g. the ones a key's PCR policy is to allow.
TPM2_PCR_Read needs no authorization, so no session is used and nothing is encrypted:
PCR values are not secret."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..protocol import Message, Result


@dataclasses.dataclass(frozen=True)
class PcrRead(Message):
    OPCODE = Opcode.PCR_READ
    FIELDS = (("selection", "bytes"),)
    selection: bytes  # TPML_PCR_SELECTION


@dataclasses.dataclass(frozen=True)
class PcrReadResult(Result):
    OPCODE = Opcode.PCR_READ
    FIELDS = (("selection", "bytes"), ("values", "bytes"))
    selection: bytes  # the TPML_PCR_SELECTION the TPM answered for (it may answer fewer)
    values: bytes  # their values, one after the other, in the TPM's order
