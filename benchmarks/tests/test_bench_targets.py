"""The benchmark's verdict on the targets, from made-up points (no TPM here)."""

from __future__ import annotations

import dataclasses

from benchmarks import targets
from benchmarks.results import Point

KEY = "ec:P-256"


def point(system: str, clients: int, rate: float, **fields: object) -> Point:
    values: dict[str, object] = {
        "system": system, "key": KEY, "clients": clients, "seconds": 5.0,
        "signatures": int(rate * 5), "rate": rate, "p50_ms": 0.5, "p99_ms": 1.0,
        "failures": 0, "bad_signatures": 0, "max_active_sessions": 2,
        "tpm_utilization": 0.95, "errors": {}}
    values.update(fields)
    return Point(**values)  # type: ignore[arg-type]


def good_run() -> list[Point]:
    return [
        point("direct-password", 1, 1500, p50_ms=0.50),
        point("provider", 1, 1400, p50_ms=0.60, broker_cpu_us=90.0),
        point("provider", 8, 2000, broker_cpu_us=80.0),
        point("provider", 64, 2000, p99_ms=40.0, fairness=0.95, broker_cpu_us=85.0),
        point("tpm2-openssl-1.1", 1, 600),
        point("tpm2-openssl-1.1", 8, 700),
    ]


def verdicts(points: list[Point], meta: dict[str, object] | None = None,
             ) -> dict[tuple[str, str], bool]:
    return {(c.target, c.subject): c.met for c in targets.check(points, meta or {})}


def test_a_run_that_meets_everything_says_so() -> None:
    result = verdicts(good_run(), {"idle_connections": {
        "connections": 1001, "rss_mib_idle": 53.0, "rss_mib_before": 52.0}})
    assert len(result) == 9
    assert all(result.values()), result


def test_each_target_can_fail() -> None:
    run = good_run()
    bad = {
        "TPM utilization": dataclasses.replace(run[2], tpm_utilization=0.85),
        "direct loop's rate": dataclasses.replace(run[2], rate=1400),
        "p50": dataclasses.replace(run[1], p50_ms=0.66),
        "2x tpm2-openssl": dataclasses.replace(run[5], rate=1100),
        "min/max": dataclasses.replace(run[3], fairness=0.6),
        "p99": dataclasses.replace(run[3], p99_ms=49.0),  # fair share 32 ms, limit 48
        "broker CPU": dataclasses.replace(run[3], broker_cpu_us=101.0),
    }
    for words, changed in bad.items():
        points = [changed if (pt.system, pt.clients) == (changed.system, changed.clients)
                  else pt for pt in run]
        failed = [target for (target, _), met in verdicts(points).items() if not met]
        assert failed and all(words in target for target in failed), (words, failed)


def test_points_not_run_are_left_out_not_passed() -> None:
    run = [pt for pt in good_run() if pt.system != "tpm2-openssl-1.1"]
    assert not any("tpm2-openssl" in target for target, _ in verdicts(run))
    unmeasured = [dataclasses.replace(pt, tpm_utilization=None) for pt in run]
    assert not any("utilization" in target for target, _ in verdicts(unmeasured))
    failed_point = [dataclasses.replace(pt, note="could not start") for pt in run]
    assert verdicts(failed_point) == {}


def test_memory_target() -> None:
    meta: dict[str, object] = {"idle_connections": {
        "connections": 1001, "rss_mib_idle": 120.0, "rss_mib_before": 50.0}}
    checks = targets.check([], meta)
    assert [(c.met, c.measured) for c in checks] == [(False, "120.0 MiB")]
    assert "| no |" in targets.markdown(checks)
