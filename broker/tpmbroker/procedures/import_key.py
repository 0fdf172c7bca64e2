"""IMPORT, the broker's half: a software key wrapped to this TPM's parent
(tpmbroker/wrap.py, in the client) made loadable by TPM2_Import; without a key, the
parent's public area to wrap to."""

from __future__ import annotations

from typing import Any

from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC

from ..definitions import STORAGE_PRIMARY, Opcode
from ..errors import BadKeyError, UnsupportedError
from ..ops.import_key import Import, ImportResult
from ..tpm import command
from ..tpm import keys as keymod
from ..tpm.objects import RECOVERABLE
from ..tpm.parents import describe, refusal
from ..tpm.rc import Kind, classify, rc_name
from ..tpm.worker import TpmWorker
from . import parent_passwords
from .base import Request, serves


@serves(Opcode.IMPORT)
def serve(request: Request, msg: Import) -> None:
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    if not msg.key:
        request.submit(lambda: parent_public(worker, msg.parent, deadline),
                       lambda public: ImportResult(public))
        return
    request.submit(lambda: import_key(worker, msg.key, deadline, parent=msg.parent,
                                      parent_auth=msg.parent_auth, peer=peer),
                   lambda made: ImportResult(*made))


def parent_public(tpm: TpmWorker, parent: int, deadline: float) -> bytes:
    """The TPM2B_PUBLIC of `parent` (0: the storage primary 0x40000001), the key a
    client wraps a software key to."""
    parent = check_parent(parent)
    public = tpm.run(deadline, "reading the parent's public area",
                     lambda: tpm.objects.parent_public(parent))
    return bytes(TPM2B_PUBLIC(publicArea=public).marshal())


def import_key(tpm: TpmWorker, key: bytes, deadline: float, *, parent: int = 0,
               parent_auth: bytes = b"", peer: int = -1) -> tuple[bytes, bytes]:
    """TPM2_Import of an importable TSS2 key file: (the parent's TPM2B_PUBLIC, the
    loadable TSS2 PRIVATE KEY DER)."""
    blob = keymod.parse_tss2_key(key)
    if blob.import_secret is None:
        raise BadKeyError("the key file is loadable already (OID 2.23.133.10.1.3); "
                          "IMPORT takes an importable one (2.23.133.10.1.4)")
    if parent and parent != blob.parent:
        raise BadKeyError(f"the key was wrapped for {describe(blob.parent)}, not "
                          f"{describe(parent)}")
    parent_passwords.check_length(blob.parent, parent_auth)
    loadable = import_file(tpm, blob, parent_auth, deadline, peer)
    return parent_public(tpm, blob.parent, deadline), keymod.loadable_der(loadable)


def check_parent(parent: int) -> int:
    parent = parent or STORAGE_PRIMARY
    if not (parent == STORAGE_PRIMARY or keymod.is_persistent(parent)):
        raise UnsupportedError(f"parent 0x{parent:08x} is neither the storage primary "
                               "(0x40000001) nor a persistent handle")
    return parent


def import_file(tpm: TpmWorker, blob: keymod.Tss2Key, parent_auth: bytes, deadline: float,
                peer: int) -> keymod.Tss2Key:
    """The loadable key an importable key file becomes under its parent."""
    assert blob.import_secret is not None
    secret = blob.import_secret
    load_auth = parent_passwords.load_auth(blob.parent, parent_auth)
    parent_passwords.owner_auth(tpm, blob.parent, parent_auth, deadline)

    def run_import() -> Any:
        parent_tr = tpm.objects.parent(blob.parent, blob.rsa_parent)
        handle, name = tpm.objects.handle_and_name(parent_tr)
        try:
            return tpm.execute(deadline, lambda session: command.prepare_import(
                session, handle, name, load_auth, blob.public, blob.private, secret),
                command.import_result)
        except TSS2_Exception as exc:
            refused = refusal(exc, blob.parent, load_auth, "TPM2_Import")
            if refused is not None:
                raise refused from None
            if classify(exc) in (*RECOVERABLE, Kind.OBJECT_MEMORY):
                raise
            raise BadKeyError(
                "the TPM refused to import the key: it was wrapped to another TPM's "
                f"parent, or altered ({rc_name(int(exc.rc))})",
                tpm_rc=int(exc.rc)) from None

    private = parent_passwords.attempt(tpm, blob.parent, load_auth, peer, deadline,
                                       lambda: tpm.run(deadline, "importing the key",
                                                       run_import))
    return keymod.imported(blob, private)
