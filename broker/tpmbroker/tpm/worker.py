"""The TPM worker: the one place that talks to the TPM.

One thread calls every method. The worker keeps an ESAPI context, the storage primary
(created once), a small pool of salted HMAC sessions and the keys it has loaded. When the
TPM restarts or the connection breaks, the next request rebuilds all of that and is
retried once; no command is sent with a session that may be stale, so recovery never
costs dictionary-attack failures.

Signing and key creation take the fast path by default: the worker starts the pool's
sessions with raw commands, computes their HMACs and parameter encryption itself
(session_crypto) and sends raw TPM2_Sign / TPM2_Create (raw): about 0.1 ms of CPU per
signature, socket included, instead of ESAPI's 2-3 ms. ESAPI, over the same link, does
everything else. `fast_path=False` keeps the whole ESAPI path (for comparison).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_PT_HR,
    TPM2_SU,
    TSS2_RC,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.tsskey import TSSPrivKey, _parent_ecc_template, _parent_rsa_template
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_PUBLIC_KEY_RSA,
    TPM2B_SENSITIVE_CREATE,
    TPMT_RSA_DECRYPT,
    TPMT_SIG_SCHEME,
)

from ..errors import (
    AuthFailedError,
    BadDigestError,
    BadKeyError,
    DeadlineError,
    TakeTheLongWay,
    TpmBrokerError,
    TpmError,
    TpmUnavailableError,
    UnknownKeyError,
    UnsupportedError,
)
from ..protocol import (
    MAX_RANDOM,
    STORAGE_PRIMARY,
    HashAlg,
    KeySource,
    KeyType,
    Scheme,
    key_id_for,
)
from . import keys as keymod
from . import pss, raw, transport
from .keys import CachedKey, KeyCache, KeyInfo
from .rc import Kind, classify, to_error, tpm_code
from .session_crypto import SessionState
from .sessions import SessionPool

T = TypeVar("T")

# A TPM2B_AUTH holds at most the name hash's digest (SHA-256 for every key we make).
MAX_AUTH = 32
CONNECT_BACKOFF_FIRST = 0.01
CONNECT_BACKOFF_MAX = 0.5
_RECOVERABLE = (Kind.TRANSPORT, Kind.NEEDS_STARTUP, Kind.LOST)
PSS_PADDINGS = ("auto", "tpm", "broker")
MAX_CACHED_KEYS = 4096


@dataclasses.dataclass
class FastSign:
    """A TPM2_Sign prepared for a caller that sends it and reads the answer itself."""

    command: bytes  # framed for the link (SwtpmSocket framing)
    pending: raw.PendingCommand
    session: Any  # ESYS_TR of the pool session it uses
    entry: CachedKey


class TpmWorker:
    def __init__(self, tcti: str, sessions: int = 2, fast_path: bool = True,
                 pss_padding: str = "auto") -> None:
        if not 1 <= sessions <= 3:
            raise ValueError(f"sessions must be 1 to 3, not {sessions}")
        if pss_padding not in PSS_PADDINGS:
            raise ValueError(f"pss_padding must be one of {', '.join(PSS_PADDINGS)}")
        self.tcti = tcti
        self.fast_path = fast_path
        # RSA-PSS: "tpm" takes the TPM's salt, "broker" always pads in the broker, "auto"
        # checks the TPM's first PSS signature per key and pads in the broker from then
        # on if its salt is not the digest length (see tpm/pss.py).
        self.pss_padding = pss_padding
        self.max_cached_keys = MAX_CACHED_KEYS
        self._ectx: Any = None  # ESAPI, None while disconnected
        # Fast path: the raw link ESAPI shares, and the session state behind each pool
        # ESYS_TR (ESAPI only names and flushes those sessions).
        self._link: transport.Transport | None = None
        self._link_tcti: Any = None
        self._raw_sessions: dict[int, SessionState] = {}
        self._primary_publics: dict[bool, Any] = {}  # rsa? -> TPMT_PUBLIC (the salt key)
        self._tpm_handles: dict[int, tuple[int, bytes]] = {}  # ESYS_TR -> (handle, name)
        self._schemes_checked: set[tuple[bytes, int, int]] = set()  # (key id, scheme, hash)
        self._pool = SessionPool(sessions, start=self._start_raw_session if fast_path else None)
        self._keys = KeyCache()
        self._primaries: dict[bool, Any] = {}  # rsa? -> ESYS_TR of the storage primary
        self._persistent: dict[int, Any] = {}  # TPM handle -> ESYS_TR (parents, keys)
        self._rsa_only: bool | None = None  # the TPM lacks ECC: H-1 RSA is the default
        self._counts: tuple[int, int] | None = None  # (resetCount, restartCount)
        self._active_sessions_max = 0
        self._restarts_recovered = 0
        self._opened = False

    # --- lifecycle ----------------------------------------------------------------------

    def open(self, deadline: float) -> None:
        """Connect, create the storage primary and the session pool."""
        if self._ectx is not None:
            return
        try:
            self._build(deadline, stale_handles=[])
        except TpmUnavailableError:
            self._drop_context()
            raise
        except TpmBrokerError as exc:
            self._drop_context()
            raise TpmUnavailableError(f"the TPM is not usable: {exc.message}",
                                      tpm_rc=exc.tpm_rc) from exc
        except TSS2_Exception as exc:
            self._drop_context()
            raise TpmUnavailableError(f"the TPM is not usable: {exc}", tpm_rc=int(exc.rc)) from exc
        self._opened = True

    def close(self) -> None:
        """Flush the pool, the keys and the primaries; finalize ESAPI. Idempotent."""
        self._opened = False
        ectx = self._ectx
        if ectx is None:
            return
        self._pool.flush(ectx)
        for key in self._keys.resident():
            self._unload(key)
        for primary in self._primaries.values():
            with contextlib.suppress(TSS2_Exception):
                ectx.flush_context(primary)
        self._drop_context()

    # --- requests -----------------------------------------------------------------------

    def load_key(self, source: KeySource, key: bytes, deadline: float) -> KeyInfo:
        try:
            source = KeySource(source)
        except ValueError:
            raise UnsupportedError(f"unknown key source {source}") from None
        key_id = key_id_for(source, key)
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached.info
        if source is KeySource.TSS2_DER:
            blob = keymod.parse_tss2_key(key)
            entry = CachedKey(keymod.key_info(key_id, blob.public.publicArea),
                              blob.public.publicArea, blob=blob)
        else:
            entry = self._run(deadline, "reading the persistent key",
                              lambda: self._describe_persistent(key_id, key))
        self._run(deadline, "loading the key", lambda: self._resident(entry, deadline))
        self._keys.add(entry)
        while len(self._keys) > self.max_cached_keys:
            # Every client may LOAD any blob: memory stays bounded, and a key dropped
            # here is loaded again when its connection next signs (UNKNOWN_KEY, reload).
            oldest = self._keys.pop_oldest()
            if self._ectx is not None:
                self._unload(oldest)
        return entry.info

    def unload_key(self, key_id: bytes) -> None:
        """Forget a key and free its TPM slot (not part of signing; for UNLOAD)."""
        entry = self._keys.remove(key_id)
        if entry is not None and self._ectx is not None:
            self._unload(entry)

    def sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash_alg: HashAlg,
             digest: bytes, deadline: float) -> bytes:
        entry = self._keys.get(key_id)
        if entry is None:
            raise UnknownKeyError("unknown key id; send LOAD first")
        try:
            scheme = Scheme(scheme)
            hash_alg = HashAlg(hash_alg)
        except ValueError as exc:
            raise UnsupportedError(str(exc)) from None
        scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
        if (key_id, scheme_alg, hash_alg) not in self._schemes_checked:
            # Reading the key's fixed scheme through tpm2-pytss costs more than the rest
            # of a fast-path signature; a key id always names the same public area.
            keymod.check_key_scheme(entry.public, scheme_alg, hash_alg)
            self._schemes_checked.add((key_id, scheme_alg, hash_alg))
        if len(digest) != hash_alg.digest_size:
            raise BadDigestError(f"{hash_alg.name} digest must be {hash_alg.digest_size} bytes, "
                                 f"not {len(digest)}")
        if len(auth) > MAX_AUTH:
            # No key can have such a password; asking the TPM would only count a failure.
            raise AuthFailedError(f"password longer than {MAX_AUTH} bytes")
        if scheme is Scheme.PSS and self._pss_by_broker(entry):
            signature = self._run(deadline, "signing", lambda: self._sign_pss_in_broker(
                entry, auth, hash_alg, digest, deadline))
        elif self.fast_path:
            signature = self._run(deadline, "signing", lambda: self._sign_fast(
                entry, auth, scheme_alg, hash_alg, digest, deadline))
        else:
            in_scheme = TPMT_SIG_SCHEME(scheme=scheme_alg)
            in_scheme.details.any.hashAlg = hash_alg
            signature = self._run(deadline, "signing", lambda: self._sign_once(
                entry, auth, in_scheme, digest, deadline))
        if scheme is Scheme.PSS and entry.pss_by_broker is None:
            signature = self._check_tpm_pss_salt(entry, auth, hash_alg, digest, signature,
                                                 deadline)
        self._keys.touch(key_id)
        if entry.info.key_type is KeyType.RSA:
            # The TPM may drop leading zero bytes; the wire wants the modulus length.
            return signature.rjust((entry.info.bits + 7) // 8, b"\0")
        return signature

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
                "to pad PSS itself; make the key with `tpmbroker keygen` (RSA keys get "
                "sign|decrypt) or sign with PKCS#1 v1.5")
        return bool(entry.pss_by_broker)

    def _check_tpm_pss_salt(self, entry: CachedKey, auth: bytes, hash_alg: HashAlg,
                            digest: bytes, signature: bytes, deadline: float) -> bytes:
        """The first PSS signature of a key, made by the TPM: is its salt the digest
        length? If not, this and every later PSS signature of the key is padded here."""
        modulus, exponent = entry.rsa_public_numbers
        salt = pss.salt_length(signature, modulus, exponent, digest, hash_alg.hashlib_name)
        entry.pss_by_broker = salt != hash_alg.digest_size
        if not entry.pss_by_broker:
            return signature
        self._pss_by_broker(entry)  # raises if the key cannot be used that way
        return self._run(deadline, "signing", lambda: self._sign_pss_in_broker(
            entry, auth, hash_alg, digest, deadline))

    def _sign_pss_in_broker(self, entry: CachedKey, auth: bytes, hash_alg: HashAlg,
                            digest: bytes, deadline: float) -> bytes:
        modulus, _ = entry.rsa_public_numbers
        block = pss.encode(digest, hash_alg.hashlib_name, modulus.bit_length())
        handle = self._resident(entry, deadline)
        if not self.fast_path:
            session = self._session(deadline)
            self._check_deadline(deadline)
            self._ectx.tr_set_auth(handle, auth)
            message = self._ectx.rsa_decrypt(
                handle, TPM2B_PUBLIC_KEY_RSA(block), TPMT_RSA_DECRYPT(scheme=TPM2_ALG.NULL),
                TPM2B_DATA(), session1=session)
            return bytes(message)
        session, state = self._raw_session(deadline)
        self._check_deadline(deadline)
        key_handle, key_name = self._tpm_handle(handle)
        try:
            return raw.rsa_private(self._raw_link(), state, key_handle, key_name, auth, block)
        except raw.ResponseAuthError:
            self._discard_session(session)
            raise

    # --- signing without this object's thread -----------------------------------------
    # The common case — key resident, pool session ready, persistent swtpm socket — needs
    # no TPM command but the Sign itself, so the server's event loop can send it and read
    # the answer without handing the request to another thread and back (two thread
    # switches and the GIL handed over each time cost more CPU than the signature).
    # Anything else returns None and goes the ordinary way, with recovery.

    def lane_socket(self) -> Any:
        """The open persistent socket to the TPM, or None."""
        link = self._link
        if not self.fast_path or not isinstance(link, transport.SwtpmSocket):
            return None
        return link.connected_socket

    def begin_fast_sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash_alg: HashAlg,
                        digest: bytes) -> FastSign | None:
        """The framed command for a signature that needs nothing else, else None.

        Never talks to the TPM. The session stays unusable until finish_fast_sign (or
        abort_fast_sign) says how the command went.
        """
        entry = self._keys.get(key_id)
        if (entry is None or entry.handle is None or self._ectx is None
                or self._pool.count < self._pool.size or len(auth) > MAX_AUTH
                or len(digest) != hash_alg.digest_size):
            return None
        if scheme is Scheme.PSS and entry.pss_by_broker is not False:
            return None  # the TPM's own PSS is not known to be what the client wants
        try:
            scheme_alg = keymod.signature_scheme_alg(entry.info.key_type, scheme)
        except TpmBrokerError:
            return None
        known = self._tpm_handles.get(int(entry.handle))
        if (entry.info.key_id, scheme_alg, hash_alg) not in self._schemes_checked or not known:
            return None
        session = self._pool.next_session()
        state = self._raw_sessions.get(int(session))
        if state is None or not state.usable:
            return None
        pending = raw.prepare_sign(state, known[0], known[1], auth, digest, scheme_alg,
                                   hash_alg)
        state.usable = False  # until the answer says otherwise (as raw.execute does)
        return FastSign(transport.frame_command(pending.command), pending, session, entry)

    def finish_fast_sign(self, fast: FastSign, response: bytes) -> bytes:
        """The signature from the TPM's answer.

        A wrong password or a forged answer is final (TpmBrokerError: never retried, it
        would count toward the lockout again); any other refusal raises TakeTheLongWay,
        and the ordinary path, with its recovery, serves the request.
        """
        state = fast.pending.session
        if len(response) == raw.HEADER_SIZE and raw.response_code(response) in raw.RESEND_CODES:
            state.usable = True  # the TPM did not start the command
            raise TakeTheLongWay("the TPM asked for the command again")
        try:
            _, parameters = raw.finish(fast.pending, response)
        except raw.ResponseAuthError as exc:
            self._discard_session(fast.session)
            raise to_error(exc, "signing") from None
        except TSS2_Exception as exc:
            if int(exc.rc) & int(TSS2_RC.RC_LAYER_MASK) == 0:
                state.usable = True  # the TPM refused; its nonce did not move
            if classify(exc) in (Kind.AUTH, Kind.LOCKOUT):
                raise to_error(exc, "signing") from None
            raise TakeTheLongWay(str(exc)) from exc
        state.usable = True
        self._keys.touch(fast.entry.info.key_id)
        info = fast.entry.info
        return raw.signature_bytes(
            parameters, (info.bits + 7) // 8 if info.key_type is KeyType.RSA else 0)

    @staticmethod
    def cancel_fast_sign(fast: FastSign) -> None:
        """A prepared command that was never sent: its session is as it was."""
        fast.pending.session.usable = True

    @staticmethod
    def split_response(data: bytes | bytearray) -> bytes | None:
        """The TPM's answer once `data` holds all of it (lane_socket's framing)."""
        return transport.split_response(data)

    def abort_fast_sign(self, fast: FastSign | None) -> None:
        """The command's fate is unknown (link broke, no answer): drop the link so the
        next command reconnects; the session stays unusable and is replaced."""
        if isinstance(self._link, transport.SwtpmSocket):
            self._link.drop()

    def generate_key(self, key_type: KeyType, param: int, auth: bytes, parent: int,
                     deadline: float) -> tuple[bytes, bytes]:
        try:
            key_type = KeyType(key_type)
        except ValueError:
            raise UnsupportedError(f"unsupported key type {key_type}") from None
        template = keymod.generation_template(key_type, param)
        parent = parent or STORAGE_PRIMARY
        if not (parent == STORAGE_PRIMARY or keymod.is_persistent(parent)):
            raise UnsupportedError(f"parent 0x{parent:08x} is neither the storage primary "
                                   "(0x40000001) nor a persistent handle")
        if len(auth) > MAX_AUTH:
            raise UnsupportedError(f"passwords are at most {MAX_AUTH} bytes")
        sensitive = TPM2B_SENSITIVE_CREATE()
        if auth:
            sensitive.sensitive.userAuth = auth

        def create() -> tuple[Any, Any]:
            parent_handle = self._parent(parent, rsa_parent=False)
            # The pool session encrypts the new key's password on its way to the TPM.
            in_public = TPM2B_PUBLIC(publicArea=template)
            if self.fast_path:
                handle, name = self._tpm_handle(parent_handle)
                _, state = self._raw_session(deadline)
                return self._with_object_room(None, lambda: raw.create(
                    self._raw_link(), state, handle, name, b"", sensitive, in_public),
                    parent_handle)
            session = self._session(deadline)
            private, public, _, _, _ = self._with_object_room(
                None, lambda: self._ectx.create(parent_handle, sensitive, in_public,
                                                session1=session), parent_handle)
            return private, public

        private, public = self._run(deadline, "creating the key", create)
        key = keymod.tss2_key_der(private, public, empty_auth=not auth, parent=parent)
        return key, bytes(public.publicArea.to_der())

    # --- random bytes (RANDOM) ------------------------------------------------------------

    def random(self, count: int, deadline: float) -> bytes:
        """`count` bytes from the TPM's random number generator.

        Each TPM2_GetRandom goes through a pool session with ENCRYPT, so the bytes cross
        the TPM link encrypted; the TPM gives at most one digest's worth per command
        (TPM2_PT_MAX_DIGEST), so larger counts take several.
        """
        if not 0 <= count <= MAX_RANDOM:
            raise UnsupportedError(f"at most {MAX_RANDOM} random bytes per request, "
                                   f"not {count}")
        out = bytearray()
        while len(out) < count:
            chunk = self._run(deadline, "reading random bytes",
                              functools.partial(self._random_once, count - len(out),
                                                deadline))
            if not chunk:
                raise TpmError("the TPM returned no random bytes")
            out += chunk
        return bytes(out)

    def _random_once(self, count: int, deadline: float) -> bytes:
        if not self.fast_path:
            session = self._session(deadline)
            self._check_deadline(deadline)
            return bytes(self._ectx.get_random(count, session1=session))[:count]
        session, state = self._raw_session(deadline)
        self._check_deadline(deadline)
        try:
            return raw.get_random(self._raw_link(), state, count)
        except raw.ResponseAuthError:
            self._discard_session(session)  # not to be trusted with another HMAC
            raise

    def status(self) -> dict[str, object]:
        return {
            "pool_size": self._pool.size,
            "pool_sessions": self._pool.count,
            "tpm_active_sessions": self._property(TPM2_PT_HR.ACTIVE),
            "tpm_active_sessions_max": self._active_sessions_max or None,
            "loaded_keys": len(self._keys),
            "resident_keys": sum(1 for _ in self._keys.resident()),
            "tpm_restarts_recovered": self._restarts_recovered,
            # Dictionary-attack failures the TPM counts now (wrong passwords, mostly).
            "tpm_lockout_counter": self._property(TPM2_PT.LOCKOUT_COUNTER),
            "tcti": self.tcti,
            # "python" means the C extension was not built: about ten times the CPU.
            "session_code": "c" if raw.c_implementation() else "python",
        }

    # --- one request, with recovery -----------------------------------------------------

    def _run(self, deadline: float, doing: str, operation: Callable[[], T]) -> T:
        """Run `operation`; if the TPM lost our state, rebuild it and run it once more."""
        self._check_deadline(deadline)
        if self._ectx is None:
            if not self._opened:
                raise TpmUnavailableError("the TPM worker is not open")
            self._recover(deadline)
        try:
            return operation()
        except TSS2_Exception as exc:
            if classify(exc) not in _RECOVERABLE:
                raise to_error(exc, doing) from exc
        self._recover(deadline)
        self._check_deadline(deadline)
        try:
            return operation()
        except TSS2_Exception as exc:
            raise to_error(exc, doing) from exc

    def _recover(self, deadline: float) -> None:
        """Rebuild context, primary, sessions and key handles from scratch.

        Before the old context goes, note the TPM handles we held: if the TPM did not
        restart (same resetCount and restartCount) they may still occupy slots, and on a
        TPM without a resource manager nobody else would free them.
        """
        stale: list[int] = []
        if self._ectx is not None:
            stale = self._held_tpm_handles()
            self._pool.forget()
            self._drop_context()
        try:
            self._build(deadline, stale)
        except TSS2_Exception as exc:
            self._drop_context()
            raise to_error(exc, "recovering the TPM state") from exc
        except TpmBrokerError:
            self._drop_context()
            raise
        self._restarts_recovered += 1

    def _build(self, deadline: float, stale_handles: list[int]) -> None:
        self._ectx = self._connect(deadline)
        counts = self._clock_counts()
        # Sessions and objects survive unless the TPM went through Reset or Restart.
        # TPM2_Clear zeroes both counters but leaves sessions alone.
        if counts == self._counts or counts == (0, 0):
            for handle in stale_handles:
                self._flush_tpm_handle(handle)
        self._counts = counts
        if self._rsa_only is None:
            # TSSPrivKey's rule for parent 0x40000001: ECC P-256 unless the TPM lacks ECC.
            self._rsa_only = TSSPrivKey._getparenttemplate(self._ectx) is _parent_rsa_template
        self._active_sessions_max = self._property(TPM2_PT.ACTIVE_SESSIONS_MAX) or 0
        self._pool.fill(self._ectx, lambda: self._storage_primary(rsa=bool(self._rsa_only)))

    def _connect(self, deadline: float) -> Any:
        delay = CONNECT_BACKOFF_FIRST
        while True:
            try:
                if not self.fast_path:
                    return ESAPI(self.tcti)
                return self._connect_link()
            except (TSS2_Exception, RuntimeError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TpmUnavailableError(
                        f"cannot reach the TPM through {self.tcti!r}: {exc}") from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)

    def _connect_link(self) -> Any:
        """One link for ESAPI and raw commands alike (swtpm serves one connection at a
        time; a resource manager keeps sessions per connection)."""
        link, tcti = transport.open_transport(self.tcti)
        try:
            link.open()
            ectx = ESAPI(tcti)
        except BaseException:
            transport.close_tcti(tcti)
            raise
        self._link, self._link_tcti = link, tcti
        return ectx

    def _clock_counts(self) -> tuple[int, int]:
        try:
            info = self._ectx.read_clock()
        except TSS2_Exception as exc:
            if classify(exc) is not Kind.NEEDS_STARTUP:
                raise
            # Powered up without TPM2_Startup (no resource manager did it for us).
            self._ectx.startup(TPM2_SU.CLEAR)
            info = self._ectx.read_clock()
        return int(info.clockInfo.resetCount), int(info.clockInfo.restartCount)

    def _held_tpm_handles(self) -> list[int]:
        ectx = self._ectx
        trs = [*self._primaries.values(), *(k.handle for k in self._keys.resident()
                                            if k.is_transient)]
        handles = self._pool.tpm_handles(ectx)
        for tr in trs:
            try:
                handles.append(int(ectx.tr_get_tpm_handle(tr)))
            except TSS2_Exception:
                continue
        return handles

    def _flush_tpm_handle(self, handle: int) -> None:
        try:
            tr = self._ectx.tr_from_tpmpublic(handle)
            self._ectx.flush_context(tr)
        except TSS2_Exception:
            pass  # already gone (or never ours under a resource manager)

    def _drop_context(self) -> None:
        """Forget everything tied to the ESAPI context, and finalize it."""
        ectx, self._ectx = self._ectx, None
        self._pool.forget()
        self._keys.forget_handles()
        self._primaries.clear()
        self._primary_publics.clear()
        self._persistent.clear()
        self._raw_sessions.clear()
        self._tpm_handles.clear()
        if ectx is not None:
            with contextlib.suppress(TSS2_Exception):
                ectx.close()
        tcti, self._link, self._link_tcti = self._link_tcti, None, None
        if tcti is not None:
            transport.close_tcti(tcti)

    # --- objects ------------------------------------------------------------------------

    def _storage_primary(self, rsa: bool) -> Any:
        """The storage primary for parent 0x40000001, created once per TPM life."""
        primary = self._primaries.get(rsa)
        if primary is None:
            template = _parent_rsa_template if rsa else _parent_ecc_template
            primary, public, *_ = self._with_object_room(None, lambda: self._ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template),
                ESYS_TR.RH_OWNER))
            self._primaries[rsa] = primary
            self._primary_publics[rsa] = public.publicArea
        return primary

    def _parent(self, parent: int, rsa_parent: bool) -> Any:
        if parent == STORAGE_PRIMARY:
            return self._storage_primary(rsa=rsa_parent or bool(self._rsa_only))
        return self._persistent_handle(parent, "parent")

    def _persistent_handle(self, handle: int, role: str) -> Any:
        tr = self._persistent.get(handle)
        if tr is None:
            try:
                # Reading a persistent object's public area needs a free slot too.
                tr = self._with_object_room(None,
                                            lambda: self._ectx.tr_from_tpmpublic(handle))
            except TSS2_Exception as exc:
                if tpm_code(int(exc.rc)) in (0x08B, 0x084):  # TPM_RC_HANDLE, TPM_RC_VALUE
                    raise BadKeyError(f"no persistent {role} at 0x{handle:08x}",
                                      tpm_rc=int(exc.rc)) from None
                raise
            self._persistent[handle] = tr
        return tr

    def _describe_persistent(self, key_id: bytes, key: bytes) -> CachedKey:
        if len(key) != 4:
            raise BadKeyError(f"a persistent handle is 4 bytes, not {len(key)}")
        handle = int.from_bytes(key, "big")
        if not keymod.is_persistent(handle):
            raise BadKeyError(f"0x{handle:08x} is not a persistent handle (0x81xxxxxx)")
        tr = self._persistent_handle(handle, "key")
        public, _, _ = self._ectx.read_public(tr)
        keymod.check_signing_key(public.publicArea)
        return CachedKey(keymod.key_info(key_id, public.publicArea), public.publicArea,
                         persistent_handle=handle)

    def _resident(self, entry: CachedKey, deadline: float) -> Any:
        """The key's handle in the TPM, loading it (evicting others if needed)."""
        if entry.handle is not None:
            return entry.handle
        if entry.blob is None:
            entry.handle = self._persistent_handle(entry.persistent_handle, "key")
            return entry.handle
        blob = entry.blob
        parent = self._parent(blob.parent, blob.rsa_parent)
        self._check_deadline(deadline)
        try:
            # Password auth is enough: the parent's auth is empty and the private blob is
            # already encrypted to the parent.
            entry.handle = self._with_object_room(
                entry, lambda: self._ectx.load(parent, blob.private, blob.public), parent)
        except TSS2_Exception as exc:
            if classify(exc) in (*_RECOVERABLE, Kind.OBJECT_MEMORY):
                raise
            raise BadKeyError("the TPM refused to load the key (made by another TPM, or "
                              f"the TPM was cleared?): {exc}", tpm_rc=int(exc.rc)) from None
        return entry.handle

    def _with_object_room(self, keep: CachedKey | None, command: Callable[[], T],
                          parent: Any = None) -> T:
        """Run `command`; while the TPM is out of object slots, unload the LRU key, then
        storage primaries the command does not use (`parent` stays)."""
        while True:
            try:
                return command()
            except TSS2_Exception as exc:
                if (classify(exc) is not Kind.OBJECT_MEMORY
                        or not self._evict_one(keep, parent)):
                    raise

    def _evict_one(self, keep: CachedKey | None, parent: Any = None) -> bool:
        for key in self._keys.resident():
            if key is not keep and key.is_transient:
                self._unload(key)
                return True
        # Then a primary: loading under a persistent parent, for one, needs two free
        # slots (the TPM brings the parent in too), and swtpm has three. A primary comes
        # back from its template when needed; full session pools do not need it.
        for rsa, primary in list(self._primaries.items()):
            if primary != parent:
                del self._primaries[rsa]
                self._tpm_handles.pop(int(primary), None)
                with contextlib.suppress(TSS2_Exception):
                    self._ectx.flush_context(primary)
                return True
        return False

    def _unload(self, key: CachedKey) -> None:
        handle, key.handle = key.handle, None
        if handle is None or not key.is_transient:
            return  # persistent keys stay in the TPM; their ESYS_TR is shared
        self._tpm_handles.pop(int(handle), None)
        with contextlib.suppress(TSS2_Exception):
            self._ectx.flush_context(handle)

    # --- signing ------------------------------------------------------------------------

    def _session(self, deadline: float) -> Any:
        return self._pool.acquire(
            self._ectx, lambda: self._storage_primary(bool(self._rsa_only)), deadline)

    def _sign_once(self, entry: CachedKey, auth: bytes, in_scheme: Any, digest: bytes,
                   deadline: float) -> bytes:
        handle = self._resident(entry, deadline)
        session = self._session(deadline)
        self._check_deadline(deadline)
        self._ectx.tr_set_auth(handle, auth)
        signature = self._with_object_room(entry, lambda: self._ectx.sign(
            handle, TPM2B_DIGEST(digest), in_scheme, session1=session))
        # TPMT_SIGNATURE's bytes(): DER Ecdsa-Sig-Value for ECDSA, the raw RSA signature.
        return bytes(signature)

    # --- the fast path ------------------------------------------------------------------

    def _raw_link(self) -> transport.Transport:
        if self._link is None:
            raise TSS2_Exception(int(TSS2_RC.TCTI_RC_NO_CONNECTION))
        return self._link

    def _start_raw_session(self, ectx: Any, salt_key: Any) -> Any:
        """A pool session started with a raw command; ESAPI gets a handle for it (to
        name and flush it) but never computes its HMACs."""
        salt_handle, _ = self._tpm_handle(salt_key)
        rsa = next(r for r, primary in self._primaries.items() if primary == salt_key)
        state = raw.start_salted_session(self._raw_link(), salt_handle,
                                         self._primary_publics[rsa])
        try:
            session = ectx.tr_from_tpmpublic(state.handle)
        except TSS2_Exception:
            with contextlib.suppress(TSS2_Exception):
                raw.flush_context(self._raw_link(), state.handle)
            raise
        self._raw_sessions[int(session)] = state
        return session

    def _raw_session(self, deadline: float) -> tuple[Any, SessionState]:
        """The next pool session (ESYS_TR) and its state."""
        while True:
            session = self._session(deadline)
            state = self._raw_sessions.get(int(session))
            if state is not None and state.usable:
                return session, state
            # Its last command's outcome is unknown (see raw.execute): an HMAC from it
            # could fail and count toward the lockout. Replace it.
            self._discard_session(session)

    def _discard_session(self, session: Any) -> None:
        self._pool.discard(self._ectx, session)
        self._raw_sessions.pop(int(session), None)

    def _tpm_handle(self, tr: Any) -> tuple[int, bytes]:
        """TPM handle and Name of an object ESAPI knows (cached: ESAPI calls cost)."""
        known = self._tpm_handles.get(int(tr))
        if known is None:
            name = self._ectx.tr_get_name(tr)
            known = (int(self._ectx.tr_get_tpm_handle(tr)), bytes(name.name))
            self._tpm_handles[int(tr)] = known
        return known

    def _sign_fast(self, entry: CachedKey, auth: bytes, scheme_alg: int, hash_alg: int,
                   digest: bytes, deadline: float) -> bytes:
        handle = self._resident(entry, deadline)
        session, state = self._raw_session(deadline)
        self._check_deadline(deadline)
        key_handle, key_name = self._tpm_handle(handle)
        try:
            return raw.sign(self._raw_link(), state, key_handle, key_name, auth, digest,
                            scheme_alg, hash_alg)
        except raw.ResponseAuthError:
            self._discard_session(session)  # not to be trusted with another HMAC
            raise

    # --- helpers ------------------------------------------------------------------------

    def _property(self, prop: int) -> int | None:
        if self._ectx is None:
            return None
        try:
            _, data = self._ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
        except TSS2_Exception:
            return None
        for entry in data.data.tpmProperties:
            if entry.property == prop:
                return int(entry.value)
        return None

    @staticmethod
    def _check_deadline(deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineError("the request's deadline passed before the TPM could serve it")

