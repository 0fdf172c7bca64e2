"""Parent passwords: the checks and attempts every procedure that loads or creates
under a parent makes (LOAD, GENERATE, IMPORT).

A persistent parent's password is proved only by a pool session's HMAC, so it never
crosses the bus; for the storage primary 0x40000001 the password is the owner
hierarchy's, as tpm2-openssl takes it. A password the TPM refused for a parent is not
sent again (tpm/parents.py), and one not known good goes through the dictionary-attack
shield like a key's.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TypeVar

from tpm2_pytss.constants import TPM2_RH
from tpm2_pytss.types import TPM2B_PUBLIC

from .. import templates
from ..definitions import STORAGE_PRIMARY
from ..errors import AuthFailedError, LockoutError, ParentAuthFailedError
from ..tpm import command
from ..tpm.keys import MAX_AUTH_ANY as MAX_AUTH
from ..tpm.keys import CachedKey
from ..tpm.parents import describe
from ..tpm.worker import TpmWorker

T = TypeVar("T")


def check_length(parent: int, parent_auth: bytes) -> None:
    if len(parent_auth) > MAX_AUTH:
        # No parent can have such a password; asking the TPM would only count a failure.
        raise ParentAuthFailedError(f"the password for {describe(parent)} is longer "
                                    f"than {MAX_AUTH} bytes")


def load_auth(parent: int, parent_auth: bytes) -> bytes:
    """The authValue TPM2_Load needs: the persistent parent's password; under the
    storage primary, whose own password is empty, none (the parent password there is
    the owner hierarchy's, which only its creation needs: owner_auth)."""
    return b"" if parent == STORAGE_PRIMARY else parent_auth


def owner_auth(tpm: TpmWorker, parent: int, parent_auth: bytes, deadline: float) -> None:
    """A password for the storage primary is the owner hierarchy's, which tpm2-openssl
    gives to TPM2_CreatePrimary. The broker made that primary already, so it checks
    the password the same way (a CreatePrimary through a pool session, flushed at
    once), once per password: a wrong one fails here as it would there. Hierarchy
    authorizations count no dictionary-attack failures (docs/broker.md)."""
    if parent != STORAGE_PRIMARY or not parent_auth:
        return
    tpm.parents.check(parent, b"", parent_auth)
    if tpm.parents.known_good(parent, b"", parent_auth):
        return

    def create_primary() -> int:
        template = TPM2B_PUBLIC(publicArea=templates.storage_parent_template(
            tpm.objects.rsa_only))
        return tpm.objects.with_room(None, lambda: tpm.execute_handle(
            deadline, lambda session: command.prepare_create_primary(
                session, int(TPM2_RH.OWNER), parent_auth, template)))

    try:
        handle = tpm.run(deadline, "checking the owner hierarchy's password",
                         create_primary)
    except AuthFailedError as exc:
        tpm.parents.refused(parent, b"", parent_auth)
        raise ParentAuthFailedError(f"wrong password for {describe(parent)}",
                                    tpm_rc=exc.tpm_rc) from None
    command.flush_context(tpm.link.require(), handle)
    tpm.parents.accepted(parent, b"", parent_auth)


def attempt(tpm: TpmWorker, parent: int, parent_auth: bytes, peer: int, deadline: float,
            operation: Callable[[], T]) -> T:
    """Run `attempt`, a TPM command authorized with `parent_auth` for `parent`, unless
    the TPM refused that password for that parent before; note how it went. A parent
    password not known good is a password attempt like a key's: the shield
    (tpm/lockout.py) admits it or not."""
    name = tpm.run(deadline, "reading the parent", lambda: tpm.objects.parent_name(parent))
    tpm.parents.check(parent, name, parent_auth)
    shield = tpm.shield
    if not parent_auth or tpm.parents.known_good(parent, name, parent_auth):
        shield = None
    parent_id = b"parent:" + parent.to_bytes(4, "big") + name
    if shield is not None:
        tpm.run(deadline, "reading the lockout counter", tpm.read_lockout)
        try:
            shield.check(peer, parent_id, parent_auth)
        except LockoutError as exc:
            raise LockoutError(f"{exc.message}; the password for {describe(parent)} "
                               "was not tried", tpm_rc=exc.tpm_rc) from None
    try:
        result = operation()
    except ParentAuthFailedError as exc:
        if exc.tpm_rc:
            tpm.parents.refused(parent, name, parent_auth)
            if shield is not None:
                shield.failed(peer, parent_id, parent_auth)
        raise
    except LockoutError:
        if shield is not None:
            shield.tpm_locked_out()
        raise
    tpm.parents.accepted(parent, name, parent_auth)
    if shield is not None:
        shield.succeeded(parent_id, parent_auth)
    return result


def check_cached(tpm: TpmWorker, cached: CachedKey, parent_auth: bytes, deadline: float,
                 peer: int) -> None:
    """A key loaded already, LOADed again: the parent password must be right too. The
    one it was loaded with, or one known good for its parent, pass without the TPM;
    another is tried by loading a second copy of the key with it (then unloaded)."""
    assert cached.blob is not None
    parent = cached.blob.parent
    check_length(parent, parent_auth)
    if parent == STORAGE_PRIMARY:
        owner_auth(tpm, parent, parent_auth, deadline)
        return
    if hmac.compare_digest(cached.parent_auth, parent_auth) or tpm.parents.known_good(
            parent, cached.parent_name, parent_auth):
        return
    probe = CachedKey(cached.info, cached.public, blob=cached.blob,
                      parent_auth=parent_auth)

    def load_and_unload() -> None:
        tpm.objects.resident(probe)
        tpm.objects.unload(probe)

    attempt(tpm, parent, parent_auth, peer, deadline, lambda: tpm.run(
        deadline, "checking the parent's password", load_and_unload))
