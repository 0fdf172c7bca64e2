"""NV_READ, the broker's half: an NV index read through a pool session that encrypts
each chunk on its way back (certificates tpm2-tools stored, EK certificates)."""

from __future__ import annotations

import functools

from tpm2_pytss.constants import TPM2_PT_NV, TPM2_RH, TPMA_NV
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..definitions import Opcode
from ..errors import BadKeyError, UnsupportedError
from ..ops.nv_read import NV_FIRST, NV_LAST, NvRead, NvReadResult
from ..tpm import command
from ..tpm.rc import tpm_code
from ..tpm.worker import TpmWorker
from .base import Request, serves


@serves(Opcode.NV_READ)
def serve(request: Request, msg: NvRead) -> None:
    if not NV_FIRST <= msg.index <= NV_LAST:
        raise BadKeyError(f"0x{msg.index:08x} is not an NV index (0x01xxxxxx)")
    worker, deadline = request.worker, request.deadline
    request.submit(lambda: nv_read(worker, msg.index, deadline), NvReadResult)


def nv_read(tpm: TpmWorker, index: int, deadline: float) -> bytes:
    """The whole contents of NV index `index`, read through a pool session that
    encrypts each chunk on its way back.

    Authorization is the index's own empty authValue when the index allows that and
    counts no dictionary-attack failures (as certificate indexes do), else the owner
    hierarchy's empty authValue; an index that needs a password is refused without
    trying, so nothing here can cost a lockout count.
    """
    return tpm.run(deadline, "reading the NV index",
                   functools.partial(_nv_read_once, tpm, index, deadline))


def _nv_read_once(tpm: TpmWorker, index: int, deadline: float) -> bytes:
    transport = tpm.link.require()
    try:
        public, name = command.nv_read_public(transport, index)
    except TSS2_Exception as exc:
        if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
            raise BadKeyError(f"no NV index at 0x{index:08x}",
                              tpm_rc=int(exc.rc)) from None
        raise
    attributes = int(public.attributes)
    if attributes & TPMA_NV.AUTHREAD and attributes & TPMA_NV.NO_DA:
        auth_handle, auth_name = index, name
    elif attributes & TPMA_NV.OWNERREAD:
        auth_handle = int(TPM2_RH.OWNER)
        auth_name = auth_handle.to_bytes(4, "big")  # a hierarchy's Name is its handle
    else:
        raise UnsupportedError(
            f"NV index 0x{index:08x} is readable only with its password or by the "
            "platform: the broker reads indexes the owner may read, or whose empty "
            "authValue counts no dictionary-attack failures")
    if not attributes & TPMA_NV.WRITTEN:
        raise BadKeyError(f"NV index 0x{index:08x} was never written")
    size = int(public.dataSize)
    chunk = tpm.link.tpm_property(TPM2_PT_NV.BUFFER_MAX) or 512
    data = bytearray()
    while len(data) < size:
        want = min(chunk, size - len(data))
        offset = len(data)
        data += tpm.execute(deadline, functools.partial(
            command.prepare_nv_read, auth_handle=auth_handle, auth_name=auth_name,
            index=index, index_name=name, size=want, offset=offset), command.sized_result)
    return bytes(data)
