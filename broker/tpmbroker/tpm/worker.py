"""The TPM worker: the one place that talks to the TPM, in layers.

- link.py: the connection, its recovery and a clean start;
- sessions.py: the pool of salted HMAC sessions;
- objects.py: storage primaries, keys and persistent handles, resident or evicted;
- command.py: authorized commands, one path that computes session HMACs and parameter
  encryption (in C) and checks responses, used by every operation.

One thread calls every method (the worker thread of tpmbroker.server), except the lane_*
methods, which the event loop calls while the worker thread is idle (tpmbroker.lane).
When the TPM restarts or the link breaks, the next request rebuilds the link, the pool
and the primaries and is retried once; no command is sent with a session that may be
stale, so recovery never costs dictionary-attack failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_PT_HR,
    TPM2_PT_NV,
    TPM2_RC,
    TPM2_RH,
    TPMA_NV,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_PUBLIC_PARMS,
    TPMU_PUBLIC_PARMS,
)

from .. import keypolicy
from ..audit import audit
from ..definitions import (
    MAX_MESSAGE,
    MAX_RANDOM,
    STORAGE_PRIMARY,
    Curve,
    Hash,
    KeySource,
    KeyType,
    Padding,
    Scheme,
    Usage,
)
from ..errors import (
    AuthFailedError,
    BadDigestError,
    BadKeyError,
    DeadlineError,
    LockoutError,
    NotForLane,
    ParentAuthFailedError,
    PolicyFailedError,
    TpmBrokerError,
    TpmError,
    TpmUnavailableError,
    UnknownKeyError,
    UnsupportedError,
)
from ..protocol import key_id_for
from . import command, depad, persistent, pss
from . import keys as keymod
from .keys import CachedKey, KeyInfo
from .link import Link, frame_command, split_response
from .lockout import DEFAULT_RESERVE, DaParameters, Shield
from .objects import RECOVERABLE, Objects
from .parents import ParentPasswords, describe, refusal
from .rc import Kind, classify, to_error, tpm_code
from .session_crypto import SessionState
from .sessions import SessionPool

T = TypeVar("T")
log = logging.getLogger("tpmbroker.tpm")

# A TPM2B_AUTH holds at most the name hash's digest (SHA-256 for every key we make).
MAX_AUTH = 32
PSS_PADDINGS = ("auto", "tpm", "broker")
TPM_RC_VALUE = 0x084
TPM_RC_POLICY_FAIL = 0x09D
# TPM_GENERATED_VALUE: what the TPM puts first in every structure it signs (quotes,
# certifications). The TPM gives no ticket for a message starting with it, so that a
# restricted key cannot be made to sign a forged attestation.
TPM_GENERATED_VALUE = b"\xffTCG"


@dataclasses.dataclass
class LaneCommand:
    """A TPM2_Sign prepared for the event loop, which sends it and reads the answer."""

    frame: bytes  # the command, framed for the link (swtpm's command port)
    pending: command.PendingCommand
    entry: CachedKey
    peer: int = -1  # uid of the client, for the dictionary-attack shield
    auth: bytes = b""


class TpmWorker:
    def __init__(self, tcti: str, sessions: int = 2, pss_padding: str = "auto",
                 da_reserve: int | None = DEFAULT_RESERVE, policy_sessions: int = 1) -> None:
        if not 1 <= sessions <= 3:
            raise ValueError(f"sessions must be 1 to 3, not {sessions}")
        if pss_padding not in PSS_PADDINGS:
            raise ValueError(f"pss_padding must be one of {', '.join(PSS_PADDINGS)}")
        self.tcti = tcti
        # RSA-PSS: "tpm" takes the TPM's salt, "broker" always pads in the broker, "auto"
        # checks the TPM's first PSS signature per key and pads in the broker from then
        # on if its salt is not the digest length (see tpm/pss.py).
        self.pss_padding = pss_padding
        self.link = Link(tcti)
        self.objects = Objects(self.link)
        self.pool = SessionPool(sessions, start=self._start_session, flush=self._flush)
        # Keys with a policy (keypolicy.py) are used through salted policy sessions of
        # their own, started on first use: the two pools together bound the TPM sessions.
        self.policy_pool = SessionPool(policy_sessions, start=self._start_policy_session,
                                       flush=self._flush)
        self._schemes_checked: set[tuple[bytes, int, int]] = set()  # (key id, scheme, hash)
        self._rsa_only: bool | None = None
        # What this TPM makes, asked once per broker: curve ids (TPM2_GetCapability) and
        # RSA sizes with the TPM's answer to TPM2_TestParms (None = it has that size).
        self._curves: list[int] | None = None
        self._rsa_sizes: dict[int, int | None] = {}
        self._counts: tuple[int, int] | None = None  # (resetCount, restartCount)
        self._active_sessions_max = 0
        self._restarts_recovered = 0
        self._opened = False
        self._input_buffer: int | None = None  # bytes TPM2_Hash and SequenceUpdate take
        self._tpm_hashed = 0  # messages the TPM hashed for restricted keys
        # Password attempts on DA-protected keys go through the shield (tpm/lockout.py);
        # None turns it off (tests of the TPM's own lockout).
        self.shield = Shield(da_reserve) if da_reserve is not None else None
        # Parent passwords the TPM refused or accepted (tpm/parents.py); loads under a
        # parent with a password go through a pool session (_authorized_load).
        self.parents = ParentPasswords()
        self.objects.authorized_load = self._authorized_load
        self._op_deadline = 0.0  # the deadline of the request _run serves

    # --- lifecycle ----------------------------------------------------------------------

    def open(self, deadline: float) -> None:
        """Connect, create the storage primary and the session pool."""
        if self.link.up:
            return
        try:
            self._build(deadline, stale_handles=[])
        except TpmUnavailableError:
            self._drop_link()
            raise
        except TpmBrokerError as exc:
            self._drop_link()
            raise TpmUnavailableError(f"the TPM is not usable: {exc.message}",
                                      tpm_rc=exc.tpm_rc) from exc
        except TSS2_Exception as exc:
            self._drop_link()
            raise TpmUnavailableError(f"the TPM is not usable: {exc}", tpm_rc=int(exc.rc)) from exc
        self._opened = True

    def close(self) -> None:
        """Flush the pool, the keys and the primaries; on a TPM the broker owns alone,
        end with TPM2_Shutdown(STATE) so the next start is orderly; close the link.
        Idempotent."""
        self._opened = False
        if not self.link.up:
            return
        self.pool.flush()
        self.policy_pool.flush()
        self.objects.flush_all()
        if self.link.shutdown_state():
            log.info("sent TPM2_Shutdown(STATE): the next TPM start is orderly")
        self._drop_link()

    # --- operations -----------------------------------------------------------------------

    def load_key(self, source: KeySource, key: bytes, deadline: float, *,
                 parent_auth: bytes = b"", peer: int = -1) -> KeyInfo:
        """Make a key known (and resident). `parent_auth` is the password of the key's
        parent: a persistent parent's own, or for the storage primary 0x40000001 the
        owner hierarchy's (as tpm2-openssl takes it); ignored for persistent keys."""
        try:
            source = KeySource(source)
        except ValueError:
            raise UnsupportedError(f"unknown key source {source}") from None
        key_id = key_id_for(source, key)
        cached = self.objects.keys.get(key_id)
        if cached is not None:
            if cached.blob is not None:
                self._check_cached_parent_auth(cached, parent_auth, deadline, peer)
            return cached.info
        if source is KeySource.TSS2_DER:
            blob = keymod.parse_tss2_key(key)
            self._check_parent_auth_length(blob.parent, parent_auth)
            if blob.import_secret is not None:  # importable: TPM2_Import it first
                blob = self._import_file(blob, parent_auth, deadline, peer)
            entry = CachedKey(keymod.key_info(key_id, blob.public.publicArea),
                              blob.public.publicArea, blob=blob,
                              parent_auth=self._load_auth(blob.parent, parent_auth))
            self._owner_auth(blob.parent, parent_auth, deadline)
            self._parent_attempt(blob.parent, entry.parent_auth, peer, deadline,
                                 lambda: self._run(deadline, "loading the key",
                                                   lambda: self.objects.resident(entry)))
        else:
            entry = self._run(deadline, "reading the persistent key",
                              lambda: self.objects.describe_persistent(key_id, key))
            self._run(deadline, "loading the key", lambda: self.objects.resident(entry))
        self.objects.add_key(entry)
        return entry.info

    # --- keys wrapped to the TPM's parent (ops/import_key.py, tpmbroker/wrap.py) ----------

    def parent_public(self, parent: int, deadline: float) -> bytes:
        """The TPM2B_PUBLIC of `parent` (0: the storage primary 0x40000001), the key a
        client wraps a software key to."""
        parent = self._check_parent(parent)
        public = self._run(deadline, "reading the parent's public area",
                           lambda: self.objects.parent_public(parent))
        return bytes(TPM2B_PUBLIC(publicArea=public).marshal())

    def import_key(self, key: bytes, deadline: float, *, parent: int = 0,
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
        self._check_parent_auth_length(blob.parent, parent_auth)
        loadable = self._import_file(blob, parent_auth, deadline, peer)
        return self.parent_public(blob.parent, deadline), keymod.loadable_der(loadable)

    def _check_parent(self, parent: int) -> int:
        parent = parent or STORAGE_PRIMARY
        if not (parent == STORAGE_PRIMARY or keymod.is_persistent(parent)):
            raise UnsupportedError(f"parent 0x{parent:08x} is neither the storage primary "
                                   "(0x40000001) nor a persistent handle")
        return parent

    def _import_file(self, blob: keymod.Tss2Key, parent_auth: bytes, deadline: float,
                     peer: int) -> keymod.Tss2Key:
        """The loadable key an importable key file becomes under its parent."""
        assert blob.import_secret is not None
        secret = blob.import_secret
        load_auth = self._load_auth(blob.parent, parent_auth)
        self._owner_auth(blob.parent, parent_auth, deadline)

        def run_import() -> Any:
            parent_tr = self.objects.parent(blob.parent, blob.rsa_parent)
            handle, name = self.objects.handle_and_name(parent_tr)
            try:
                return self._execute(deadline, lambda session: command.prepare_import(
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
                    f"parent, or altered ({_rc_name(int(exc.rc))})",
                    tpm_rc=int(exc.rc)) from None

        private = self._parent_attempt(blob.parent, load_auth, peer, deadline,
                                       lambda: self._run(deadline, "importing the key",
                                                         run_import))
        return keymod.imported(blob, private)

    # --- parent passwords (tpm/parents.py) -------------------------------------------------

    @staticmethod
    def _check_parent_auth_length(parent: int, parent_auth: bytes) -> None:
        if len(parent_auth) > MAX_AUTH:
            # No parent can have such a password; asking the TPM would only count a failure.
            raise ParentAuthFailedError(f"the password for {describe(parent)} is longer "
                                        f"than {MAX_AUTH} bytes")

    @staticmethod
    def _load_auth(parent: int, parent_auth: bytes) -> bytes:
        """The authValue TPM2_Load needs: the persistent parent's password; under the
        storage primary, whose own password is empty, none (the parent password there is
        the owner hierarchy's, which only its creation needs: _owner_auth)."""
        return b"" if parent == STORAGE_PRIMARY else parent_auth

    def _owner_auth(self, parent: int, parent_auth: bytes, deadline: float) -> None:
        """A password for the storage primary is the owner hierarchy's, which tpm2-openssl
        gives to TPM2_CreatePrimary. The broker made that primary already, so it checks
        the password the same way (a CreatePrimary through a pool session, flushed at
        once), once per password: a wrong one fails here as it would there. Hierarchy
        authorizations count no dictionary-attack failures (docs/broker.md)."""
        if parent != STORAGE_PRIMARY or not parent_auth:
            return
        self.parents.check(parent, parent_auth)
        if self.parents.known_good(parent, parent_auth):
            return

        def create_primary() -> int:
            template = TPM2B_PUBLIC(publicArea=keymod.storage_parent_template(
                self.objects.rsa_only))
            return self.objects.with_room(None, lambda: self._execute_handle(
                deadline, lambda session: command.prepare_create_primary(
                    session, int(TPM2_RH.OWNER), parent_auth, template)))

        try:
            handle = self._run(deadline, "checking the owner hierarchy's password",
                               create_primary)
        except AuthFailedError as exc:
            self.parents.refused(parent, parent_auth)
            raise ParentAuthFailedError(f"wrong password for {describe(parent)}",
                                        tpm_rc=exc.tpm_rc) from None
        command.flush_context(self.link.require(), handle)
        self.parents.accepted(parent, parent_auth)

    def _parent_attempt(self, parent: int, parent_auth: bytes, peer: int, deadline: float,
                        attempt: Callable[[], T]) -> T:
        """Run `attempt`, a TPM command authorized with `parent_auth` for `parent`, unless
        the TPM refused that password for that parent before; note how it went. A parent
        password not known good is a password attempt like a key's: the shield
        (tpm/lockout.py) admits it or not."""
        self.parents.check(parent, parent_auth)
        shield = self.shield
        if not parent_auth or self.parents.known_good(parent, parent_auth):
            shield = None
        parent_id = b"parent:" + parent.to_bytes(4, "big")
        if shield is not None:
            self._run(deadline, "reading the lockout counter", self._read_lockout)
            try:
                shield.check(peer, parent_id, parent_auth)
            except LockoutError as exc:
                raise LockoutError(f"{exc.message}; the password for {describe(parent)} "
                                   "was not tried", tpm_rc=exc.tpm_rc) from None
        try:
            result = attempt()
        except ParentAuthFailedError as exc:
            if exc.tpm_rc:
                self.parents.refused(parent, parent_auth)
                if shield is not None:
                    shield.failed(peer, parent_id, parent_auth)
            raise
        except LockoutError:
            if shield is not None:
                shield.tpm_locked_out()
            raise
        self.parents.accepted(parent, parent_auth)
        if shield is not None:
            shield.succeeded(parent_id, parent_auth)
        return result

    def _check_cached_parent_auth(self, cached: CachedKey, parent_auth: bytes,
                                  deadline: float, peer: int) -> None:
        """A key loaded already, LOADed again: the parent password must be right too. The
        one it was loaded with, or one known good for its parent, pass without the TPM;
        another is tried by loading a second copy of the key with it (then unloaded)."""
        assert cached.blob is not None
        parent = cached.blob.parent
        self._check_parent_auth_length(parent, parent_auth)
        if parent == STORAGE_PRIMARY:
            self._owner_auth(parent, parent_auth, deadline)
            return
        if (hmac.compare_digest(cached.parent_auth, parent_auth)
                or self.parents.known_good(parent, parent_auth)):
            return
        probe = CachedKey(cached.info, cached.public, blob=cached.blob,
                          parent_auth=parent_auth)

        def load_and_unload() -> None:
            self.objects.resident(probe)
            self.objects.unload(probe)

        self._parent_attempt(parent, parent_auth, peer, deadline, lambda: self._run(
            deadline, "checking the parent's password", load_and_unload))

    def _authorized_load(self, parent: Any, blob: Any, parent_auth: bytes) -> Any:
        """TPM2_Load under `parent` authorized by a pool session's HMAC with the parent's
        password: the password never crosses the link (ESAPI would send it in a password
        session, in the clear). The ESYS_TR of the loaded key."""
        handle, name = self.objects.handle_and_name(parent)
        tpm_handle = self._execute_handle(self._op_deadline, lambda session: (
            command.prepare_load(session, handle, name, parent_auth, blob.private,
                                 blob.public)))
        try:
            return self.link.ectx.tr_from_tpmpublic(tpm_handle)
        except TSS2_Exception:
            command.flush_context(self.link.require(), tpm_handle)
            raise

    def sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
             digest: bytes, deadline: float, peer: int = -1) -> bytes:
        """Sign `digest`; `peer` (the client's uid) is who the shield holds to account."""
        entry = self._loaded(key_id)
        try:
            scheme = Scheme(scheme)
            hash = Hash(hash)
        except ValueError as exc:
            raise UnsupportedError(str(exc)) from None
        scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
        if (key_id, scheme_alg, hash) not in self._schemes_checked:
            # Reading the key's fixed scheme through tpm2-pytss costs more than the rest
            # of a signature; a key id always names the same public area.
            keymod.check_key_scheme(entry.public, scheme_alg, hash)
            self._schemes_checked.add((key_id, scheme_alg, hash))
        if len(digest) != hash.digest_size:
            raise BadDigestError(f"{hash.name} digest must be {hash.digest_size} bytes, "
                                 f"not {len(digest)}")
        if entry.restricted:
            raise UnsupportedError(
                "a restricted signing key (an attestation key) signs only a message the TPM "
                f"hashes itself, of at most {MAX_MESSAGE} bytes (MAX_MESSAGE), not a digest: "
                "send the message (SIGN_MESSAGE; with openssl, pkeyutl -sign -rawin, or dgst, "
                "req, x509, cms, TLS)")
        return self._with_password(entry, auth, peer, deadline, lambda: self._sign(
            entry, auth, scheme, scheme_alg, hash, digest, deadline))

    def _loaded(self, key_id: bytes) -> CachedKey:
        """The key LOAD made known by this id; UnknownKeyError if none."""
        entry = self.objects.keys.get(key_id)
        if entry is None:
            raise UnknownKeyError("unknown key id; send LOAD first")
        return entry

    def restricted(self, key_id: bytes) -> bool | None:
        entry = self.objects.keys.get(key_id)
        return None if entry is None else entry.restricted

    def sign_message(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
                     message: bytes, deadline: float, peer: int = -1) -> bytes:
        """Sign `message`. A restricted key's message is hashed by the TPM, whose ticket
        TPM2_Sign needs; any other key's is hashed here and signed as a digest."""
        entry = self._loaded(key_id)
        try:
            scheme = Scheme(scheme)
            hash = Hash(hash)
        except ValueError as exc:
            raise UnsupportedError(str(exc)) from None
        if len(message) > MAX_MESSAGE:
            raise UnsupportedError(f"message of {len(message)} bytes: SIGN_MESSAGE carries "
                                   f"at most {MAX_MESSAGE} (MAX_MESSAGE)")
        if not entry.restricted:
            digest = hashlib.new(hash.hashlib_name, message).digest()
            return self.sign(key_id, auth, scheme, hash, digest, deadline, peer=peer)
        scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
        keymod.check_key_scheme(entry.public, scheme_alg, hash)  # its fixed scheme only
        if message.startswith(TPM_GENERATED_VALUE):
            # The TPM would hash it but give no ticket; refused before any TPM command.
            raise UnsupportedError(
                "the message starts with TPM_GENERATED_VALUE (0xff544347): a restricted "
                "key does not sign it, the TPM gives no ticket for what could pass for an "
                "attestation the TPM made")

        def hash_and_sign() -> bytes:
            digest, ticket = self._tpm_hash(entry, hash, message, deadline)
            return self._authorized(
                entry, auth, deadline, lambda session, handle, name:
                command.prepare_sign_with_ticket(session, handle, name, auth, digest,
                                                 scheme_alg, hash, ticket),
                command.signature_bytes)

        signature = self._with_password(entry, auth, peer, deadline, lambda: self._run(
            deadline, "signing the message", hash_and_sign))
        self.objects.keys.touch(key_id)
        if entry.info.key_type is KeyType.RSA:
            return signature.rjust((entry.info.bits + 7) // 8, b"\0")
        return signature

    def _tpm_hash(self, entry: CachedKey, hash: Hash, message: bytes,
                  deadline: float) -> tuple[bytes, bytes]:
        """(digest, ticket) of `message` hashed by the TPM: TPM2_Hash when it fits one
        command, else a hash sequence. The worker thread runs one job at a time, so at
        most one sequence object is in the TPM; it is flushed on any failure."""
        if self._input_buffer is None:
            self._input_buffer = min(self._property(TPM2_PT.INPUT_BUFFER) or 1024, 1024)
        chunk = self._input_buffer
        self._tpm_hashed += 1
        if len(message) <= chunk:
            return self._execute(deadline, lambda session: command.prepare_hash(
                session, message, hash), command.hash_result)
        transport = self.link.require()
        # The sequence needs an object slot: make room as loading a key would, but keep
        # the key that signs next.
        sequence = self.objects.with_room(
            entry, lambda: command.hash_sequence_start(transport, hash))
        try:
            pieces = [message[i:i + chunk] for i in range(0, len(message), chunk)]
            for piece in pieces[:-1]:
                self._execute(deadline, functools.partial(
                    command.prepare_sequence_update, sequence=sequence, chunk=piece),
                    lambda _parameters: None)
            return self._execute(deadline, functools.partial(
                command.prepare_sequence_complete, sequence=sequence, chunk=pieces[-1]),
                command.hash_result)
        except BaseException:
            if self.link.up:
                with contextlib.suppress(TSS2_Exception):
                    command.flush_context(transport, sequence)
            raise

    def derive(self, key_id: bytes, auth: bytes, point: bytes, deadline: float,
               peer: int = -1) -> bytes:
        """ECDH: Z, the x-coordinate of the key's private scalar times the peer's public
        `point` (uncompressed SEC1), as long as the curve's field (TPM2_ECDH_ZGen).

        The key and the point are checked first, without the TPM: a key that may not do
        ECDH or a point that is not on the key's curve costs no TPM command.
        """
        entry = self._loaded(key_id)
        keymod.check_ecdh_key(entry.public)
        x, y = keymod.check_peer_point(entry.info.curve, point)
        z = self._with_password(entry, auth, peer, deadline, lambda: self._run(
            deadline, "deriving the shared secret", lambda: self._authorized(
                entry, auth, deadline, lambda session, handle, name: command.prepare_ecdh_zgen(
                    session, handle, name, auth, x, y), command.ecdh_zgen_result)))
        self.objects.keys.touch(key_id)
        if len(z) > len(x):
            raise TpmError(f"the TPM returned a {len(z)}-byte x-coordinate for a "
                           f"{len(x)}-byte curve")
        return z.rjust(len(x), b"\0")

    def _with_password(self, entry: CachedKey, auth: bytes, peer: int, deadline: float,
                       operation: Callable[[], T]) -> T:
        """`operation()` with the key's password: through the dictionary-attack shield
        when the key counts failures (sign, sign the message, derive, decrypt)."""
        if len(auth) > MAX_AUTH:
            # No key can have such a password; asking the TPM would only count a failure.
            raise AuthFailedError(f"password longer than {MAX_AUTH} bytes")
        shield = self.shield if entry.da_protected else None
        if shield is None:
            return operation()
        key_id = entry.info.key_id
        if not shield.known_good(key_id, auth):
            # A fresh reading first: the counter decays, and other TPM users add to it.
            self._run(deadline, "reading the lockout counter", self._read_lockout)
            shield.check(peer, key_id, auth)
        try:
            result = operation()
        except AuthFailedError:
            shield.failed(peer, key_id, auth)
            raise
        except LockoutError:
            shield.tpm_locked_out()
            raise
        shield.succeeded(key_id, auth)
        return result

    def check_password(self, key_id: bytes, auth: bytes, peer: int) -> None:
        """The shield's refusals that need no TPM, for the event loop before it queues a
        signature: a password refused before, a throttled peer, the reserve reached."""
        entry = self.objects.keys.get(key_id)
        if self.shield is not None and entry is not None and entry.da_protected:
            self.shield.check(peer, key_id, auth, fresh=False)

    def _sign(self, entry: CachedKey, auth: bytes, scheme: Scheme, scheme_alg: int,
              hash: Hash, digest: bytes, deadline: float) -> bytes:
        key_id = entry.info.key_id
        if scheme is Scheme.PSS and self._pss_by_broker(entry):
            signature = self._run(deadline, "signing", lambda: self._sign_pss_in_broker(
                entry, auth, hash, digest, deadline))
        else:
            signature = self._run(deadline, "signing", lambda: self._authorized(
                entry, auth, deadline, lambda session, handle, name: command.prepare_sign(
                    session, handle, name, auth, digest, scheme_alg, hash),
                command.signature_bytes))
        if scheme is Scheme.PSS and entry.pss_by_broker is None:
            signature = self._check_tpm_pss_salt(entry, auth, hash, digest, signature,
                                                 deadline)
        self.objects.keys.touch(key_id)
        if entry.info.key_type is KeyType.RSA:
            # The TPM may drop leading zero bytes; the wire wants the modulus length.
            return signature.rjust((entry.info.bits + 7) // 8, b"\0")
        return signature

    def generate_key(self, key_type: KeyType, param: int, auth: bytes, parent: int,
                     deadline: float, usage: Usage = Usage.DEFAULT,
                     hash_alg: Hash | None = None, *, parent_auth: bytes = b"",
                     peer: int = -1, policy: bytes = b"") -> tuple[bytes, bytes]:
        """A new key under `parent`; with `policy` (DER SEQUENCE OF TPMPolicy, see
        tpm/keypolicy.py) its authPolicy is that policy's digest and the key file carries
        the policy."""
        try:
            key_type = KeyType(key_type)
        except ValueError:
            raise UnsupportedError(f"unsupported key type {key_type}") from None
        template = keymod.generation_template(key_type, param, password=bool(auth),
                                              usage=usage, hash_alg=hash_alg)
        steps = keypolicy.decode_request(policy) if policy else []
        if steps:
            keypolicy.check_steps(steps, digests_needed=False)
            if bool(auth) != keypolicy.needs_password(steps):
                raise UnsupportedError(
                    "a key with a policy and a password needs TPM2_PolicyAuthValue in its "
                    "policy, and one without a password must not have it")
            steps = self._run(deadline, "reading the PCRs",
                              lambda: self._fill_pcr_digests(steps))
            # The policy alone authorizes the key: without userWithAuth its password
            # cannot stand in for the policy.
            template.authPolicy = keypolicy.policy_digest(steps)
            template.objectAttributes &= ~TPMA_OBJECT.USERWITHAUTH
        parent = parent or STORAGE_PRIMARY
        if not (parent == STORAGE_PRIMARY or keymod.is_persistent(parent)):
            raise UnsupportedError(f"parent 0x{parent:08x} is neither the storage primary "
                                   "(0x40000001) nor a persistent handle")
        self._run(deadline, "asking the TPM about the key's algorithm",
                  lambda: self._check_tpm_has(key_type, param))
        if len(auth) > MAX_AUTH:
            raise UnsupportedError(f"passwords are at most {MAX_AUTH} bytes")
        self._check_parent_auth_length(parent, parent_auth)
        create_auth = self._load_auth(parent, parent_auth)
        self._owner_auth(parent, parent_auth, deadline)
        sensitive = TPM2B_SENSITIVE_CREATE()
        if auth:
            sensitive.sensitive.userAuth = auth
        in_public = TPM2B_PUBLIC(publicArea=template)

        def create() -> tuple[Any, Any]:
            parent_tr = self.objects.parent(parent)
            handle, name = self.objects.handle_and_name(parent_tr)
            # The pool session encrypts the new key's password on its way to the TPM, and
            # proves the parent's password by its HMAC alone.
            try:
                return self.objects.with_room(None, lambda: self._execute(
                    deadline, lambda session: command.prepare_create(
                        session, handle, name, create_auth, sensitive, in_public),
                    command.create_result), parent_tr)
            except TSS2_Exception as exc:
                refused = refusal(exc, parent, create_auth, "TPM2_Create")
                if refused is not None:
                    raise refused from None
                raise

        private, public = self._parent_attempt(
            parent, create_auth, peer, deadline,
            lambda: self._run(deadline, "creating the key", create))
        key = keymod.tss2_key_der(private, public, empty_auth=not auth, parent=parent,
                                  policy=steps)
        return key, bytes(public.publicArea.to_der())

    def _fill_pcr_digests(self, policy: Sequence[keypolicy.PolicyStep]
                          ) -> list[keypolicy.PolicyStep]:
        """The policy with each PolicyPCR that names no values given the PCRs' current
        ones (TPM2_PCR_Read)."""
        filled = []
        for step in policy:
            if step.command_code == keypolicy.CC_POLICY_PCR:
                selections, digest = keypolicy.split_pcr_step(step)
                if not digest:
                    wanted = keypolicy.marshal_selection(selections)
                    answered, values = command.pcr_read(self.link.require(), wanted)
                    if answered != wanted:
                        raise UnsupportedError("the TPM does not have all of "
                                               + "; ".join(s.describe() for s in selections))
                    step = keypolicy.pcr_step(selections, keypolicy.pcr_digest(values))
            filled.append(step)
        keypolicy.check_steps(filled)
        return filled

    def random(self, count: int, deadline: float) -> bytes:
        """`count` bytes from the TPM's random number generator.

        Each TPM2_GetRandom goes through a pool session with ENCRYPT, so the bytes cross
        the TPM's bus encrypted; the TPM gives at most one digest's worth per command
        (TPM2_PT_MAX_DIGEST), so larger counts take several.
        """
        if not 0 <= count <= MAX_RANDOM:
            raise UnsupportedError(f"at most {MAX_RANDOM} random bytes per request, "
                                   f"not {count}")
        out = bytearray()
        while len(out) < count:
            want = count - len(out)
            chunk = self._run(deadline, "reading random bytes",
                              functools.partial(self._random_once, want, deadline))
            if not chunk or len(chunk) > want:
                raise TpmError(f"the TPM returned {len(chunk)} random bytes for {want}")
            out += chunk
        return bytes(out)

    def _random_once(self, want: int, deadline: float) -> bytes:
        return self._execute(deadline, lambda session: command.prepare_get_random(
            session, want), command.sized_result)

    def pcr_read(self, selection: bytes, deadline: float) -> tuple[bytes, bytes]:
        """TPM2_PCR_Read of a TPML_PCR_SELECTION: (the selection the TPM answered for,
        the values one after the other). It needs no authorization: no session."""
        answered, values = self._run(deadline, "reading PCRs",
                                     lambda: command.pcr_read(self.link.require(), selection))
        return answered, b"".join(values)

    def nv_read(self, index: int, deadline: float) -> bytes:
        """The whole contents of NV index `index`, read through a pool session that
        encrypts each chunk on its way back.

        Authorization is the index's own empty authValue when the index allows that and
        counts no dictionary-attack failures (as certificate indexes do), else the owner
        hierarchy's empty authValue; an index that needs a password is refused without
        trying, so nothing here can cost a lockout count.
        """
        return self._run(deadline, "reading the NV index",
                         functools.partial(self._nv_read_once, index, deadline))

    def _nv_read_once(self, index: int, deadline: float) -> bytes:
        transport = self.link.require()
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
        chunk = self._property(TPM2_PT_NV.BUFFER_MAX) or 512
        data = bytearray()
        while len(data) < size:
            want = min(chunk, size - len(data))
            offset = len(data)
            data += self._execute(deadline, functools.partial(
                command.prepare_nv_read, auth_handle=auth_handle, auth_name=auth_name,
                index=index, index_name=name, size=want, offset=offset), command.sized_result)
        return bytes(data)

    def decrypt(self, key_id: bytes, auth: bytes, padding: Padding, hash: Hash, mgf1: Hash,
                label: bytes, ciphertext: bytes, implicit_rejection: bool, deadline: float,
                peer: int = -1) -> bytes:
        """RSA decryption with TPM2_RSA_Decrypt through a pool session that encrypts the
        plaintext on its way back.

        A key whose scheme is NULL gets the raw private operation and the broker removes
        the padding in constant time (tpm/depad.py); a key with a fixed scheme has the TPM
        remove it. Every padding failure is the same BAD_DIGEST "decryption error"; with
        implicit rejection a bad PKCS#1 v1.5 padding gives a synthetic message instead.
        Password attempts go through the dictionary-attack shield, as signatures do.
        """
        entry = self._loaded(key_id)
        padding, hash, mgf1 = Padding(padding), Hash(hash), Hash(mgf1)
        tpm_scheme = keymod.decryption_scheme(entry.public, padding, hash, mgf1, label)
        modulus, _ = entry.rsa_public_numbers
        size = (modulus.bit_length() + 7) // 8
        if len(ciphertext) != size:
            raise BadDigestError(f"a ciphertext for this {modulus.bit_length()}-bit key is "
                                 f"{size} bytes, not {len(ciphertext)}")
        if int.from_bytes(ciphertext, "big") >= modulus:
            raise BadDigestError("the ciphertext is not below the key's modulus")

        def tpm_decrypt(block: bytes, scheme: tuple[int, int, bytes] | None) -> bytes:
            alg, hash_alg, tpm_label = scheme or (command.ALG_NULL, 0, b"")
            return self._run(deadline, "decrypting", lambda: self._authorized(
                entry, auth, deadline, lambda session, handle, name:
                command.prepare_rsa_decrypt(session, handle, name, auth, block, alg,
                                            hash_alg, tpm_label), command.sized_result))

        def decrypt() -> bytes:
            if tpm_scheme is not None:
                try:
                    return tpm_decrypt(ciphertext, tpm_scheme)
                except TpmError as exc:
                    if tpm_code(exc.tpm_rc) == TPM_RC_VALUE:  # the TPM found a bad padding
                        raise BadDigestError(depad.DECRYPTION_ERROR) from None
                    raise
            if padding is Padding.PKCS1 and entry.kdk_secret is None:
                name = bytes(entry.public.get_name())  # the same by file or by handle
                entry.kdk_secret = depad.kdk_secret(
                    tpm_decrypt(depad.kdk_block(name, size), None).rjust(size, b"\0"))
            em = tpm_decrypt(ciphertext, None).rjust(size, b"\0")
            if padding is Padding.NONE:
                return em
            if padding is Padding.OAEP:
                return depad.oaep(em, label, hash, mgf1)
            assert entry.kdk_secret is not None
            return depad.pkcs1(em, ciphertext, entry.kdk_secret, implicit_rejection)

        plaintext = self._with_password(entry, auth, peer, deadline, decrypt)
        self.objects.keys.touch(key_id)
        return plaintext

    # --- persistent handles (ops/lifecycle.py) ------------------------------------------

    def persist(self, key_id: bytes, handle: int, deadline: float, *,
                owner_auth: bytes = b"", peer: int = -1) -> bytes:
        """Make a loaded key persistent at `handle` (TPM2_EvictControl, the owner
        hierarchy's password proved by a pool session's HMAC); the key's Name. A handle
        in use is refused, never overwritten."""
        entry = self._loaded(key_id)
        if not entry.is_transient:
            raise BadKeyError(f"the key is persistent already, at "
                              f"0x{entry.persistent_handle:08x}")
        if len(owner_auth) > MAX_AUTH:
            raise AuthFailedError(f"the owner hierarchy's password is at most {MAX_AUTH} "
                                  "bytes")

        def evict_control() -> bytes:
            if handle in self._persistent_handles(handle, 1):
                raise BadKeyError(f"0x{handle:08x} is in use by another persistent object; "
                                  "evict it first (tpmbroker evict) or choose another handle")
            self.objects.forget_persistent(handle)  # whatever the broker knew there is gone
            key_handle, name = self.objects.handle_and_name(self.objects.resident(entry))
            self._execute(deadline, lambda session: command.prepare_evict_control(
                session, owner_auth, key_handle, name, handle), lambda _: None)
            return name

        return self._evict_control(deadline, f"persisting the key at 0x{handle:08x}",
                                   handle, evict_control)

    def evict(self, handle: int, deadline: float, *, owner_auth: bytes = b"") -> None:
        """Take the persistent object at `handle` out of the TPM; keys loaded by that
        handle are forgotten (their clients get UNKNOWN_KEY, then a LOAD that fails)."""
        if len(owner_auth) > MAX_AUTH:
            raise AuthFailedError(f"the owner hierarchy's password is at most {MAX_AUTH} "
                                  "bytes")

        def evict_control() -> None:
            try:
                _, name = command.read_public(self.link.require(), handle)
            except TSS2_Exception as exc:
                if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
                    raise BadKeyError(f"no persistent object at 0x{handle:08x}",
                                      tpm_rc=int(exc.rc)) from None
                raise
            self._execute(deadline, lambda session: command.prepare_evict_control(
                session, owner_auth, handle, name, handle), lambda _: None)

        self._evict_control(deadline, f"evicting 0x{handle:08x}", handle, evict_control)
        dropped = self.objects.forget_persistent(handle)
        if dropped:
            log.info("evicted 0x%08x: forgot %d key(s) loaded by that handle", handle,
                     len(dropped))

    def _evict_control(self, deadline: float, doing: str, handle: int,
                       operation: Callable[[], T]) -> T:
        """`operation` (a TPM2_EvictControl), its refusals said in the owner's terms."""
        try:
            return self._run(deadline, doing, operation)
        except AuthFailedError as exc:
            # Hierarchy authorizations count no dictionary-attack failures.
            raise AuthFailedError(f"wrong password for the owner hierarchy while {doing}",
                                  tpm_rc=exc.tpm_rc) from None
        except TpmError as exc:
            code = tpm_code(exc.tpm_rc)
            if code == 0x14C:  # TPM_RC_NV_DEFINED
                raise BadKeyError(f"0x{handle:08x} is in use by another persistent object",
                                  tpm_rc=exc.tpm_rc) from None
            if code == 0x14B:  # TPM_RC_NV_SPACE
                raise TpmError("the TPM has no room for another persistent object; evict "
                               "one first", tpm_rc=exc.tpm_rc) from None
            if code == 0x149:  # TPM_RC_HIERARCHY
                raise BadKeyError(f"0x{handle:08x}: the key's hierarchy is not the owner's "
                                  "or is disabled", tpm_rc=exc.tpm_rc) from None
            raise

    def keys(self, deadline: float) -> dict[str, Any]:
        """The TPM's persistent objects (TPM2_GetCapability, TPM2_ReadPublic) and the keys
        the worker knows, for KEYS."""
        def read() -> list[dict[str, object]]:
            transport = self.link.require()
            listed = []
            for handle in self._persistent_handles(keymod.PERSISTENT_FIRST):
                try:
                    # The TPM brings a persistent object into an object slot to read it:
                    # with every slot taken by loaded keys, one makes room.
                    public, name = self.objects.with_room(
                        None, functools.partial(command.read_public, transport, handle))
                except TSS2_Exception as exc:
                    if tpm_code(int(exc.rc)) in (0x08B, 0x084):
                        continue  # evicted by another TPM user meanwhile
                    raise
                listed.append(persistent.describe_object(handle, public, name))
            return listed

        return {"persistent": self._run(deadline, "listing persistent handles", read),
                "loaded": [persistent.describe_loaded(entry) for entry in self.objects.keys]}

    def _persistent_handles(self, first: int, count: int | None = None) -> list[int]:
        """Persistent handles from `first` on (TPM2_GetCapability TPM_CAP_HANDLES), at
        most `count` of them, or all."""
        handles: list[int] = []
        while count is None or len(handles) < count:
            want = 64 if count is None else count - len(handles)
            more, data = self.link.ectx.get_capability(TPM2_CAP.HANDLES, first, want)
            got = [int(h) for h in data.data.handles if keymod.is_persistent(int(h))]
            handles += got
            if not more or not got or len(got) < len(data.data.handles):
                break
            first = got[-1] + 1
        return handles if count is None else handles[:count]

    # --- what this TPM has ----------------------------------------------------------------

    def _check_tpm_has(self, key_type: KeyType, param: int) -> None:
        """UnsupportedError with the TPM's reason unless the TPM makes such keys."""
        if key_type is KeyType.EC:
            if param not in self._tpm_curves():
                raise UnsupportedError(f"this TPM has no curve {_curve_name(param)} "
                                       "(TPM2_GetCapability TPM_CAP_ECC_CURVES does not list "
                                       "it; `tpmbroker status` lists tpm_curves)")
            return
        rc = self._rsa_size_rc(param)
        if rc is not None:
            raise UnsupportedError(f"this TPM has no RSA-{param} (TPM2_TestParms: "
                                   f"{_rc_name(rc)}); `tpmbroker status` lists the sizes "
                                   "it has (tpm_rsa_bits)", tpm_rc=rc)

    def _tpm_curves(self) -> list[int]:
        if self._curves is None:
            _, data = self.link.ectx.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
            self._curves = [int(curve) for curve in data.data.eccCurves]
        return self._curves

    def _rsa_size_rc(self, bits: int) -> int | None:
        """None if the TPM has RSA keys of `bits`, else the TPM's TestParms error code."""
        if bits not in self._rsa_sizes:
            parms = TPMT_PUBLIC_PARMS(type=TPM2_ALG.RSA, parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=keymod.rsa_parms(bits)))
            try:
                self.link.ectx.test_parms(parms)
                self._rsa_sizes[bits] = None
            except TSS2_Exception as exc:
                if classify(exc) in RECOVERABLE:
                    raise
                self._rsa_sizes[bits] = int(exc.rc)
        return self._rsa_sizes[bits]

    def algorithms(self) -> dict[str, object]:
        """Curves and RSA sizes this TPM makes keys of, for STATUS (asked once)."""
        if not self.link.up:
            return {}
        try:
            curves = self._tpm_curves()
            rsa = [bits for bits in keymod.RSA_SIZES if self._rsa_size_rc(bits) is None]
        except TSS2_Exception:
            return {}
        return {"tpm_curves": [_curve_name(curve) for curve in curves], "tpm_rsa_bits": rsa}

    def status(self) -> dict[str, object]:
        return {
            **self.algorithms(),
            "pool_size": self.pool.size,
            "pool_sessions": self.pool.count,
            "policy_pool_size": self.policy_pool.size,
            "policy_pool_sessions": self.policy_pool.count,
            "tpm_active_sessions": self._property(TPM2_PT_HR.ACTIVE),
            "tpm_active_sessions_max": self._active_sessions_max or None,
            "loaded_keys": len(self.objects.keys),
            "resident_keys": sum(1 for _ in self.objects.resident_keys()),
            "tpm_restarts_recovered": self._restarts_recovered,
            "tpm_hashed_messages": self._tpm_hashed,
            # Dictionary-attack failures the TPM counts now (wrong passwords, mostly).
            "tpm_lockout_counter": self._lockout_counter(),
            "tcti": self.tcti,
            **(self.shield.status() if self.shield is not None else {}),
            **self.parents.status(),
        }

    # --- RSA-PSS padded by the broker ------------------------------------------------------

    def _pss_by_broker(self, entry: CachedKey) -> bool:
        if self.pss_padding == "tpm":
            entry.pss_by_broker = False
        elif self.pss_padding == "broker":
            entry.pss_by_broker = True
        if entry.pss_by_broker and not entry.can_decrypt:
            raise UnsupportedError(
                "this TPM signs RSA-PSS with a salt longer than the digest, which TLS 1.3 "
                "verifiers reject, and the key lacks the decrypt attribute the broker needs "
                "to pad PSS itself; make the key with `tpmbroker keygen --usage "
                "sign,decrypt` (or -pkeyopt usage:sign,decrypt), use an EC key, or sign "
                "with PKCS#1 v1.5")
        return bool(entry.pss_by_broker)

    def _check_tpm_pss_salt(self, entry: CachedKey, auth: bytes, hash: Hash,
                            digest: bytes, signature: bytes, deadline: float) -> bytes:
        """The first PSS signature of a key, made by the TPM: is its salt the digest
        length? If not, this and every later PSS signature of the key is padded here."""
        modulus, exponent = entry.rsa_public_numbers
        salt = pss.salt_length(signature, modulus, exponent, digest, hash.hashlib_name)
        entry.pss_by_broker = salt != hash.digest_size
        if not entry.pss_by_broker:
            return signature
        self._pss_by_broker(entry)  # raises if the key cannot be used that way
        return self._run(deadline, "signing", lambda: self._sign_pss_in_broker(
            entry, auth, hash, digest, deadline))

    def _sign_pss_in_broker(self, entry: CachedKey, auth: bytes, hash: Hash,
                            digest: bytes, deadline: float) -> bytes:
        modulus, _ = entry.rsa_public_numbers
        block = pss.encode(digest, hash.hashlib_name, modulus.bit_length())
        return self._authorized(
            entry, auth, deadline, lambda session, handle, name: command.prepare_rsa_private(
                session, handle, name, auth, block), command.sized_result)

    # --- the authorized-command path ----------------------------------------------------------

    def _authorized(self, entry: CachedKey, auth: bytes, deadline: float,
                    prepare: Callable[[SessionState, int, bytes], command.PendingCommand],
                    result: Callable[[bytes], T]) -> T:
        """One command on `entry`'s key (made resident) with a pool session; a key with a
        policy gets a policy session that has just satisfied it."""
        handle, name = self.objects.handle_and_name(self.objects.resident(entry))
        if entry.policy:
            return self._policy_execute(entry, auth, deadline,
                                        lambda session: prepare(session, handle, name), result)
        return self._execute(deadline, lambda session: prepare(session, handle, name), result)

    def _policy_execute(self, entry: CachedKey, auth: bytes, deadline: float,
                        prepare: Callable[[SessionState], command.PendingCommand],
                        result: Callable[[bytes], T]) -> T:
        """The command with a policy session: PolicyRestart, the key's policy replayed,
        then the command, authorized by the session (and the key's password in its HMAC
        when the policy has TPM2_PolicyAuthValue).

        The policy commands need no authorization: a policy that does not hold costs no
        dictionary-attack count. Only a wrong password after PolicyAuthValue does, as with
        any key that has a password.
        """
        steps = entry.policy
        if auth and not keypolicy.needs_password(steps):
            raise AuthFailedError("the key's policy takes no password (no "
                                  "TPM2_PolicyAuthValue in it); none may be given")
        session = self.policy_pool.acquire(deadline)
        self._check_deadline(deadline)
        transport = self.link.require()
        command.policy_restart(transport, session.handle)
        if steps[0].command_code == keypolicy.CC_POLICY_AUTHORIZE:
            self._signed_policy(entry, session.handle, steps[0])
            steps = steps[1:]
        self._replay(session.handle, steps)
        pending = prepare(session)
        try:
            _, parameters = command.execute(transport, pending)
        except command.ResponseAuthError:
            self.policy_pool.discard(session)
            raise
        except TSS2_Exception as exc:
            if tpm_code(int(exc.rc)) == TPM_RC_POLICY_FAIL:
                raise PolicyFailedError("the TPM refused the key's policy session: the "
                                        "policy in the key file is not the key's",
                                        tpm_rc=int(exc.rc)) from None
            raise
        return result(parameters)

    def _replay(self, session_handle: int, steps: Sequence[keypolicy.PolicyStep]) -> None:
        """PolicyPCR and PolicyAuthValue on the policy session, in order."""
        transport = self.link.require()
        for step in steps:
            if step.command_code == keypolicy.CC_POLICY_PCR:
                selections, digest = keypolicy.split_pcr_step(step)
                try:
                    command.policy_pcr(transport, session_handle, digest,
                                       keypolicy.marshal_selection(selections))
                except TSS2_Exception as exc:
                    if tpm_code(int(exc.rc)) == TPM_RC_VALUE:
                        raise PolicyFailedError(keypolicy.mismatch(selections),
                                                tpm_rc=int(exc.rc)) from None
                    raise
            elif step.command_code == keypolicy.CC_POLICY_AUTH_VALUE:
                command.policy_auth_value(transport, session_handle)
            else:  # keys.check_key_policy allows PolicyAuthorize first only
                raise BadKeyError(f"{step.name} out of place in the key's policy")

    def _signed_policy(self, entry: CachedKey, session_handle: int,
                       authorize: keypolicy.PolicyStep) -> None:
        """Satisfy the key's PolicyAuthorize with the first of its signed policies that
        holds: its commands, then the TPM's check of its signature (LoadExternal of the
        policy key, VerifySignature, the ticket to PolicyAuthorize)."""
        main = keypolicy.Authorize.decode(authorize.command_policy)
        transport = self.link.require()
        signed = entry.blob.auth_policies if entry.blob is not None else ()
        if not signed:
            raise PolicyFailedError("the key needs a signed policy (authPolicy) and its file "
                                    "has none: add one with `tpmbroker policy sign`")
        refusals = []
        for name, policy in signed:
            label = f"signed policy {name!r}" if name else "a signed policy"
            body, signature = keypolicy.signed_policy_steps(policy)
            if (signature.key_public, signature.policy_ref) != (main.key_public,
                                                                main.policy_ref):
                refusals.append(f"{label} is signed by another key")
                continue
            command.policy_restart(transport, session_handle)
            try:
                self._replay(session_handle, body)
            except PolicyFailedError as exc:
                refusals.append(f"{label}: {exc.message}")
                continue
            approved = command.policy_get_digest(transport, session_handle)
            a_hash = hashlib.sha256(approved + main.policy_ref).digest()
            handle = self.objects.with_room(entry, lambda: command.load_external_public(
                transport, main.key_public))
            try:
                ticket = command.verify_signature(transport, handle, a_hash,
                                                  signature.signature)
            except TSS2_Exception as exc:
                if classify(exc) is not Kind.OTHER:
                    raise
                refusals.append(f"{label}: its signature does not verify")
                continue
            finally:
                with contextlib.suppress(TSS2_Exception):
                    command.flush_context(transport, handle)
            command.policy_authorize(transport, session_handle, approved, main.policy_ref,
                                     main.key_name, ticket)
            return
        raise PolicyFailedError("no signed policy of the key holds: " + "; ".join(refusals))

    def _execute(self, deadline: float,
                 prepare: Callable[[SessionState], command.PendingCommand],
                 result: Callable[[bytes], T]) -> T:
        """Take a pool session, prepare the command with it, send it, check the answer."""
        session = self.pool.acquire(deadline)
        self._check_deadline(deadline)
        pending = prepare(session)
        try:
            _, parameters = command.execute(self.link.require(), pending)
        except command.ResponseAuthError:
            self.pool.discard(session)  # not to be trusted with another HMAC
            raise
        return result(parameters)

    def _execute_handle(self, deadline: float,
                        prepare: Callable[[SessionState], command.PendingCommand]) -> int:
        """_execute for a command that answers with one handle (Load, CreatePrimary)."""
        session = self.pool.acquire(deadline)
        self._check_deadline(deadline)
        pending = prepare(session)
        try:
            handles, _ = command.execute(self.link.require(), pending)
        except command.ResponseAuthError:
            self.pool.discard(session)
            raise
        if len(handles) != 1:
            raise command.malformed()
        return handles[0]

    # --- the lane: signatures the event loop sends itself ------------------------------------
    # The common case (key resident, pool session ready, swtpm link) needs no TPM command
    # but the Sign itself, so the event loop sends it and reads the answer without handing
    # the request to the worker thread and back (two thread switches, with the GIL handed
    # over each time, cost more CPU than the signature). Anything else returns None and
    # goes to the worker thread, with recovery.

    def lane_socket(self) -> Any:
        return self.link.lane_socket()

    def lane_sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
                  digest: bytes, peer: int = -1) -> LaneCommand | None:
        """The framed TPM2_Sign for a signature that needs nothing else, else None.

        Never talks to the TPM. The session stays unusable until lane_finish (or
        lane_abort) says how the command went.
        """
        entry = self.objects.keys.get(key_id)
        if (entry is None or entry.handle is None or not self.link.up or entry.policy
                or not self.pool.full or len(auth) > MAX_AUTH
                or len(digest) != hash.digest_size):
            return None
        if scheme is Scheme.PSS and entry.pss_by_broker is not False:
            return None  # the TPM's own PSS is not known to be what the client wants
        if (entry.da_protected and self.shield is not None
                and not self.shield.known_good(key_id, auth)):
            return None  # a password attempt: the worker thread asks the shield
        try:
            scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
        except TpmBrokerError:
            return None
        known = self.objects.known_name(entry.handle)
        if (entry.info.key_id, scheme_alg, hash) not in self._schemes_checked or not known:
            return None
        session = self.pool.next_session()
        if not session.usable:
            return None
        pending = command.prepare_sign(session, known[0], known[1], auth, digest, scheme_alg,
                                       hash)
        session.usable = False  # until the answer says otherwise (as command.execute does)
        return LaneCommand(frame_command(pending.command), pending, entry, peer, auth)

    def lane_finish(self, lane: LaneCommand, response: bytes) -> bytes:
        """The signature from the TPM's answer.

        A wrong password or a forged answer is final (TpmBrokerError: never retried, it
        would count toward the lockout again); any other refusal raises NotForLane, and
        the worker thread, with its recovery, serves the request.
        """
        session = lane.pending.session
        if (len(response) == command.HEADER_SIZE
                and command.response_code(response) in command.RESEND_CODES):
            session.usable = True  # the TPM did not start the command
            raise NotForLane("the TPM asked for the command again")
        try:
            _, parameters = command.finish(lane.pending, response)
        except command.ResponseAuthError as exc:
            self.pool.discard(session)
            raise to_error(exc, "signing") from None
        except TSS2_Exception as exc:
            if int(exc.rc) & int(TSS2_RC.RC_LAYER_MASK) == 0:
                session.usable = True  # the TPM refused; its nonce did not move
            kind = classify(exc)
            if kind in (Kind.AUTH, Kind.LOCKOUT):
                if self.shield is not None and lane.entry.da_protected:
                    if kind is Kind.AUTH:
                        self.shield.failed(lane.peer, lane.entry.info.key_id, lane.auth)
                    else:
                        self.shield.tpm_locked_out()
                raise to_error(exc, "signing") from None
            raise NotForLane(str(exc)) from exc
        session.usable = True
        self.objects.keys.touch(lane.entry.info.key_id)
        info = lane.entry.info
        return command.signature_bytes(
            parameters, (info.bits + 7) // 8 if info.key_type is KeyType.RSA else 0)

    @staticmethod
    def lane_cancel(lane: LaneCommand) -> None:
        """A prepared command that was never sent: its session is as it was."""
        lane.pending.session.usable = True

    def lane_abort(self, lane: LaneCommand | None) -> None:
        """The command's fate is unknown (link broke, no answer): drop the connection so
        the next command reconnects; the session stays unusable and is replaced."""
        self.link.drop_connection()

    @staticmethod
    def split_response(data: bytes | bytearray) -> bytes | None:
        """The TPM's answer once `data` holds all of it (lane_socket's framing)."""
        return split_response(data)

    # --- one request, with recovery -----------------------------------------------------

    def _run(self, deadline: float, doing: str, operation: Callable[[], T]) -> T:
        """Run `operation`; if the TPM lost our state, rebuild it and run it once more."""
        self._check_deadline(deadline)
        self._op_deadline = deadline
        if not self.link.up:
            if not self._opened:
                raise TpmUnavailableError("the TPM worker is not open")
            self._recover(deadline)
        try:
            return operation()
        except TSS2_Exception as exc:
            if classify(exc) not in RECOVERABLE:
                raise to_error(exc, doing) from exc
        self._recover(deadline)
        self._check_deadline(deadline)
        try:
            return operation()
        except TSS2_Exception as exc:
            raise to_error(exc, doing) from exc

    def _recover(self, deadline: float) -> None:
        """Rebuild link, primary, sessions and key handles from scratch.

        Before the old link goes, note the TPM handles we held: if the TPM did not
        restart (same resetCount and restartCount) they may still occupy slots, and on a
        TPM without a resource manager nobody else would free them.
        """
        stale: list[int] = []
        counts_before = self._counts
        if self.link.up:
            stale = [*self.pool.tpm_handles(), *self.policy_pool.tpm_handles(),
                     *self.objects.held_handles()]
            self._drop_link()
        try:
            self._build(deadline, stale)
        except TSS2_Exception as exc:
            self._drop_link()
            raise to_error(exc, "recovering the TPM state") from exc
        except TpmBrokerError:
            self._drop_link()
            raise
        self._restarts_recovered += 1
        if self._counts != counts_before and self._counts is not None:
            audit("tpm_reset", reset_count=self._counts[0], restart_count=self._counts[1])
        audit("recovery", level=logging.INFO, recoveries=self._restarts_recovered)

    def _build(self, deadline: float, stale_handles: list[int]) -> None:
        counts = self.link.connect(deadline)
        if self.link.owns_tpm:
            # No resource manager: whatever a dead client (a killed broker) left in the
            # TPM fills its slots until someone flushes it; ours were forgotten anyway.
            objects, sessions = self.link.flush_leftovers()
            if objects or sessions:
                log.info("clean start: flushed %d transient objects and %d sessions "
                         "left in the TPM", objects, sessions)
        elif counts == self._counts or counts == (0, 0):
            # Sessions and objects survive unless the TPM went through Reset or Restart
            # (TPM2_Clear zeroes both counters but leaves sessions alone). Behind a
            # resource manager only our own are flushed.
            for handle in stale_handles:
                self.link.flush(handle)
        self._counts = counts
        if self._rsa_only is None:
            # The rule for parent 0x40000001: ECC P-256 unless the TPM lacks ECC.
            self._rsa_only = not self._has_algorithm(TPM2_ALG.ECC)
        self.objects.rsa_only = self._rsa_only
        self._active_sessions_max = self._property(TPM2_PT.ACTIVE_SESSIONS_MAX) or 0
        self._lockout_counter()
        self.pool.fill()

    def _drop_link(self) -> None:
        """Forget everything tied to the link, and close it."""
        self.pool.forget()
        self.policy_pool.forget()
        self.objects.forget()
        self.link.close()

    def _start_session(self) -> SessionState:
        salt_handle, salt_public = self.objects.salt_key()
        return command.start_salted_session(self.link.require(), salt_handle, salt_public)

    def _start_policy_session(self) -> SessionState:
        salt_handle, salt_public = self.objects.salt_key()
        return command.start_salted_session(self.link.require(), salt_handle, salt_public,
                                            session_type=command.SE_POLICY)

    def _flush(self, handle: int) -> None:
        command.flush_context(self.link.require(), handle)

    # --- helpers ------------------------------------------------------------------------

    def _property(self, prop: int) -> int | None:
        if not self.link.up:
            return None
        try:
            _, data = self.link.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
        except TSS2_Exception:
            return None
        for entry in data.data.tpmProperties:
            if entry.property == prop:
                return int(entry.value)
        return None

    def _lockout_counter(self) -> int | None:
        try:
            return self._read_lockout()
        except TSS2_Exception:
            return None

    def _read_lockout(self) -> int | None:
        """The TPM's lockout counter and dictionary-attack settings (one command), given
        to the shield; the counter, or None if the TPM cannot say."""
        if not self.link.up:
            return None
        first = int(TPM2_PT.LOCKOUT_COUNTER)  # then MAX_AUTH_FAIL, LOCKOUT_INTERVAL, _RECOVERY
        _, data = self.link.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, first, 4)
        values = {int(entry.property): int(entry.value) for entry in data.data.tpmProperties}
        counter = values.get(first)
        if counter is None:
            return None
        if self.shield is not None and all(
                int(prop) in values for prop in (TPM2_PT.MAX_AUTH_FAIL, TPM2_PT.LOCKOUT_INTERVAL,
                                                 TPM2_PT.LOCKOUT_RECOVERY)):
            self.shield.observe(counter, DaParameters(
                values[int(TPM2_PT.MAX_AUTH_FAIL)], values[int(TPM2_PT.LOCKOUT_INTERVAL)],
                values[int(TPM2_PT.LOCKOUT_RECOVERY)]))
        return counter

    def _has_algorithm(self, alg: int) -> bool:
        _, data = self.link.ectx.get_capability(TPM2_CAP.ALGS, alg, 1)
        return any(int(entry.alg) == int(alg) for entry in data.data.algorithms)

    @staticmethod
    def _check_deadline(deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineError("the request's deadline passed before the TPM could serve it")


def _rc_name(rc: int) -> str:
    """TPM_RC_VALUE and the like, for people, from a TPM's response code."""
    code = tpm_code(rc)
    if code is None:
        return f"0x{rc:x}"
    try:
        return "TPM_RC_" + str(TPM2_RC.to_string(code)).split(".")[-1]
    except ValueError:
        return f"0x{rc:x}"


def _curve_name(curve: int) -> str:
    """P-256 and the like; the TPM's id for curves OpenSSL has no ECDSA name for."""
    try:
        return keymod.CURVE_NAMES[Curve(curve)]
    except (ValueError, KeyError):
        return f"0x{curve:04x}"
