"""The TPM worker: the one place that talks to the TPM, and the core every operation's
procedure (tpmbroker.procedures) is written against. It composes the layers: link.py
(the connection, recovery, a clean start), sessions.py (pools of salted HMAC and policy
sessions), objects.py (primaries, keys, persistent handles, resident or evicted) and
command.py (authorized commands; policy_session.py for keys with a policy).

A procedure uses `run` (TPM work, with recovery), `execute` (a command on a pool
session), `authorized` (a command on a key, resident, with its password or its policy
session), `with_password` (the dictionary-attack shield), `loaded` and the lane. Adding
an operation adds nothing here.

The worker thread of tpmbroker.server calls every method, except the lane_* methods,
which the event loop calls while that thread is idle (tpmbroker.lane). When the TPM
restarts or the link breaks, the next request rebuilds the link, the pool and the
primaries and is retried once; no command is sent with a session that may be stale, so
recovery never costs dictionary-attack failures.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tpm2_pytss.constants import TPM2_ALG, TPM2_PT, TPM2_PT_HR, TSS2_RC
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..audit import audit
from ..ek_trust import Identity, TrustConfig
from ..errors import (
    AuthFailedError,
    DeadlineError,
    LockoutError,
    NotForLane,
    TpmBrokerError,
    TpmUnavailableError,
    UnknownKeyError,
)
from . import command, endorsement, policy_session
from .keys import CachedKey
from .link import Link, frame_command
from .lockout import DEFAULT_RESERVE, DaParameters, Shield
from .objects import RECOVERABLE, Objects
from .parents import ParentPasswords
from .rc import Kind, classify, to_error
from .session_crypto import SessionState
from .sessions import SessionPool

T = TypeVar("T")
log = logging.getLogger("tpmbroker.tpm")

PSS_PADDINGS = ("auto", "tpm", "broker")
Prepare = Callable[[SessionState, int, bytes], command.PendingCommand]


@dataclasses.dataclass
class LaneCommand:
    """A command on a key prepared for the event loop, which sends it and reads the
    answer (tpmbroker.lane); `result` turns the answer's parameters into the reply."""

    frame: bytes  # the command, framed for the link (swtpm's command port)
    pending: command.PendingCommand
    entry: CachedKey
    result: Callable[[bytes], Any]
    doing: str
    peer: int = -1  # uid of the client, for the dictionary-attack shield
    auth: bytes = b""


