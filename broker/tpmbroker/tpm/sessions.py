"""The session pool: a few salted HMAC sessions that every command of every client shares.

Sessions are the scarce resource (about 64 active per TPM, whoever holds them), so the
pool starts at most `size` of them and keeps them for the broker's lifetime
(continueSession). When other users hold every free slot, the pool serves with the
sessions it has and tries again now and then; with none, a request waits with backoff
until its deadline.

The pool holds each session's state (session_crypto.SessionState: handle, key, last
nonceTPM); the broker computes their HMACs and parameter encryption itself
(tpm/command.py). `start` and `flush` are the link's commands, given by the worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..errors import NoSessionsError
from .rc import Kind, classify
from .session_crypto import SessionState

# With some sessions in hand, look for the missing ones at most this often: a failing
# StartAuthSession still costs the TPM time.
TOP_UP_INTERVAL = 1.0
BACKOFF_FIRST = 0.005
BACKOFF_MAX = 0.25


class SessionPool:
    """Up to `size` salted HMAC sessions, handed out round robin."""

    def __init__(self, size: int, start: Callable[[], SessionState],
                 flush: Callable[[int], None], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 1 <= size <= 3:
            raise ValueError(f"session pool size must be 1 to 3, not {size}")
        self.size = size
        self._sessions: list[SessionState] = []
        self._next = 0
        self._last_shortage = -float("inf")
        self._start = start  # TPM2_StartAuthSession, salted (raises TSS2_Exception)
        self._flush = flush  # TPM2_FlushContext of a session handle
        self._clock = clock
        self._sleep = sleep

    @property
    def count(self) -> int:
        return len(self._sessions)

    @property
    def sessions(self) -> tuple[SessionState, ...]:
        return tuple(self._sessions)

    @property
    def full(self) -> bool:
        return len(self._sessions) == self.size

    def fill(self) -> None:
        """Start sessions until the pool is full or the TPM has no slot left. Other TPM
        errors propagate (TSS2_Exception) for the caller to classify."""
        while len(self._sessions) < self.size:
            try:
                session = self._start()
            except TSS2_Exception as exc:
                if classify(exc) is not Kind.SESSION_SLOTS:
                    raise
                self._last_shortage = self._clock()
                return
            self._sessions.append(session)

    def acquire(self, deadline: float) -> SessionState:
        """The next usable session, waiting for a free slot until `deadline`.

        A session whose last command has an unknown outcome is replaced first: an HMAC
        from it could fail and count toward the TPM's dictionary-attack lockout.
        """
        while True:
            if len(self._sessions) < self.size and (
                    not self._sessions
                    or self._clock() - self._last_shortage >= TOP_UP_INTERVAL):
                self.fill()
            delay = BACKOFF_FIRST
            while not self._sessions:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise NoSessionsError(
                        "the TPM has no free session slots: other TPM users hold all of "
                        "them (TPM_RC_SESSION_HANDLES); gave up at the request's deadline")
                self._sleep(min(delay, remaining))
                delay = min(delay * 2, BACKOFF_MAX)
                self.fill()
            session = self.next_session()
            if session.usable:
                return session
            self.discard(session)

    def next_session(self) -> SessionState:
        """The next session in turn (the pool must not be empty); starts none."""
        session = self._sessions[self._next % len(self._sessions)]
        self._next = (self._next + 1) % len(self._sessions)
        return session

    def tpm_handles(self) -> list[int]:
        return [session.handle for session in self._sessions]

    def flush(self) -> None:
        """Give the slots back to the TPM; errors are ignored (the TPM may be gone)."""
        for session in self._sessions:
            try:
                self._flush(session.handle)
            except TSS2_Exception:
                continue
        self.forget()

    def discard(self, session: SessionState) -> None:
        """Flush one session whose state we no longer trust and drop it from the pool.

        FlushContext needs no authorization, so this cannot cost a DA failure."""
        if session in self._sessions:
            self._sessions.remove(session)
            self._next = 0
        with contextlib.suppress(TSS2_Exception):
            self._flush(session.handle)

    def forget(self) -> None:
        """Drop the sessions without a TPM command (the link they lived on is gone)."""
        self._sessions.clear()
        self._next = 0
        self._last_shortage = -float("inf")
