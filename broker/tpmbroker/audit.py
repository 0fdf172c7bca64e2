"""The audit trail: one structured line per security event, and who signed with what.

Every line goes to the logger "tpmbroker.audit" as `event=NAME key=value ...`, so that a
log collector can filter on the logger and parse the fields. Events (docs/security.md):

- `auth_failure`: the TPM refused a key's password (AUTH_FAILED).
- `peer_refused`: a connection from a uid/gid the broker does not admit.
- `key_refused`: the key policy refused a peer a key, or (with `operation=`) one
  operation with it (PERMISSION_DENIED).
- `tpm_reset`, `recovery`: the TPM restarted or the link broke, and the broker recovered.
- `tpm_identity_refused`: the TPM failed the identity check (EK certificate or pin).
- `tpm_response_forged`: a TPM answer failed its HMAC check; dropped, session replaced.
- `lockout_reserve`: the dictionary-attack shield refused password attempts.
- `usage`: every --usage-interval, one line per (peer, key) that signed: "who signed with
  the CA key".

Each event is rate-limited per (event, uid): at most BURST lines per WINDOW seconds; the
next line that gets through says how many were left out (`suppressed=N`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

log = logging.getLogger("tpmbroker.audit")

BURST = 10
WINDOW = 60.0
MAX_BUCKETS = 4096


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)  # quoted, with quotes and control characters escaped
    return text


def format_event(event: str, fields: dict[str, object]) -> str:
    parts = [f"event={event}"]
    parts += [f"{name}={_value(value)}" for name, value in fields.items() if value is not None]
    return " ".join(parts)


class _Limiter:
    """At most `burst` lines per `window` seconds per bucket; counts the rest."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        self.burst = burst
        self.window = window
        self._lock = threading.Lock()
        # bucket -> [window start, lines in it, lines suppressed since the last one out]
        self._buckets: collections.OrderedDict[tuple[str, object], list[float]] = (
            collections.OrderedDict())

    def admit(self, bucket: tuple[str, object], now: float) -> int | None:
        """None to suppress, else how many were suppressed before this one."""
        with self._lock:
            state = self._buckets.get(bucket)
            if state is None:
                state = self._buckets[bucket] = [now, 0.0, 0.0]
                while len(self._buckets) > MAX_BUCKETS:
                    self._buckets.popitem(last=False)
            if now - state[0] >= self.window:
                state[0], state[1] = now, 0.0
            if state[1] >= self.burst:
                state[2] += 1
                return None
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0.0
            return suppressed


_limiter = _Limiter()


def audit(event: str, level: int = logging.WARNING, **fields: object) -> bool:
    """Log one security event (rate-limited per event and uid); True if it was logged."""
    suppressed = _limiter.admit((event, fields.get("uid")), time.monotonic())
    if suppressed is None:
        return False
    if suppressed:
        fields["suppressed"] = suppressed
    log.log(level, "%s", format_event(event, fields))
    return True


class Usage:
    """Signatures per (peer uid, executable, key) since the last summary."""

    def __init__(self) -> None:
        # (uid, executable, key: the policy's name for it, else its key id in hex)
        self.counts: collections.Counter[tuple[int, str | None, str]] = collections.Counter()
        self.since = time.monotonic()

    def add(self, uid: int, exe: str | None, key: str) -> None:
        self.counts[uid, exe, key] += 1

    def summary(self) -> list[str]:
        """Log one `usage` line per (peer, key) and start a new interval; the lines."""
        now = time.monotonic()
        interval = round(now - self.since, 1)
        lines = []
        for (uid, exe, key), count in sorted(self.counts.items(), key=lambda item: -item[1]):
            line = format_event("usage", {"uid": uid, "exe": exe, "key": key,
                                          "signatures": count, "interval_s": interval})
            log.info("%s", line)
            lines.append(line)
        self.counts.clear()
        self.since = now
        return lines