class TpmWorker:
    def __init__(self, tcti: str, sessions: int = 2, pss_padding: str = "auto",
                 da_reserve: int | None = DEFAULT_RESERVE, policy_sessions: int = 1,
                 trust: TrustConfig | None = None, unverified_reason: str = "") -> None:
        if not 1 <= sessions <= 3:
            raise ValueError(f"sessions must be 1 to 3, not {sessions}")
        if pss_padding not in PSS_PADDINGS:
            raise ValueError(f"pss_padding must be one of {', '.join(PSS_PADDINGS)}")
        self.tcti = tcti
        # RSA-PSS: "tpm" takes the TPM's salt, "broker" always pads in the broker, "auto"
        # checks the TPM's first PSS signature per key and pads in the broker from then
        # on if its salt is not the digest length (see procedures/sign.py, tpm/pss.py).
        self.pss_padding = pss_padding
        self.link = Link(tcti)
        self.objects = Objects(self.link)
        self.pool = SessionPool(sessions, start=self._start_session, flush=self._flush)
        # Keys with a policy (keypolicy.py) are used through salted policy sessions of
        # their own, started on first use: the two pools together bound the TPM sessions.
        self.policy_pool = SessionPool(policy_sessions, start=self._start_policy_session,
                                       flush=self._flush)
        # What procedures learn of this TPM once (its curves, its input buffer, ...).
        self.facts: dict[str, Any] = {}
        # What procedures count, shown by STATUS.
        self.counters: collections.Counter[str] = collections.Counter()
        self._rsa_only: bool | None = None
        self._counts: tuple[int, int] | None = None  # (resetCount, restartCount)
        self._active_sessions_max = 0
        self.recoveries = 0
        self._opened = False
        # Password attempts on DA-protected keys go through the shield (tpm/lockout.py);
        # None turns it off (tests of the TPM's own lockout).
        self.shield = Shield(da_reserve) if da_reserve is not None else None
        # Parent passwords the TPM refused or accepted (tpm/parents.py); loads under a
        # parent with a password go through a pool session (_authorized_load).
        self.parents = ParentPasswords()
        self.objects.authorized_load = self._authorized_load
        self._op_deadline = 0.0  # the deadline of the request `run` serves
        # Whom to trust as this TPM (ek_trust.py): checked once, at the first connection;
        # once verified, sessions are salted to the verified EK (objects.endorsement).
        self.trust = trust or TrustConfig()
        self.unverified_reason = unverified_reason
        self.identity: Identity | None = None

    # --- life -----------------------------------------------------------------------------

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

    # --- keys -----------------------------------------------------------------------------

    def loaded(self, key_id: bytes) -> CachedKey:
        """The key LOAD made known by this id; UnknownKeyError if none."""
        entry = self.objects.keys.get(key_id)
        if entry is None:
            raise UnknownKeyError("unknown key id; send LOAD first")
        return entry

    def known(self, key_id: bytes) -> CachedKey | None:
        """On the event loop, no TPM: the key LOAD made known by this id, if the worker
        knows it now (its attributes tell a procedure's check what the key can do)."""
        return self.objects.keys.get(key_id)

    def with_password(self, entry: CachedKey, auth: bytes, peer: int, deadline: float,
                      operation: Callable[[], T]) -> T:
        """`operation()` with the key's password: through the dictionary-attack shield
        when the key counts failures (sign, sign the message, derive, decrypt)."""
        limit = entry.max_auth
        if len(auth) > limit:
            # The key cannot have such a password; asking the TPM would only count a failure.
            raise AuthFailedError(f"password longer than {limit} bytes, the most this key "
                                  "can have (its name hash's digest)")
        shield = self.shield if entry.da_protected else None
        if shield is None:
            return operation()
        shield_id = entry.shield_id
        if not shield.known_good(shield_id, auth):
            # A fresh reading first: the counter decays, and other TPM users add to it.
            self.run(deadline, "reading the lockout counter", self.read_lockout)
            shield.check(peer, shield_id, auth)
        try:
            result = operation()
        except AuthFailedError:
            shield.failed(peer, shield_id, auth)
            raise
        except LockoutError:
            shield.tpm_locked_out()
            raise
        shield.succeeded(shield_id, auth)
        return result

    def check_password(self, key_id: bytes, auth: bytes, peer: int) -> CachedKey | None:
        """The shield's refusals that need no TPM, for the event loop before it queues a
        request: a password refused before, a throttled peer, the reserve reached.

        Returns the key if its password needs the shield no more (it has succeeded with
        the key before, or the key counts no failures): give it to lane_command, which
        then does not ask the shield again."""
        entry = self.objects.keys.get(key_id)
        if entry is None:
            return None
        if self.shield is None or not entry.da_protected:
            return entry
        return entry if self.shield.check(peer, entry.shield_id, auth, fresh=False) else None

    def _authorized_load(self, parent: Any, blob: Any, parent_auth: bytes) -> Any:
        """TPM2_Load under `parent` authorized by a pool session's HMAC with the parent's
        password: the password never crosses the link (ESAPI would send it in a password
        session, in the clear). The ESYS_TR of the loaded key."""
        handle, name = self.objects.handle_and_name(parent)
        tpm_handle = self.execute_handle(self._op_deadline, lambda session: (
            command.prepare_load(session, handle, name, parent_auth, blob.private,
                                 blob.public)))
        try:
            return self.link.ectx.tr_from_tpmpublic(tpm_handle)
        except TSS2_Exception:
            command.flush_context(self.link.require(), tpm_handle)
            raise

    # --- the authorized-command path ----------------------------------------------------

    def authorized(self, entry: CachedKey, auth: bytes, deadline: float, prepare: Prepare,
                   result: Callable[[bytes], T]) -> T:
        """One command on `entry`'s key (made resident) with a pool session; a key with a
        policy gets a policy session that has just satisfied it."""
        if entry.persistent_handle and not self.link.owns_tpm:
            self.objects.check_persistent(entry)
        self.objects.resident(entry)

        def on_key(session: SessionState) -> command.PendingCommand:
            # Named once the session is taken: starting one may have needed the key's slot.
            return prepare(session, *self.objects.handle_and_name(self.objects.resident(entry)))

        if entry.policy:
            return policy_session.execute(self, entry, auth, deadline, on_key, result)
        return self.execute(deadline, on_key, result)

    def execute(self, deadline: float,
                prepare: Callable[[SessionState], command.PendingCommand],
                result: Callable[[bytes], T]) -> T:
        """Take a pool session, prepare the command with it, send it, check the answer."""
        return result(self._send(deadline, prepare)[1])

    def execute_handle(self, deadline: float,
                       prepare: Callable[[SessionState], command.PendingCommand]) -> int:
        """execute for a command that answers with one handle (Load, CreatePrimary)."""
        handles, _ = self._send(deadline, prepare)
        if len(handles) != 1:
            raise command.malformed()
        return handles[0]

    def _send(self, deadline: float, prepare: Callable[[SessionState], command.PendingCommand]
              ) -> tuple[list[int], bytes]:
        session = self.pool.acquire(deadline)
        self.check_deadline(deadline)
        pending = prepare(session)
        try:
            return command.execute(self.link.require(), pending)
        except command.ResponseAuthError:
            self.forged_answer(self.pool, pending)
            raise

    def forged_answer(self, pool: SessionPool, pending: command.PendingCommand) -> None:
        """A response failed its HMAC check (altered on the TPM's bus, or not the TPM's):
        its answer is dropped (the caller raises), its session flushed and replaced (its
        nonces no longer agree with the TPM's; it may be an interposer's), audited."""
        pool.discard(pending.session)
        self.counters["tpm_forged_answers"] += 1
        audit("tpm_response_forged", command=command.command_name(pending.command_code),
              session=f"0x{pending.session.handle:08x}", tcti=self.tcti)

    # --- the lane: commands the event loop sends itself -----------------------------------
    # The common case (key resident, pool session ready, swtpm link) needs no TPM command
    # but the one asked for, so the event loop sends it and reads the answer without
    # handing the request to the worker thread and back (two thread switches, with the
    # GIL handed over each time, cost more CPU than the TPM's work). Anything else returns
    # None and goes to the worker thread, with recovery.

    def lane_socket(self) -> Any:
        return self.link.lane_socket()

    def lane_command(self, entry: CachedKey, auth: bytes, peer: int, doing: str,
                     prepare: Prepare, result: Callable[[bytes], Any],
                     password_known: CachedKey | None = None) -> LaneCommand | None:
        """The framed command on `entry`'s key for the lane, or None when the worker
        thread must serve it (the key not resident, no session ready, a password the
        shield must see, a policy, a handle another TPM user may have changed).

        Never talks to the TPM. The session stays unusable until lane_finish (or
        lane_abort) says how the command went. `password_known`: what check_password
        returned for this request (the very key object, or the shield is asked again).
        """
        if (entry.handle is None or not self.link.up or entry.policy or not self.pool.full
                or len(auth) > entry.max_auth):
            return None
        if (entry.da_protected and self.shield is not None and entry is not password_known
                and not self.shield.known_good(entry.shield_id, auth)):
            return None  # a password attempt: the worker thread asks the shield
        if entry.persistent_handle and not self.link.owns_tpm:
            return None  # another TPM user may have replaced it: the worker checks first
        known = self.objects.known_name(entry.handle)
        if not known:
            return None
        session = self.pool.next_session()
        if not session.usable:
            return None
        pending = prepare(session, known[0], known[1])
        session.usable = False  # until the answer says otherwise (as command.execute does)
        return LaneCommand(frame_command(pending.command), pending, entry, result, doing,
                           peer, auth)

    def lane_finish(self, lane: LaneCommand, response: bytes) -> Any:
        """The reply from the TPM's answer.

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
            self.forged_answer(self.pool, lane.pending)
            raise to_error(exc, lane.doing) from None
        except TSS2_Exception as exc:
            if int(exc.rc) & int(TSS2_RC.RC_LAYER_MASK) == 0:
                session.usable = True  # the TPM refused; its nonce did not move
            kind = classify(exc)
            if kind in (Kind.AUTH, Kind.LOCKOUT):
                if self.shield is not None and lane.entry.da_protected:
                    if kind is Kind.AUTH:
                        self.shield.failed(lane.peer, lane.entry.shield_id, lane.auth)
                    else:
                        self.shield.tpm_locked_out()
                raise to_error(exc, lane.doing) from None
            raise NotForLane(str(exc)) from exc
        session.usable = True
        self.objects.keys.touch(lane.entry.info.key_id)
        return lane.result(parameters)

    @staticmethod
    def lane_cancel(lane: LaneCommand) -> None:
        """A prepared command that was never sent: its session is as it was."""
        lane.pending.session.usable = True

    def lane_abort(self, lane: LaneCommand | None) -> None:
        """The command's fate is unknown (link broke, no answer): drop the connection so
        the next command reconnects; the session stays unusable and is replaced."""
        self.link.drop_connection()

    # --- one piece of TPM work, with recovery -----------------------------------------------

    def run(self, deadline: float, doing: str, operation: Callable[[], T]) -> T:
        """Run `operation`; if the TPM lost our state, rebuild it and run it once more."""
        self.check_deadline(deadline)
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
        self.check_deadline(deadline)
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
        self.recoveries += 1
        if self._counts != counts_before and self._counts is not None:
            audit("tpm_reset", reset_count=self._counts[0], restart_count=self._counts[1])
        audit("recovery", level=logging.INFO, recoveries=self.recoveries)

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
            self._rsa_only = not self.link.has_algorithm(TPM2_ALG.ECC)
        self.objects.rsa_only = self._rsa_only
        self._active_sessions_max = self.link.tpm_property(TPM2_PT.ACTIVE_SESSIONS_MAX) or 0
        self._lockout_counter()
        if self.identity is None:
            self.identity = endorsement.verify(self.objects, self.trust, self.unverified_reason)
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

    # --- what the TPM says of itself ---------------------------------------------------------

    def fact(self, name: str, learn: Callable[[], T]) -> T:
        """A fact of this TPM, learned once (`learn()`, which may talk to the TPM)."""
        if name not in self.facts:
            self.facts[name] = learn()
        value: T = self.facts[name]
        return value

    def _lockout_counter(self) -> int | None:
        try:
            return self.read_lockout()
        except TSS2_Exception:
            return None

    def read_lockout(self) -> int | None:
        """The TPM's lockout counter and dictionary-attack settings (one command), given
        to the shield; the counter, or None if the TPM cannot say."""
        if not self.link.up:
            return None
        values = self.link.tpm_properties(int(TPM2_PT.LOCKOUT_COUNTER), 4)  # and the settings
        counter = values.get(int(TPM2_PT.LOCKOUT_COUNTER))
        if counter is not None and self.shield is not None:
            self.shield.observe(counter, DaParameters.from_properties(values))
        return counter

    @staticmethod
    def check_deadline(deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineError("the request's deadline passed before the TPM could serve it")

    def status(self) -> dict[str, object]:
        """The worker's part of STATUS: pools, sessions, keys, lockout, recoveries."""
        return {
            "pool_size": self.pool.size,
            "pool_sessions": self.pool.count,
            "policy_pool_size": self.policy_pool.size,
            "policy_pool_sessions": self.policy_pool.count,
            "tpm_active_sessions": self.link.tpm_property(TPM2_PT_HR.ACTIVE),
            "tpm_active_sessions_max": self._active_sessions_max or None,
            "loaded_keys": len(self.objects.keys),
            "resident_keys": sum(1 for _ in self.objects.resident_keys()),
            "tpm_restarts_recovered": self.recoveries,
            # Dictionary-attack failures the TPM counts now (wrong passwords, mostly).
            "tpm_lockout_counter": self._lockout_counter(),
            "tcti": self.tcti,
            "tpm_turnaround": self.link.turnaround.status(),
            **(self.identity or Identity("not checked yet")).status(),
            "tpm_forged_answers": 0,  # responses that failed their HMAC check
            **self.counters,
            **(self.shield.status() if self.shield is not None else {}),
            **self.parents.status(),
        }
