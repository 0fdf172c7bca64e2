"""The dictionary-attack shield: traffic through the broker never locks the TPM out.

A TPM counts every failed authorization of a DA-protected object (one without
TPMA_OBJECT_NODA) in its lockout counter (TPM2_PT_LOCKOUT_COUNTER), forgets one count
per recovery interval (TPM2_PT_LOCKOUT_INTERVAL), and refuses every DA-protected object
once the counter reaches maxTries (TPM2_PT_MAX_AUTH_FAIL): swtpm's defaults are 3 and
1000 s, so three wrong passwords would lock every password-protected key for an hour.
A TPM that stops without TPM2_Shutdown after a DA-protected object was used adds one
count more when it starts again.

The shield stands between a password and the TPM. A password that has signed with a key
once is known good for it (a key id names one private blob, so its password cannot
change) and passes freely, as do keys with noDA. Any other password attempt on a
DA-protected key may cost a count, so:

- a password the TPM refused for a key is not sent again for that key from that peer
  (uid): AUTH_FAILED at once, until the peer presents a different one;
- after its second refused password in a row a peer waits before its next attempt,
  `base_delay`, doubling with each further one up to the recovery interval (LOCKOUT,
  "throttled"); a single typo costs no wait;
- the attempt is let through only if the counter, after it failed, would still leave
  `reserve` counts (for unexpected TPM restarts) below maxTries: otherwise LOCKOUT
  ("reserve"), until the TPM's counter decays.

The arithmetic: admitted iff counter + 1 + reserve <= maxTries - 1. With swtpm's
maxTries 3 and the default reserve 1 that is one wrong password per recovery interval;
the counter then never passes 1, and even a crash of the TPM right after leaves it at 2,
below 3.

This module does no TPM I/O: the worker feeds it the TPM's readings (observe) and the
outcome of each attempt (succeeded, failed, tpm_locked_out). Passwords are kept only as
keyed hashes, with a key that lives and dies with the process.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable

from tpm2_pytss.constants import TPM2_PT

from ..audit import audit
from ..errors import AuthFailedError, LockoutError

log = logging.getLogger("tpmbroker.lockout")

DEFAULT_RESERVE = 1
BASE_DELAY = 1.0  # seconds a peer waits after its second refused password in a row
MAX_DELAY = 600.0  # ... at most, when the TPM does not say its recovery interval
REREAD = 1.0  # seconds after which a refusal by the counter waits for a fresh reading
MAX_ENTRIES = 8192  # passwords remembered (known good, refused), least recently used out
REFUSALS = ("repeated_password", "throttled", "reserve", "lockout")


@dataclasses.dataclass(frozen=True)
class DaParameters:
    """The TPM's dictionary-attack settings."""

    max_tries: int  # TPM2_PT_MAX_AUTH_FAIL: the counter at which the TPM locks out
    recovery_time: int  # TPM2_PT_LOCKOUT_INTERVAL: seconds per count forgotten; 0 = no DA
    lockout_recovery: int  # TPM2_PT_LOCKOUT_RECOVERY: after a failed lockoutAuth

    @classmethod
    def from_properties(cls, values: dict[int, int]) -> DaParameters | None:
        """From TPM2_GetCapability's TPM properties; None if one is missing."""
        try:
            return cls(values[int(TPM2_PT.MAX_AUTH_FAIL)], values[int(TPM2_PT.LOCKOUT_INTERVAL)],
                       values[int(TPM2_PT.LOCKOUT_RECOVERY)])
        except KeyError:
            return None


@dataclasses.dataclass
class _Peer:
    failures: int = 0
    last_failure: float = 0.0
    next_attempt: float = 0.0


