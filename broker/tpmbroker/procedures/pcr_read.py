"""PCR_READ, the broker's half: TPM2_PCR_Read, which needs no authorization (no
session; PCR values are not secret)."""

from __future__ import annotations

from ..definitions import Opcode
from ..errors import BadKeyError, ProtocolError
from ..keypolicy import unmarshal_selection
from ..ops.pcr_read import PcrRead, PcrReadResult
from ..tpm import command
from ..tpm.worker import TpmWorker
from .base import Request, serves


@serves(Opcode.PCR_READ)
def serve(request: Request, msg: PcrRead) -> None:
    try:
        _, used = unmarshal_selection(msg.selection)  # an unknown bank: UnsupportedError
    except BadKeyError:
        raise ProtocolError("PCR_READ: the PCR selection cannot be read") from None
    if used != len(msg.selection):
        raise ProtocolError("PCR_READ: bytes after the PCR selection")
    worker, deadline = request.worker, request.deadline
    request.submit(lambda: pcr_read(worker, msg.selection, deadline),
                   lambda answered: PcrReadResult(*answered))


def pcr_read(tpm: TpmWorker, selection: bytes, deadline: float) -> tuple[bytes, bytes]:
    """TPM2_PCR_Read of a TPML_PCR_SELECTION: (the selection the TPM answered for, the
    values one after the other)."""
    answered, values = tpm.run(deadline, "reading PCRs",
                               lambda: command.pcr_read(tpm.link.require(), selection))
    return answered, b"".join(values)
