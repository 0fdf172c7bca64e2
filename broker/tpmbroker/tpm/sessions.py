"""The session pool: a few salted HMAC sessions that every signature shares.

Sessions are the scarce resource (about 64 active per TPM, whoever holds them), so the
pool starts at most `size` of them and keeps them for the broker's lifetime
(continueSession). When other users hold every free slot, the pool serves with the
sessions it has and tries again now and then; with none, a request waits with backoff
until its deadline.

Sessions are ESYS_TRs either way. ESAPI starts them by default and then computes their
HMACs and parameter encryption itself (about 2.2 ms of client CPU per command); the
worker's fast path passes `start` to start them with raw commands instead, keeps their
keys and nonces itself (session_crypto) and uses the ESYS_TR only to name and flush them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMT_SYM_DEF, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE

from ..errors import NoSessionsError
from .rc import Kind, classify

# Parameter encryption both ways; the session survives each command.
SESSION_ATTRIBUTES = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT

# With some sessions in hand, look for the missing ones at most this often: a failing
# StartAuthSession still costs the TPM time.
TOP_UP_INTERVAL = 1.0
BACKOFF_FIRST = 0.005
BACKOFF_MAX = 0.25


def _aes128_cfb() -> Any:
    return TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))


def _start_esys_session(ectx: Any, salt_key: Any) -> Any:
    session = ectx.start_auth_session(
        tpm_key=salt_key, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
        symmetric=_aes128_cfb(), auth_hash=TPM2_ALG.SHA256)
    try:
        ectx.trsess_set_attributes(session, SESSION_ATTRIBUTES)
    except TSS2_Exception:
        ectx.flush_context(session)
        raise
    return session


class SessionPool:
    """Up to `size` salted HMAC sessions, handed out round robin."""

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 start: Callable[[Any, Any], Any] | None = None) -> None:
        if not 1 <= size <= 3:
            raise ValueError(f"session pool size must be 1 to 3, not {size}")
        self.size = size
        self._sessions: list[Any] = []  # ESYS_TR
        self._next = 0
        self._last_shortage = -float("inf")
        self._clock = clock
        self._sleep = sleep
        self._start = start or _start_esys_session

    @property
    def count(self) -> int:
        return len(self._sessions)

    @property
    def sessions(self) -> tuple[Any, ...]:
        return tuple(self._sessions)

    def fill(self, ectx: Any, salt_key: Callable[[], Any]) -> None:
        """Start sessions until the pool is full or the TPM has no slot left.

        `salt_key` gives the key to salt to; it is asked for only when a session is
        started, so a full pool needs no storage primary in the TPM. Other TPM errors
        propagate (TSS2_Exception) for the caller to classify.
        """
        while len(self._sessions) < self.size:
            try:
                session = self._start(ectx, salt_key())
            except TSS2_Exception as exc:
                if classify(exc) is not Kind.SESSION_SLOTS:
                    raise
                self._last_shortage = self._clock()
                return
            self._sessions.append(session)

    def acquire(self, ectx: Any, salt_key: Callable[[], Any], deadline: float) -> Any:
        """The next session to use (ESYS_TR), waiting for a free slot until `deadline`."""
        if len(self._sessions) < self.size and (
                not self._sessions or self._clock() - self._last_shortage >= TOP_UP_INTERVAL):
            self.fill(ectx, salt_key)
        delay = BACKOFF_FIRST
        while not self._sessions:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise NoSessionsError(
                    "the TPM has no free session slots: other TPM users hold all of them "
                    "(TPM_RC_SESSION_HANDLES); gave up at the request's deadline")
            self._sleep(min(delay, remaining))
            delay = min(delay * 2, BACKOFF_MAX)
            self.fill(ectx, salt_key)
        return self.next_session()

    def next_session(self) -> Any:
        """The next session in turn (the pool must not be empty); starts none."""
        session = self._sessions[self._next % len(self._sessions)]
        self._next = (self._next + 1) % len(self._sessions)
        return session

    def tpm_handles(self, ectx: Any) -> list[int]:
        """The TPM's handles for our sessions (local metadata, no TPM command)."""
        handles = []
        for session in self._sessions:
            try:
                handles.append(int(ectx.tr_get_tpm_handle(session)))
            except TSS2_Exception:
                continue
        return handles

    def flush(self, ectx: Any) -> None:
        """Give the slots back to the TPM; errors are ignored (the TPM may be gone)."""
        for session in self._sessions:
            try:
                ectx.flush_context(session)
            except TSS2_Exception:
                continue
        self.forget()

    def discard(self, ectx: Any, session: Any) -> None:
        """Flush one session whose state we no longer trust and drop it from the pool.

        FlushContext needs no authorization, so this cannot cost a DA failure."""
        if session in self._sessions:
            self._sessions.remove(session)
            self._next = 0
        with contextlib.suppress(TSS2_Exception):
            ectx.flush_context(session)

    def forget(self) -> None:
        """Drop the sessions without a TPM command (their ESAPI context is gone)."""
        self._sessions.clear()
        self._next = 0
        self._last_shortage = -float("inf")
