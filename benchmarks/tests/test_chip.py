"""The chip model: commands told apart, answers held for their modelled time, one at a time."""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chip import CC, DISCRETE, NONE, ChipRelay, Model, classify
from tpmbroker.client import Client
from tpmbroker.processes import BrokerProcess
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm


def command(code: int, handles: list[int], parameters: bytes, sessions: bool = True) -> bytes:
    auth = struct.pack(">IHH", 0x40000009, 0, 0) + b"\x00\x00"  # password session, empty
    body = b"".join(struct.pack(">I", h) for h in handles)
    if sessions:
        body += struct.pack(">I", len(auth)) + auth
    body += parameters
    return struct.pack(">HII", 0x8002 if sessions else 0x8001, 10 + len(body), code) + body


def sign(scheme: int, handle: int = 0x80000001) -> bytes:
    digest = b"\x00\x20" + bytes(32)
    return command(CC["Sign"], [handle], digest + struct.pack(">HH", scheme, 0x000B))


def test_commands_are_told_apart_by_what_costs_time() -> None:
    assert classify(sign(0x0018), {}).key_type == "ecc"  # ECDSA
    assert classify(sign(0x0014), {}).key_type == "rsa"  # RSASSA
    assert classify(sign(0x0016), {}).key_type == "rsa"  # RSAPSS
    # the key's own scheme: the key type learnt when the key was loaded
    assert classify(sign(0x0010, 0x80000002), {0x80000002: "rsa"}).key_type == "rsa"
    salted = command(CC["StartAuthSession"], [0x80000000, 0x40000007], b"")
    unsalted = command(CC["StartAuthSession"], [0x40000007, 0x40000007], b"", False)
    assert DISCRETE.duration(classify(salted, {}).name, classify(salted, {}).key_type) == 0.040
    assert classify(unsalted, {}).key_type == "unsalted"
    random = classify(command(CC["GetRandom"], [], b"\x00\x20", False), {})
    assert (random.name, random.data_bytes) == ("GetRandom", 32)
    assert DISCRETE.duration("GetRandom", None, 32) > DISCRETE.duration("GetRandom")
    assert classify(b"\x80", {}).name == "?"  # odd input is classified, never raised on
    assert classify(command(0x1FF, [], b"", False), {}).name == "0x1ff"
    assert DISCRETE.duration("0x1ff") == DISCRETE.default > 0
    assert NONE.duration("Sign", "rsa") == 0.0


def test_busy_counts_only_time_in_service() -> None:
    relay = ChipRelay(1, Model("flat", {}, 0.0))  # nothing behind it: measured by hand
    try:
        relay._starts, relay._ends = [1.0, 3.0, 6.0], [2.0, 4.0, 8.0]
        assert relay.busy(0.0, 10.0) == 4.0
        assert relay.busy(1.5, 7.0) == pytest.approx(0.5 + 1.0 + 1.0)
        assert relay.utilization(3.0, 4.0) == 1.0
        assert relay.utilization(4.0, 6.0) == 0.0
    finally:
        relay.close()


@pytest.fixture()
def tpm(tmp_path: Path) -> Iterator[Swtpm]:
    swtpm = Swtpm(tmp_path / "tpm")
    swtpm.start()
    try:
        yield swtpm
    finally:
        swtpm.stop()


def test_the_broker_on_the_modelled_chip(tpm: Swtpm, tmp_path: Path) -> None:
    """Two signers through the broker and the relay: every signature takes the chip its
    25 ms, one after another, and the relay sees the chip busy for that time."""
    per_signer = 6
    with ChipRelay(tpm.port, DISCRETE) as relay, \
            BrokerProcess(relay.tcti, tmp_path / "broker") as broker, \
            Client(broker.socket, timeout=30) as client:
        key = client.load_key(client.generate_key(KeyType.EC, Curve.P256)[0])
        client.sign(key, hashlib.sha256(b"warm").digest())  # key resident
        signs_before = relay.counts.get("Sign", 0)
        errors: list[BaseException] = []

        def signer() -> None:
            try:
                for i in range(per_signer):
                    client.sign(key, hashlib.sha256(str(i).encode()).digest())
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=signer) for _ in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        t1 = time.monotonic()
        assert not errors, errors
        signs = relay.counts["Sign"] - signs_before
        assert signs == 2 * per_signer
        modelled = signs * DISCRETE.duration("Sign", "ecc")
        # one at a time: the two signers' signatures do not overlap on the chip
        assert t1 - t0 >= 0.95 * modelled
        assert relay.busy(t0, t1) >= 0.95 * modelled
        assert relay.utilization(t0, t1) is not None
        assert relay.service["Sign"] >= (signs + signs_before) * 0.025 * 0.99


def test_the_targets_on_the_model_can_each_fail() -> None:
    from benchmarks import targets
    from benchmarks.results import Point

    def pt(system: str, clients: int, rate: float, **fields: object) -> Point:
        values: dict[str, object] = {
            "system": system, "key": "ec:P-256", "clients": clients, "seconds": 20.0,
            "signatures": int(rate * 20), "rate": rate, "p50_ms": 200.0, "p99_ms": 220.0,
            "failures": 0, "bad_signatures": 0, "max_active_sessions": 2,
            "tpm_utilization": 0.995, "errors": {}, "fairness": 0.95}
        values.update(fields)
        return Point(**values)  # type: ignore[arg-type]

    meta = {"tpm_model": "discrete", "pool_sessions": 2}
    good = [pt("provider", 8, 39.0), pt("tpm2-openssl-1.1", 8, 19.0),
            pt("direct-password", 1, 40.0)]  # a reference, not a peer
    checks = targets.check(good, meta)
    assert checks and all(c.met for c in checks), checks
    assert any("the chip's rate" in c.target for c in checks)
    slow = [pt("provider", 8, 38.0), pt("direct-password", 1, 40.0)]
    failed = [c.target for c in targets.check(slow, meta) if not c.met]
    assert failed and all("the chip's rate" in target for target in failed), failed
    bad: dict[str, dict[str, Any]] = {
        "no failures": {"failures": 1},
        "sessions": {"max_active_sessions": 3}, "p99": {"p99_ms": 400.0},
        "min/max": {"fairness": 0.5}, "2x each peer": {"rate": 30.0}}
    for words, fields in bad.items():
        changed: dict[str, Any] = {"rate": 39.0, **fields}
        points = [pt("provider", 8, **changed), pt("tpm2-openssl-1.1", 8, 19.0)]
        failed = [c.target for c in targets.check(points, meta) if not c.met]
        assert failed and all(words in target for target in failed), (words, failed)
