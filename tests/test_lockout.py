"""The dictionary-attack shield's arithmetic (tpm/lockout.py), on a clock of our own.

The end-to-end proofs, against swtpm and the real broker, are in tests/test_da_shield.py.
"""

from __future__ import annotations

import pytest

from tpmbroker.errors import AuthFailedError, LockoutError
from tpmbroker.tpm.lockout import DaParameters, Shield

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
SWTPM = DaParameters(max_tries=3, recovery_time=1000, lockout_recovery=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shield(reserve: int = 1, params: DaParameters = SWTPM, counter: int = 0
           ) -> tuple[Shield, Clock]:
    clock = Clock()
    s = Shield(reserve, base_delay=1.0, clock=clock)
    s.observe(counter, params)
    return s, clock


def test_swtpm_defaults_allow_one_wrong_password_then_keep_the_reserve() -> None:
    s, clock = shield()
    s.check(1000, KEY, b"guess-1")  # counter 0: 0 + 1 + 1 <= 2
    s.failed(1000, KEY, b"guess-1")
    assert s.estimate() == 1
    with pytest.raises(LockoutError, match="reserve") as caught:
        s.check(2000, KEY, b"anything")  # another peer, too: 1 + 1 + 1 > 2
    assert caught.value.tpm_rc == 0
    assert s.refusals["reserve"] == 1
    clock.now += 1000  # the TPM forgets one count per recovery interval
    s.check(2000, KEY, b"anything")


@pytest.mark.parametrize(("max_tries", "reserve", "allowed"),
                         [(3, 1, 1), (3, 0, 2), (10, 1, 8), (32, 3, 28), (2, 1, 0)])
def test_the_counter_never_passes_max_tries_minus_one_minus_reserve(
        max_tries: int, reserve: int, allowed: int) -> None:
    s, _ = shield(reserve, DaParameters(max_tries, 1000, 1000))
    admitted = 0
    for peer in range(100):  # a new peer and password each time: no throttle applies
        try:
            s.check(peer, KEY, b"%d" % peer)
        except LockoutError:
            continue
        admitted += 1
        s.failed(peer, KEY, b"%d" % peer)
    assert admitted == allowed
    # Even a TPM crash (one count more) leaves the TPM short of lockout.
    assert admitted + 1 + reserve <= max_tries


def test_a_refused_password_is_not_sent_again_by_that_peer() -> None:
    s, clock = shield(reserve=0, params=DaParameters(32, 10, 10))
    s.check(1000, KEY, b"wrong")
    s.failed(1000, KEY, b"wrong")
    clock.now += 10_000  # long after: the count decayed, no throttle is left
    with pytest.raises(AuthFailedError, match="already"):
        s.check(1000, KEY, b"wrong")
    assert s.refusals["repeated_password"] == 1
    s.check(1000, KEY, b"different")  # a different password may be tried
    s.check(1000, OTHER_KEY, b"wrong")  # the same one for another key, too
    s.check(2000, KEY, b"wrong")  # and another peer may try it for itself


def test_wrong_passwords_are_throttled_per_peer_doubling() -> None:
    s, clock = shield(reserve=0, params=DaParameters(1000, 10_000, 10))
    s.failed(1000, KEY, b"a")
    s.check(1000, KEY, b"b")  # one typo costs no wait
    waits = []
    for n in range(2, 7):
        s.failed(1000, KEY, b"x%d" % n)
        start = clock.now
        with pytest.raises(LockoutError, match="uid 1000"):
            s.check(1000, KEY, b"next")
        s.check(2000, KEY, b"next")  # other peers are not held back
        while True:
            clock.now += 0.25
            try:
                s.check(1000, KEY, b"next")
            except LockoutError:
                continue
            break
        waits.append(clock.now - start)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert s.refusals["throttled"] >= 5


def test_the_throttle_stops_at_the_recovery_interval() -> None:
    s, clock = shield(reserve=0, params=DaParameters(10_000, 30, 10))
    for n in range(20):
        s.failed(7, KEY, b"%d" % n)
    clock.now += 29.9
    with pytest.raises(LockoutError):
        s.check(7, KEY, b"next")
    clock.now += 0.2
    s.check(7, KEY, b"next")


def test_known_good_passwords_and_no_passwords_pass_at_the_limit() -> None:
    s, _ = shield(counter=2)  # at the reserve
    with pytest.raises(LockoutError):
        s.check(1000, KEY, b"right")
    s.succeeded(KEY, b"right")  # it signed (before the counter climbed, say)
    assert s.known_good(KEY, b"right")
    s.check(1000, KEY, b"right")
    s.check(2000, KEY, b"right")  # the same password from anyone cannot fail
    assert not s.known_good(OTHER_KEY, b"right")
    s.failed(1000, KEY, b"right")  # if the TPM ever refuses it after all, it is not
    assert not s.known_good(KEY, b"right")


def test_tpm_lockout_is_its_own_refusal() -> None:
    s, clock = shield()
    s.tpm_locked_out()
    with pytest.raises(LockoutError, match="TPM is in dictionary-attack lockout"):
        s.check(1, KEY, b"x")
    assert s.refusals["lockout"] == 1
    clock.now += 3000  # three counts forgotten
    s.check(1, KEY, b"x")


def test_a_stale_reading_is_left_to_the_worker_on_the_event_loop() -> None:
    s, clock = shield(counter=2)
    with pytest.raises(LockoutError):
        s.check(1, KEY, b"x", fresh=False)  # read just now: refused
    clock.now += 2
    s.check(1, KEY, b"x", fresh=False)  # the worker reads again and decides
    with pytest.raises(LockoutError):
        s.check(1, KEY, b"x")


def test_dictionary_attack_protection_off_in_the_tpm() -> None:
    s, _ = shield(counter=0, params=DaParameters(3, 0, 0))
    for n in range(10):
        s.check(n, KEY, b"%d" % n)
        s.failed(n, KEY, b"%d" % n)
    with pytest.raises(AuthFailedError):  # still: the same refused password is not resent
        s.check(3, KEY, b"3")


def test_memory_is_bounded_and_passwords_are_not_kept() -> None:
    s = Shield(1, max_entries=16)
    s.observe(0, DaParameters(10_000, 1, 1))
    for n in range(1000):
        s.failed(n, KEY, b"secret-%d" % n)
        s.succeeded(b"%032d" % n, b"secret-%d" % n)
    assert len(s._refused) <= 16 and len(s._good) <= 16 and len(s._peers) <= 16
    held = repr(vars(s)).encode()
    assert b"secret-" not in held


def test_status_reports_settings_and_refusals() -> None:
    s, _ = shield(counter=2)
    with pytest.raises(LockoutError):
        s.check(1, KEY, b"x")
    status = s.status()
    assert status["tpm_max_tries"] == 3 and status["tpm_recovery_time"] == 1000
    assert status["tpm_lockout_recovery"] == 1000 and status["da_reserve"] == 1
    assert status["da_refusals"] == {"repeated_password": 0, "throttled": 0, "reserve": 1,
                                     "lockout": 0}


def test_negative_reserve_is_refused() -> None:
    with pytest.raises(ValueError):
        Shield(-1)