class Shield:
    def __init__(self, reserve: int = DEFAULT_RESERVE, base_delay: float = BASE_DELAY,
                 clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES) -> None:
        if reserve < 0:
            raise ValueError(f"the lockout reserve cannot be negative ({reserve})")
        self.reserve = reserve
        self.base_delay = base_delay
        self.clock = clock
        self.max_entries = max_entries
        self.params: DaParameters | None = None
        self.counter: int | None = None  # the TPM's lockout counter when last read
        self._read_at = 0.0
        self._secret = os.urandom(32)
        self._good: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._refused: collections.OrderedDict[tuple[int, bytes], bytes] = (
            collections.OrderedDict())
        self._peers: collections.OrderedDict[int, _Peer] = collections.OrderedDict()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.failures_seen = 0
        self._in_reserve = False
        self._lock = threading.Lock()  # the event loop checks, the worker thread records

    # --- what the TPM says ----------------------------------------------------------------

    def observe(self, counter: int, params: DaParameters | None) -> None:
        """The TPM's lockout counter and settings, read just now (None: it did not say
        them all, and the counter alone tells nothing of how close a lockout is)."""
        if params is None:
            return
        with self._lock:
            self.params = params
            self.counter = counter
            self._read_at = self.clock()

    def estimate(self) -> int | None:
        """The lockout counter now, from the last reading and the TPM's decay."""
        params, counter = self.params, self.counter
        if params is None or counter is None:
            return None
        if params.recovery_time <= 0:
            return counter
        decayed = int((self.clock() - self._read_at) // params.recovery_time)
        return max(0, counter - decayed)

    @property
    def active(self) -> bool:
        """False when the TPM has dictionary-attack protection switched off."""
        return self.params is None or self.params.recovery_time > 0

    # --- before an attempt ----------------------------------------------------------------

    def _tag(self, key_id: bytes, auth: bytes) -> bytes:
        # Keyed BLAKE2s: a MAC in one call, a fifth of an HMAC-SHA256's cost here (the
        # lane computes one per request on a key without noDA).
        return hashlib.blake2s(len(key_id).to_bytes(2, "big") + key_id + auth,
                               key=self._secret, digest_size=16).digest()

    def known_good(self, key_id: bytes, auth: bytes) -> bool:
        """The password has signed with this key before: it cannot cost a count."""
        return self._tag(key_id, auth) in self._good

    def check(self, peer: int, key_id: bytes, auth: bytes, fresh: bool = True) -> bool:
        """Raise unless a password attempt on a DA-protected key may go to the TPM;
        True: the password is known good (no attempt at all).

        AuthFailedError: this peer's password was refused for this key already.
        LockoutError (tpm_rc 0): the peer is throttled, or the attempt would eat into
        the reserve, or the TPM is locked out. Known-good passwords always pass.
        `fresh`: the counter was read just now. Otherwise (the event loop, which cannot
        ask the TPM) a refusal by a counter older than REREAD is left to the worker,
        which reads it again: the TPM may have forgotten a count since.
        """
        tag = self._tag(key_id, auth)
        if tag in self._good:
            return True
        with self._lock:
            if self._refused.get((peer, key_id)) == tag:
                self.refusals["repeated_password"] += 1
                raise AuthFailedError(
                    "this password was refused for this key already; the broker does not "
                    "send it to the TPM again (each try would count toward the TPM's "
                    "dictionary-attack lockout)")
            if not self.active:
                return False
            now = self.clock()
            state = self._peers.get(peer)
            if state is not None and now < state.next_attempt:
                self.refusals["throttled"] += 1
                raise LockoutError(
                    f"password attempts from uid {peer} are held back for "
                    f"{state.next_attempt - now:.1f} s more after {state.failures} wrong "
                    "password(s) (the broker's dictionary-attack shield)")
            params, counter = self.params, self.estimate()
            if params is None or counter is None:
                return False
            if not fresh and now - self._read_at > REREAD:
                return False
            if counter >= params.max_tries:
                self.refusals["lockout"] += 1
                raise LockoutError(
                    f"the TPM is in dictionary-attack lockout ({counter} of "
                    f"{params.max_tries} failures); it forgets one every "
                    f"{params.recovery_time} s")
            if counter + 1 + self.reserve > params.max_tries - 1:
                self.refusals["reserve"] += 1
                if not self._in_reserve:
                    self._in_reserve = True
                    # Password attempts on DA-protected keys are refused until the TPM
                    # forgets a failure.
                    audit("lockout_reserve", uid=peer, counter=counter,
                          max_tries=params.max_tries, reserve=self.reserve,
                          recovery_time=params.recovery_time)
                raise LockoutError(
                    f"the broker refuses password attempts on this key: the TPM has "
                    f"counted {counter} wrong password(s) of {params.max_tries}, and the "
                    f"broker keeps {self.reserve} in reserve so the TPM never locks out; "
                    f"it forgets one every {params.recovery_time} s")
            self._in_reserve = False
        return False

    # --- after an attempt -----------------------------------------------------------------

    def succeeded(self, key_id: bytes, auth: bytes) -> None:
        tag = self._tag(key_id, auth)
        with self._lock:
            self._good[tag] = None
            self._good.move_to_end(tag)
            while len(self._good) > self.max_entries:
                self._good.popitem(last=False)

    def failed(self, peer: int, key_id: bytes, auth: bytes) -> None:
        """The TPM refused the password: one more count, and the peer waits."""
        tag = self._tag(key_id, auth)
        now = self.clock()
        with self._lock:
            self.failures_seen += 1
            self._good.pop(tag, None)
            self._refused.pop((peer, key_id), None)
            self._refused[(peer, key_id)] = tag
            while len(self._refused) > self.max_entries:
                self._refused.popitem(last=False)
            state = self._peers.pop(peer, None) or _Peer()
            if now - state.last_failure > self._max_delay():
                state.failures = 0  # quiet long enough: start over
            state.failures += 1
            state.last_failure = now
            state.next_attempt = now if state.failures < 2 else now + min(
                self._max_delay(), self.base_delay * 2 ** (state.failures - 2))
            self._peers[peer] = state
            while len(self._peers) > self.max_entries:
                self._peers.popitem(last=False)
            estimate = self.estimate()
            if estimate is not None:
                self.counter, self._read_at = estimate + 1, now
        log.warning("the TPM refused a password from uid %d (lockout counter now about %s)",
                    peer, self.counter if self.counter is not None else "unknown")

    def tpm_locked_out(self) -> None:
        """The TPM answered LOCKOUT."""
        with self._lock:
            if self.params is not None:
                self.counter, self._read_at = self.params.max_tries, self.clock()

    def _max_delay(self) -> float:
        if self.params is not None and self.params.recovery_time > 0:
            return max(self.base_delay, float(self.params.recovery_time))
        return MAX_DELAY

    def status(self) -> dict[str, object]:
        params = self.params
        return {
            "tpm_max_tries": params.max_tries if params else None,
            "tpm_recovery_time": params.recovery_time if params else None,
            "tpm_lockout_recovery": params.lockout_recovery if params else None,
            "da_reserve": self.reserve,
            "da_refusals": {name: self.refusals[name] for name in REFUSALS},
            "da_failures_seen": self.failures_seen,
        }
