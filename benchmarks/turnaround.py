"""Turn-around from the broker's STATUS: the host's time between the TPM's answer and the
next command leaving while work waits, per TPM command (`tpm_turnaround`).

STATUS gives running totals; a point's share is the difference of a reading before and
one after it. Its p50 and p90 are bucket bounds: the first bound where the cumulative
count reaches 50 % and 90 % of the samples. A broker without the key (older than the
histogram) gives None, which the report shows as "n/a".
"""

from __future__ import annotations

import itertools
from typing import Any

# The TPM command behind each operation of the benchmark.
COMMAND_OF = {"sign": "TPM2_Sign", "decrypt": "TPM2_RSA_Decrypt", "derive": "TPM2_ECDH_ZGen"}
INF = "inf"

Histograms = dict[str, dict[str, int]]  # command -> {bound label: samples in that bucket}


def _bound(label: str) -> float:
    return float("inf") if label == INF else float(label)


def per_bucket(entry: Any) -> dict[str, int]:
    """{bound: samples in that bucket} from one STATUS entry, bounds ascending.

    Accepts counts per bucket, or cumulative ones (each bound counting every sample up to
    it, the last equal to "count"): cumulative counts never fall and end at the total.
    """
    buckets = {str(k): int(v) for k, v in dict(entry.get("buckets_us", {})).items()}
    labels = sorted(buckets, key=_bound)
    values = [buckets[label] for label in labels]
    count = int(entry.get("count", sum(values)))
    cumulative = (len(values) > 1 and values[-1] == count and sum(values) != count
                  and all(a <= b for a, b in itertools.pairwise(values)))
    if cumulative:
        values = [b - a for a, b in zip([0, *values], values, strict=False)]
    return dict(zip(labels, values, strict=True))


def read(status: dict[str, Any]) -> Histograms | None:
    """The per-bucket histograms of a STATUS answer; None when it has none."""
    raw = status.get("tpm_turnaround")
    if not isinstance(raw, dict):
        return None
    return {str(name): per_bucket(entry) for name, entry in raw.items()
            if isinstance(entry, dict)}


def difference(before: Histograms | None, after: Histograms | None) -> Histograms | None:
    """What was added between two readings."""
    if before is None or after is None:
        return None
    out: Histograms = {}
    for name, buckets in after.items():
        earlier = before.get(name, {})
        out[name] = {label: n - earlier.get(label, 0) for label, n in buckets.items()}
    return out


def percentile(buckets: dict[str, int], share: float) -> str | None:
    """The bound ("50", "inf") where the cumulative count reaches `share` of all; None
    without samples."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    seen = 0
    for label in sorted(buckets, key=_bound):
        seen += buckets[label]
        if seen >= share * total:
            return label
    return INF


def summary(histograms: Histograms | None, op: str) -> dict[str, Any]:
    """What a point records: the operation's command, its samples, p50, p90, buckets.
    "count" None: the broker reports no turn-around."""
    command = COMMAND_OF.get(op, "")
    if histograms is None:
        return {"command": command, "count": None}
    buckets = histograms.get(command, {})
    return {"command": command, "count": sum(buckets.values()),
            "p50_us": percentile(buckets, 0.5), "p90_us": percentile(buckets, 0.9),
            "buckets_us": buckets}


def label(bound: str | None, buckets: dict[str, int]) -> str:
    """"<= 50" for a bound, "> 10000" for the last bucket, "-" for none."""
    if bound is None:
        return "-"
    if bound != INF:
        return f"<= {bound}"
    finite = [label for label in buckets if label != INF]
    return f"> {max(finite, key=_bound)}" if finite else "any"


def cell(turnaround: dict[str, Any] | None) -> str:
    """The report's column: "<= 50 / <= 200", "n/a" (no histogram), "-" (not broker)."""
    if turnaround is None:
        return "-"
    if turnaround.get("count") is None:
        return "n/a"
    if not turnaround["count"]:
        return "no samples"
    buckets = turnaround.get("buckets_us", {})
    return (f"{label(turnaround.get('p50_us'), buckets)} / "
            f"{label(turnaround.get('p90_us'), buckets)}")
