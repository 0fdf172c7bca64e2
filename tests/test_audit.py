"""The audit trail: one key=value line per security event on "tpmbroker.audit", rate-limited;
usage summaries; tss2's own stderr lines through the logger at debug. Against the real
broker on swtpm, except the rate limiter's arithmetic."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker import audit as audit_module
from tpmbroker.audit import Usage, audit, format_event
from tpmbroker.client import Client
from tpmbroker.errors import AuthFailedError, BadKeyError
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker


def events(log: str, event: str) -> list[dict[str, str]]:
    """The fields of every `event=NAME` audit line in a broker log."""
    out = []
    for line in log.splitlines():
        if " tpmbroker.audit: " not in line or f"event={event} " not in line + " ":
            continue
        fields = line.split(" tpmbroker.audit: ", 1)[1]
        out.append({m[0]: m[1].strip('"') for m in re.findall(r'(\w+)=("[^"]*"|\S+)', fields)})
    return out


def full_log(broker: Broker) -> str:
    return broker.log_path.read_text(errors="replace")


@pytest.fixture
def audited(swtpm: Swtpm, tmp_path: Path) -> Iterator[Broker]:
    with Broker(swtpm.tcti, tmp_path / "broker", extra_args=("--usage-interval", "1")) as b:
        yield b


def test_format_quotes_what_needs_it() -> None:
    line = format_event("x", {"a": 1, "b": "two words", "c": 'q"=\n', "d": None})
    assert line == 'event=x a=1 b="two words" c="q\\"=\\n"'


def test_rate_limit_per_event_and_uid(monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(audit_module, "_limiter", audit_module._Limiter(burst=3, window=0.5))
    caplog.set_level(logging.INFO, logger="tpmbroker.audit")
    logged = [audit("auth_failure", uid=1000, n=i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert audit("auth_failure", uid=1001)  # another peer has its own budget
    time.sleep(0.6)
    assert audit("auth_failure", uid=1000)
    lines = [r.getMessage() for r in caplog.records if r.name == "tpmbroker.audit"]
    assert len(lines) == 5
    assert lines[-1].endswith("suppressed=7")


def test_usage_summary_sorts_and_resets() -> None:
    usage = Usage()
    for _ in range(3):
        usage.add(0, "/usr/bin/openssl", "ca")
    usage.add(33, "/usr/sbin/nginx", "web")
    lines = usage.summary()
    assert lines[0].startswith("event=usage uid=0 exe=/usr/bin/openssl key=ca signatures=3 ")
    assert "uid=33" in lines[1] and "signatures=1 " in lines[1]
    assert usage.summary() == []


def test_auth_failure_and_usage_are_audited(audited: Broker) -> None:
    with Client(audited.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256, password="right")
        good = client.load_key(der, "right")
        for _ in range(5):
            client.sign(good, bytes(32))
        wrong = client.load_key(der, "wrong")  # one DA count on a fresh swtpm (maxTries 3)
        with pytest.raises(AuthFailedError):
            client.sign(wrong, bytes(32))
    time.sleep(1.5)  # a usage summary
    log = full_log(audited)
    failures = events(log, "auth_failure")
    assert len(failures) == 1
    assert failures[0]["uid"] == "0" and failures[0]["key"] == good.key_id.hex()[:16]
    assert "right" not in log and "wrong" not in log  # never a password
    usage = events(log, "usage")
    assert sum(int(u["signatures"]) for u in usage) == 5
    assert all(u["key"] == good.key_id.hex()[:16] and u["uid"] == "0" for u in usage)


def test_tpm_reset_and_recovery_are_audited(swtpm: Swtpm, audited: Broker) -> None:
    with Client(audited.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
        key = client.load_key(der)
        client.sign(key, bytes(32))
        swtpm.restart()
        client.sign(key, bytes(32))
    log = full_log(audited)
    assert len(events(log, "tpm_reset")) == 1
    assert events(log, "recovery")


def test_tss2_lines_go_through_the_logger(swtpm: Swtpm, tmp_path: Path) -> None:
    """At debug, tss2's ERROR lines become DEBUG records of tpmbroker.tss2; at info they
    are not in the log at all, however much bad input arrives."""
    for level in ("debug", "info"):
        with Broker(swtpm.tcti, tmp_path / level, log_level=level) as broker:
            with Client(broker.socket) as client:
                der, _ = client.generate_key(KeyType.EC, Curve.P256)
                for i in range(30):  # the TPM refuses each: tss2 logs an error
                    bad = bytearray(der)
                    bad[-1 - i] ^= 0x01
                    with pytest.raises(BadKeyError):
                        client.load_key(bytes(bad))
            log = full_log(broker)
        raw_tss2 = [line for line in log.splitlines() if re.match(r"^(ERROR|WARNING):", line)]
        assert raw_tss2 == []
        captured = [line for line in log.splitlines() if "DEBUG tpmbroker.tss2: " in line]
        if level == "debug":
            assert any(":esys:" in line for line in captured), log[-2000:]
        else:
            assert captured == [] and "esys" not in log
