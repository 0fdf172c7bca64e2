"""PCR_READ: PCR values (TPM2_PCR_Read), e.g. the ones a key's PCR policy is to allow.
TPM2_PCR_Read needs no authorization, so no session is used and nothing is encrypted:
PCR values are not secret."""

from __future__ import annotations

import dataclasses

from ..definitions import Opcode
from ..errors import BadKeyError, ProtocolError
from ..keypolicy import unmarshal_selection
from ..protocol import Message, Result
from .base import Request


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


def serve(request: Request, msg: PcrRead) -> None:
    try:
        _, used = unmarshal_selection(msg.selection)  # an unknown bank: UnsupportedError
    except BadKeyError:
        raise ProtocolError("PCR_READ: the PCR selection cannot be read") from None
    if used != len(msg.selection):
        raise ProtocolError("PCR_READ: bytes after the PCR selection")
    worker, deadline = request.worker, request.deadline
    request.submit(lambda: worker.pcr_read(msg.selection, deadline),
                   lambda answered: PcrReadResult(*answered))
