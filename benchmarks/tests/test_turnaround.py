"""Turn-around from STATUS: differences of running totals, percentiles from buckets."""

from __future__ import annotations

from benchmarks import turnaround as ta

LABELS = ["10", "20", "50", "100", "200", "300", "500", "1000", "2000", "5000", "10000", "inf"]


def entry(counts: list[int]) -> dict[str, object]:
    return {"count": sum(counts), "buckets_us": dict(zip(LABELS, counts, strict=True))}


def test_a_point_gets_what_was_added_during_it() -> None:
    before = ta.read({"tpm_turnaround": {"TPM2_Sign": entry([5, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                             0, 0])}})
    after = ta.read({"tpm_turnaround": {
        "TPM2_Sign": entry([5, 10, 60, 20, 0, 0, 0, 0, 0, 0, 0, 10]),
        "TPM2_ECDH_ZGen": entry([0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0])}})
    point = ta.summary(ta.difference(before, after), "sign")
    assert point["command"] == "TPM2_Sign" and point["count"] == 100
    assert (point["p50_us"], point["p90_us"]) == ("50", "100")
    assert ta.cell(point) == "<= 50 / <= 100"
    derive = ta.summary(ta.difference(before, after), "derive")
    assert (derive["count"], derive["p50_us"]) == (3, "500")
    assert ta.summary(ta.difference(before, after), "decrypt")["count"] == 0


def test_cumulative_buckets_read_the_same() -> None:
    counts = [0, 0, 40, 40, 0, 0, 0, 0, 0, 0, 0, 20]
    running = [sum(counts[:i + 1]) for i in range(len(counts))]
    cumulative = {"count": 100, "buckets_us": dict(zip(LABELS, running, strict=True))}
    assert ta.per_bucket(cumulative) == ta.per_bucket(entry(counts))
    point = ta.summary({"TPM2_Sign": ta.per_bucket(cumulative)}, "sign")
    assert (point["p50_us"], point["p90_us"]) == ("100", "inf")
    assert ta.cell(point) == "<= 100 / > 10000"


def test_an_older_broker_says_n_a() -> None:
    assert ta.read({"connections": 1}) is None
    point = ta.summary(ta.difference(None, None), "sign")
    assert point["count"] is None and ta.cell(point) == "n/a"
    assert ta.cell(None) == "-"  # not a tpmbroker system


def test_the_model_target_on_turnaround() -> None:
    import dataclasses

    from benchmarks import targets
    from benchmarks.results import Point

    def verdict(p50: str) -> bool:
        turnaround = {"command": "TPM2_Sign", "count": 90, "p50_us": p50, "p90_us": "inf",
                      "buckets_us": {}}
        pt = Point("provider", "ec:P-256", 8, 5.0, 195, 39.0, 200.0, 250.0, 0, 0, 2, 0.995,
                   {}, fairness=0.9, turnaround=turnaround)
        checks = [c for c in targets.check([dataclasses.replace(pt)], {"tpm_model": "discrete"})
                  if "turn-around" in c.target]
        assert len(checks) == 1
        return checks[0].met

    assert verdict("300") and verdict("50")
    assert not verdict("500") and not verdict("inf")
