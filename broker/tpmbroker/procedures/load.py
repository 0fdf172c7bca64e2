"""LOAD, the broker's half: a key made known to the worker and resident in the TPM,
from its key file (TSS2 PRIVATE KEY, importable ones imported first) or its persistent
handle."""

from __future__ import annotations

from typing import Any

from ..definitions import KeySource, Opcode
from ..ops.base import member
from ..ops.load import Load, LoadResult
from ..protocol import key_id_for
from ..tpm import keys as keymod
from ..tpm.keys import CachedKey, KeyInfo
from ..tpm.worker import TpmWorker
from . import parent_passwords
from .base import Request, serves
from .import_key import import_file


@serves(Opcode.LOAD)
def serve(request: Request, msg: Load) -> None:
    source = member(KeySource, msg.source, "key source")
    worker, deadline = request.worker, request.deadline

    def loaded(info: Any) -> LoadResult:
        request.check_key(info.key_id, info.public_key)  # the key policy
        request.remember_key(info.key_id, msg.auth)
        return LoadResult(info.key_id, info.key_type, info.bits, info.curve, info.public_key)

    peer = request.peer_uid
    request.submit(lambda: load_key(worker, source, msg.key, deadline,
                                    parent_auth=msg.parent_auth, peer=peer), loaded)


def load_key(tpm: TpmWorker, source: KeySource, key: bytes, deadline: float, *,
             parent_auth: bytes = b"", peer: int = -1) -> KeyInfo:
    """Make a key known (and resident). `parent_auth` is the password of the key's
    parent: a persistent parent's own, or for the storage primary 0x40000001 the
    owner hierarchy's (as tpm2-openssl takes it); ignored for persistent keys."""
    key_id = key_id_for(source, key)
    cached = tpm.objects.keys.get(key_id)
    if cached is not None and cached.blob is None and not tpm.link.owns_tpm:
        # A new client of a handle gets the key that is there now.
        handle = cached.persistent_handle
        if cached.name != tpm.run(deadline, "reading the persistent key",
                                  lambda: tpm.objects.current_name(handle)):
            tpm.objects.forget_persistent(handle)
            cached = None
    if cached is not None:
        if cached.blob is not None:
            parent_passwords.check_cached(tpm, cached, parent_auth, deadline, peer)
        return cached.info
    if source is KeySource.TSS2_DER:
        blob = keymod.parse_tss2_key(key)
        parent_passwords.check_length(blob.parent, parent_auth)
        if blob.import_secret is not None:  # importable: TPM2_Import it first
            blob = import_file(tpm, blob, parent_auth, deadline, peer)
        entry = CachedKey(keymod.key_info(key_id, blob.public.publicArea),
                          blob.public.publicArea, blob=blob,
                          parent_auth=parent_passwords.load_auth(blob.parent, parent_auth))
        parent_passwords.owner_auth(tpm, blob.parent, parent_auth, deadline)
        parent_passwords.attempt(tpm, blob.parent, entry.parent_auth, peer, deadline,
                                 lambda: tpm.run(deadline, "loading the key",
                                                 lambda: tpm.objects.resident(entry)))
    else:
        entry = tpm.run(deadline, "reading the persistent key",
                        lambda: tpm.objects.describe_persistent(key_id, key))
        tpm.run(deadline, "loading the key", lambda: tpm.objects.resident(entry))
    tpm.objects.add_key(entry)
    return entry.info
