"""Object residency: the storage primaries, the keys and persistent handles in the TPM.

A TPM holds few transient objects at once (swtpm three, a resource manager's connection
a few more). Keys are loaded on first use and stay resident; when the TPM is out of
object memory, the least recently used key is unloaded (and loaded again when next
needed), then storage primaries the command at hand does not use. Primaries come back
from their template. Everything here is tied to the link's ESAPI context: `forget()`
drops it all when the link goes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

from .. import templates
from ..audit import audit
from ..definitions import STORAGE_PRIMARY
from ..errors import BadKeyError, UnknownKeyError
from . import keys as keymod
from .command import read_public
from .endorsement import Endorsement, IdentityError
from .endorsement import create as create_ek
from .keys import CachedKey, KeyCache
from .link import Link
from .parents import refusal
from .rc import Kind, classify, tpm_code

T = TypeVar("T")
log = logging.getLogger("tpmbroker.tpm")
MAX_CACHED_KEYS = 4096
# Failures that mean the TPM lost our state or the link broke: the worker recovers.
RECOVERABLE = (Kind.TRANSPORT, Kind.NEEDS_STARTUP, Kind.LOST)


class Objects:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.keys = KeyCache()
        self.max_keys = MAX_CACHED_KEYS
        self.rsa_only = False  # the TPM lacks ECC: the H-1 RSA primary is the default
        self._primaries: dict[bool, Any] = {}  # rsa? -> ESYS_TR of the storage primary
        self._primary_publics: dict[bool, Any] = {}  # rsa? -> its TPMT_PUBLIC (salt key)
        self._persistent: dict[int, Any] = {}  # TPM handle -> ESYS_TR (parents, keys)
        self._names: dict[int, tuple[int, bytes]] = {}  # ESYS_TR -> (TPM handle, Name)
        # TPM2_Load under a parent with a password, through a pool session (the worker's):
        # (parent ESYS_TR, key blob, parent password) -> ESYS_TR of the loaded key.
        self.authorized_load: Callable[[Any, Any, bytes], Any] | None = None
        # The verified EK (tpm/endorsement.py), the key sessions are salted to once the
        # TPM's identity is verified; None: the storage primary is (unverified).
        self.endorsement: Endorsement | None = None

    @property
    def _ectx(self) -> Any:
        return self.link.ectx

    # --- primaries and parents -----------------------------------------------------------

    def storage_primary(self, rsa: bool | None = None) -> Any:
        """The storage primary for parent 0x40000001, created once per TPM life."""
        rsa = self.rsa_only if rsa is None else rsa
        primary = self._primaries.get(rsa)
        if primary is None:
            template = templates.storage_parent_template(rsa)
            primary, public, *_ = self.with_room(None, lambda: self._ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template),
                ESYS_TR.RH_OWNER))
            self._primaries[rsa] = primary
            self._primary_publics[rsa] = public.publicArea
        return primary

    def salt_key(self) -> tuple[int, Any]:
        """TPM handle and TPMT_PUBLIC of the key pool sessions are salted to: the
        verified EK, else the storage primary. The salt is always encrypted to the
        verified public key, never to what the TPM answered just now."""
        ek = self.endorsement
        if ek is not None:
            return self.handle_and_name(self.endorsement_key())[0], ek.public
        primary = self.storage_primary()
        return self.handle_and_name(primary)[0], self._primary_publics[self.rsa_only]

    def endorsement_key(self) -> Any:
        """The verified EK's handle, made again from its template when it is not loaded
        (evicted, or the TPM restarted). IdentityError if the TPM now answers another
        public key: the identity checked at start no longer holds."""
        ek = self.endorsement
        assert ek is not None
        if ek.handle is None:
            handle, public = self.with_room(None, lambda: create_ek(self._ectx, ek.template))
            if not ek.matches(public):
                with contextlib.suppress(TSS2_Exception):
                    self._ectx.flush_context(handle)
                reason = ("the TPM answered another EK than the one verified at start: "
                          "another TPM, or an interposer on the TPM's bus; refusing to "
                          "salt to it")
                log.error("TPM identity: refused: %s", reason)
                audit("tpm_identity_refused", reason=reason, tcti=self.link.tcti)
                raise IdentityError(reason)
            ek.handle = handle
        return ek.handle

    def parent(self, parent: int, rsa_parent: bool = False) -> Any:
        if parent == STORAGE_PRIMARY:
            return self.storage_primary(rsa=rsa_parent or self.rsa_only)
        if parent in self._persistent and not self.link.owns_tpm:
            self._check_parent(parent)
        return self.persistent(parent, "parent")

    def parent_name(self, parent: int) -> bytes:
        """The Name of the persistent parent at `parent` now (b"" for the storage
        primary, which the broker made): what its password is remembered by."""
        if parent == STORAGE_PRIMARY:
            return b""
        return self.handle_and_name(self.parent(parent))[1]

    def _check_parent(self, handle: int) -> None:
        """A handle is only a place: another TPM user may have evicted the parent there
        and persisted another. A load or create authorized with the old Name would fail
        its HMAC, and the TPM would count that toward its lockout. One TPM2_ReadPublic,
        which needs no authorization, tells; a replaced parent is read again."""
        if self.current_name(handle) != self.handle_and_name(self._persistent[handle])[1]:
            self.forget_persistent(handle)

    def parent_public(self, parent: int) -> Any:
        """The TPMT_PUBLIC of a parent (the storage primary or a persistent key)."""
        if parent == STORAGE_PRIMARY:
            self.storage_primary()
            return self._primary_publics[self.rsa_only]
        public, _, _ = self._ectx.read_public(self.persistent(parent, "parent"))
        return public.publicArea

    def persistent(self, handle: int, role: str) -> Any:
        tr = self._persistent.get(handle)
        if tr is None:
            try:
                # Reading a persistent object's public area needs a free slot too.
                tr = self.with_room(None, lambda: self._ectx.tr_from_tpmpublic(handle))
            except TSS2_Exception as exc:
                if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
                    raise BadKeyError(f"no persistent {role} at 0x{handle:08x}",
                                      tpm_rc=int(exc.rc)) from None
                raise
            self._persistent[handle] = tr
        return tr

    def forget_persistent(self, handle: int) -> list[bytes]:
        """The persistent handle `handle` was evicted (or found free): drop its ESYS_TR
        and the keys loaded by it (their connections get UNKNOWN_KEY, and LOADing the
        handle again says it is gone). The key ids dropped."""
        tr = self._persistent.pop(handle, None)
        if tr is not None:
            self._names.pop(int(tr), None)
            if self.link.up:
                with contextlib.suppress(TSS2_Exception):
                    self._ectx.tr_close(tr)
        return [key.info.key_id for key in self.keys.remove_persistent(handle)]

    def current_name(self, handle: int) -> bytes | None:
        """The Name of the object at persistent `handle` now; None if there is none."""
        try:
            return read_public(self.link.require(), handle)[1]
        except TSS2_Exception as exc:
            if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
                return None
            raise

    def check_persistent(self, entry: CachedKey) -> None:
        """UnknownKeyError unless the object at `entry`'s persistent handle is still that
        key. Another TPM user may have evicted it and persisted another key at the same
        handle (tpm2_evictcontrol takes the first free one): a session HMAC over the old
        Name would then fail, and that failure counts toward the TPM's lockout. One
        TPM2_ReadPublic, which needs no authorization, costs nothing of the kind."""
        handle = entry.persistent_handle
        if self.current_name(handle) == entry.name:
            return
        self.forget_persistent(handle)
        raise UnknownKeyError(
            f"the key at persistent handle 0x{handle:08x} was evicted or replaced by "
            "another TPM user; load the handle again")

    def describe_persistent(self, key_id: bytes, key: bytes) -> CachedKey:
        if len(key) != 4:
            raise BadKeyError(f"a persistent handle is 4 bytes, not {len(key)}")
        handle = int.from_bytes(key, "big")
        if not keymod.is_persistent(handle):
            raise BadKeyError(f"0x{handle:08x} is not a persistent handle (0x81xxxxxx)")
        tr = self.persistent(handle, "key")
        public, _, _ = self._ectx.read_public(tr)
        entry = CachedKey(keymod.key_info(key_id, public.publicArea), public.publicArea,
                          persistent_handle=handle)
        if entry.name != self.handle_and_name(tr)[1]:
            # The ESYS_TR was made for a key evicted since; another is at the handle now.
            self.forget_persistent(handle)
            return self.describe_persistent(key_id, key)
        keymod.check_signing_key(entry.public)
        return entry

    def handle_and_name(self, tr: Any) -> tuple[int, bytes]:
        """TPM handle and Name of an object ESAPI knows (cached: ESAPI calls cost)."""
        known = self._names.get(int(tr))
        if known is None:
            name = self._ectx.tr_get_name(tr)
            known = (int(self._ectx.tr_get_tpm_handle(tr)), bytes(name.name))
            self._names[int(tr)] = known
        return known

    def known_name(self, tr: Any) -> tuple[int, bytes] | None:
        """handle_and_name without an ESAPI call: None unless already known."""
        return self._names.get(int(tr))

    # --- keys --------------------------------------------------------------------------

    def add_key(self, entry: CachedKey) -> None:
        self.keys.add(entry)
        while len(self.keys) > self.max_keys:
            # Every client may LOAD any blob: memory stays bounded, and a key dropped
            # here is loaded again when its connection next signs (UNKNOWN_KEY, reload).
            oldest = self.keys.pop_oldest()
            if self.link.up:
                self.unload(oldest)

    def resident(self, entry: CachedKey) -> Any:
        """The key's handle in the TPM, loading it (evicting others if needed)."""
        if entry.handle is not None:
            return entry.handle
        if entry.blob is None:
            assert entry.persistent_handle is not None
            entry.handle = self.persistent(entry.persistent_handle, "key")
            return entry.handle
        blob = entry.blob
        parent = self.parent(blob.parent, blob.rsa_parent)
        parent_name = self.handle_and_name(parent)[1]
        if (blob.parent != STORAGE_PRIMARY and entry.parent_name
                and entry.parent_name != parent_name):
            # Its blob cannot load under another parent, and the password it was given
            # is not the new parent's: said, not tried. (The storage primary's Name
            # changes only with the owner seed: a cleared TPM, whose old keys are bad.)
            self.keys.remove(entry.info.key_id)
            raise UnknownKeyError(f"the parent 0x{blob.parent:08x} of the key was replaced "
                                  "by another TPM user; load the key again")
        parent_auth, authorized_load = entry.parent_auth, self.authorized_load
        if parent_auth and authorized_load is not None:
            # A parent password goes only into a pool session's HMAC (never on the link).
            def load() -> Any:
                return authorized_load(parent, blob, parent_auth)
        else:
            # Password auth with the parent's empty password: nothing secret to protect,
            # the private blob is already encrypted to the parent.
            def load() -> Any:
                return self._ectx.load(parent, blob.private, blob.public)
        try:
            entry.handle = self.with_room(entry, load, parent)
            entry.parent_name = parent_name
        except TSS2_Exception as exc:
            refused = refusal(exc, blob.parent, parent_auth, "TPM2_Load")
            if refused is not None:
                raise refused from None
            if classify(exc) in (*RECOVERABLE, Kind.OBJECT_MEMORY):
                raise
            raise BadKeyError("the TPM refused to load the key (made by another TPM, or "
                              f"the TPM was cleared?): {exc}", tpm_rc=int(exc.rc)) from None
        except (ValueError, TypeError) as exc:  # tpm2-pytss could not marshal the blob
            raise BadKeyError(f"cannot load the key: {exc}") from None
        return entry.handle

    def unload(self, key: CachedKey) -> None:
        handle, key.handle = key.handle, None
        if handle is None or not key.is_transient:
            return  # persistent keys stay in the TPM; their ESYS_TR is shared
        self._names.pop(int(handle), None)
        with contextlib.suppress(TSS2_Exception):
            self._ectx.flush_context(handle)

    def with_room(self, keep: CachedKey | None, command: Callable[[], T],
                  parent: Any = None) -> T:
        """Run `command`; while the TPM is out of object slots, unload the LRU key, then
        storage primaries the command does not use (`parent` stays)."""
        while True:
            try:
                return command()
            except TSS2_Exception as exc:
                if classify(exc) is not Kind.OBJECT_MEMORY or not self._evict_one(keep, parent):
                    raise

    def _evict_one(self, keep: CachedKey | None, parent: Any = None) -> bool:
        for key in self.keys.resident():
            if key is not keep and key.is_transient:
                self.unload(key)
                return True
        # Then a primary: loading under a persistent parent, for one, needs two free
        # slots (the TPM brings the parent in too), and swtpm has three. A primary comes
        # back from its template when needed; full session pools do not need it.
        for rsa, primary in list(self._primaries.items()):
            if primary != parent:
                del self._primaries[rsa]
                self._names.pop(int(primary), None)
                with contextlib.suppress(TSS2_Exception):
                    self._ectx.flush_context(primary)
                return True
        return self._flush_endorsement_key()

    def _flush_endorsement_key(self) -> bool:
        """Unload the EK (made again when a session must be started); False if not loaded."""
        ek = self.endorsement
        if ek is None or ek.handle is None:
            return False
        handle, ek.handle = ek.handle, None
        self._names.pop(int(handle), None)
        with contextlib.suppress(TSS2_Exception):
            self._ectx.flush_context(handle)
        return True

    # --- the link's life -----------------------------------------------------------------

    def held_handles(self) -> list[int]:
        """TPM handles of the transient objects we hold (no TPM command)."""
        handles = []
        ek = [self.endorsement.handle] if self.endorsement and self.endorsement.handle else []
        for tr in [*self._primaries.values(), *ek,
                   *(k.handle for k in self.keys.resident() if k.is_transient)]:
            try:
                handles.append(int(self._ectx.tr_get_tpm_handle(tr)))
            except TSS2_Exception:
                continue
        return handles

    def flush_all(self) -> None:
        """Unload keys and primaries (an orderly close)."""
        for key in list(self.keys.resident()):
            self.unload(key)
        for primary in self._primaries.values():
            with contextlib.suppress(TSS2_Exception):
                self._ectx.flush_context(primary)
        self._primaries.clear()
        self._flush_endorsement_key()

    def forget(self) -> None:
        """Forget every handle (the link's ESAPI context is gone); keys stay known."""
        self.keys.forget_handles()
        self._primaries.clear()
        self._primary_publics.clear()
        self._persistent.clear()
        self._names.clear()
        if self.endorsement is not None:
            self.endorsement.handle = None  # its public stays: the identity verified

    def resident_keys(self) -> Iterator[CachedKey]:
        return self.keys.resident()
