"""Parent passwords: what the broker remembers of them, so a wrong one costs the TPM at
most one dictionary-attack count.

Loading a key under a parent (TPM2_Load) and making one (TPM2_Create) need the parent's
authorization. A persistent parent made with a password (`tpm2_createprimary -p`,
`tpm2_create -p`) is DA-protected unless it has noDA, so every wrong or missing password
the broker sends for it counts toward the TPM's lockout, whichever client asked. So:

- a password the TPM refused for a parent is refused for that parent again, for every
  client, without a TPM command (ParentAuthFailedError, tpm_rc 0), until the broker is
  told a different one, which goes to the TPM; the right password after wrong ones works;
- a password the TPM accepted for a parent is known good: a key already loaded under that
  parent may be LOADed again with it without a TPM command.

A persistent parent is known by its handle and its Name: another TPM user may evict it
and persist another parent, with another password, at the same handle.

Passwords are kept only as keyed hashes (HMAC-SHA-256 with a key drawn at start that
never leaves the process), never in the clear. The password of a loaded key's parent is
also kept in the key's cache entry (tpm/keys.py), because an evicted key is loaded again
with it; that is the broker's memory, like the keys' own passwords.

This module does no TPM I/O; the worker (tpm/worker.py) asks and tells it.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import threading

from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..definitions import STORAGE_PRIMARY
from ..errors import LockoutError, ParentAuthFailedError, TpmBrokerError
from .rc import Kind, classify

MAX_ENTRIES = 8192  # (parent, password) pairs remembered, least recently used out


def describe(parent: int) -> str:
    """How error messages name a parent."""
    if parent == STORAGE_PRIMARY:
        return "the parent 0x40000001 (the storage primary; its password is the owner " \
               "hierarchy's)"
    return f"the parent 0x{parent:08x}"


def refusal(exc: TSS2_Exception, parent: int, auth: bytes,
            command: str) -> TpmBrokerError | None:
    """What a TPM error on a command authorized by `parent` means for its password: a
    wrong or missing one, or a TPM in lockout; None for any other error."""
    kind = classify(exc)
    if kind is Kind.AUTH:
        return ParentAuthFailedError(
            f"{'wrong password' if auth else 'no password given'} for {describe(parent)} "
            f"({command})", tpm_rc=int(exc.rc))
    if kind is Kind.LOCKOUT:
        return LockoutError(f"the TPM is in dictionary-attack lockout: it refuses "
                            f"{describe(parent)} for now", tpm_rc=int(exc.rc))
    return None


class ParentPasswords:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._secret = os.urandom(32)
        self.max_entries = max_entries
        self._refused: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._good: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.refusals = 0  # attempts answered from memory, without the TPM
        self.failures = 0  # attempts the TPM refused
        self._lock = threading.Lock()

    def _tag(self, parent: int, name: bytes, auth: bytes) -> bytes:
        # The Name's length first: the (Name, password) split is then unambiguous.
        return hmac.new(self._secret, parent.to_bytes(4, "big") + len(name).to_bytes(2, "big")
                        + name + auth, hashlib.sha256).digest()[:16]

    def known_good(self, parent: int, name: bytes, auth: bytes) -> bool:
        return self._tag(parent, name, auth) in self._good

    def check(self, parent: int, name: bytes, auth: bytes) -> None:
        """ParentAuthFailedError (tpm_rc 0) if the TPM refused this password for this
        parent (`name`: Objects.parent_name) before."""
        tag = self._tag(parent, name, auth)
        with self._lock:
            if tag not in self._refused:
                return
            self._refused.move_to_end(tag)
            self.refusals += 1
        raise ParentAuthFailedError(
            f"{'no password' if not auth else 'wrong password'} for {describe(parent)}: "
            "the TPM refused this password for this parent before, and the broker does "
            "not send it again (each try would count toward the TPM's dictionary-attack "
            "lockout); give the parent's password (parent-auth)")

    def refused(self, parent: int, name: bytes, auth: bytes) -> None:
        tag = self._tag(parent, name, auth)
        with self._lock:
            self.failures += 1
            self._good.pop(tag, None)
            self._remember(self._refused, tag)

    def accepted(self, parent: int, name: bytes, auth: bytes) -> None:
        tag = self._tag(parent, name, auth)
        with self._lock:
            self._refused.pop(tag, None)  # the parent's password was changed to it
            self._remember(self._good, tag)

    def _remember(self, table: collections.OrderedDict[bytes, None], tag: bytes) -> None:
        table[tag] = None
        table.move_to_end(tag)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def status(self) -> dict[str, object]:
        return {"parent_auth_refusals": self.refusals,
                "parent_auth_failures": self.failures}
