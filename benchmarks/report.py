"""Benchmark results as JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import targets
from . import turnaround as ta
from .results import REFERENCE, VERIFY_OFF, Point, Results


def reference_rates(points: list[Point]) -> dict[str, float]:
    """Signatures/s of the reference system (one client) per key type."""
    return {pt.key: pt.rate for pt in points
            if pt.system == REFERENCE and pt.clients == 1 and pt.rate > 0}


def write_json(results: Results, path: Path) -> None:
    data = {"meta": results.meta, "points": [dataclasses.asdict(pt) for pt in results.points],
            "targets": [dataclasses.asdict(c)
                        for c in targets.check(results.points, results.meta)]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: Results) -> str:
    refs = reference_rates(results.points)
    lines = [
        "| system | key | clients | signatures/s | x direct | p50 ms | p99 ms | failures "
        "| max TPM sessions | TPM utilization | broker CPU µs/sig | min/max per signer "
        "| turn-around p50 / p90 µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pt in results.points:
        ref = refs.get(pt.key)
        ratio = f"{pt.rate / ref:.2f}" if ref else "-"
        failures = str(pt.failures)
        if pt.signatures + pt.failures:
            failures += f" ({100 * pt.failures / (pt.signatures + pt.failures):.0f} %)"
        if pt.bad_signatures:
            failures += f", {pt.bad_signatures} bad"
        util = "-" if pt.tpm_utilization is None else f"{100 * pt.tpm_utilization:.0f} %"
        row = (f"| {pt.system} | {pt.key} | {pt.clients} | {pt.rate:.0f} | {ratio} "
               f"| {pt.p50_ms:.2f} | {pt.p99_ms:.2f} | {failures} "
               f"| {_fmt(pt.max_active_sessions, 'd')} | {util} "
               f"| {_fmt(pt.broker_cpu_us, '.0f')} | {_fmt(pt.fairness, '.2f')} "
               f"| {ta.cell(pt.turnaround)} |")
        if pt.note:
            row = (f"| {pt.system} | {pt.key} | {pt.clients} | not run (1) "
                   "| - | - | - | - | - | - | - | - | - |")
        lines.append(row)
    return "\n".join(lines) + "\n"


def verification_section(results: Results) -> str:
    """What the signer's own verification costs per signature: each -noverify point beside
    the same system, key and concurrency with verification on, in the same run."""
    by = {(pt.system, pt.key, pt.clients): pt for pt in results.points
          if not pt.note and pt.signatures}
    lines: list[str] = []
    for (system, key, clients), off in by.items():
        on = by.get((VERIFY_OFF.get(system, ""), key, clients))
        if on is None:
            continue
        cpu = ("-" if on.signer_cpu_us is None or off.signer_cpu_us is None
               else f"{on.signer_cpu_us - off.signer_cpu_us:+.0f}")
        lines.append(f"| {on.system} | {key} | {clients} | {cpu} "
                     f"| {1000 * (on.p50_ms - off.p50_ms):+.0f} "
                     f"| {1e6 / on.rate - 1e6 / off.rate:+.0f} |")
    if not lines:
        return ""
    return ("\nThe signer's verification of each signature (on by default), per signature: "
            "verification on minus off, same run:\n\n"
            "| system | key | clients | signer CPU µs | p50 µs | wall µs (1/rate) |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")


def turnaround_section(results: Results) -> str:
    """The broker's turn-around histogram of each tpmbroker point: samples per bucket."""
    rows = [pt for pt in results.points
            if pt.turnaround is not None and pt.turnaround.get("count")]
    if not rows:
        if any(pt.turnaround is not None for pt in results.points):
            return ("\nTurn-around: n/a (this broker's STATUS has no tpm_turnaround).\n")
        return ""
    labels: list[str] = list(dict.fromkeys(
        label for pt in rows for label in (pt.turnaround or {}).get("buckets_us", {})))
    heads = [f"<= {label}" if label != ta.INF else "more" for label in labels]
    lines = ["\nTurn-around (the broker's time from the TPM's answer to the next command "
             "leaving, while work waited), samples per bucket in µs:\n",
             "| system | key | clients | TPM command | samples | " + " | ".join(heads) + " |",
             "|---|---|---:|---|---:|" + "---:|" * len(heads)]
    for pt in rows:
        t = pt.turnaround or {}
        buckets = t.get("buckets_us", {})
        lines.append(f"| {pt.system} | {pt.key} | {pt.clients} | {t['command']} "
                     f"| {t['count']} | " + " | ".join(str(buckets.get(label, 0))
                                                      for label in labels) + " |")
    return "\n".join(lines) + "\n"


def _errors_section(results: Results) -> str:
    lines: list[str] = []
    for pt in results.points:
        if pt.note:
            lines.append(f"- {pt.system} {pt.key} x {pt.clients}: {pt.note}")
        elif pt.errors:
            top = "; ".join(f"{name} x {count}" for name, count in pt.errors.items())
            lines.append(f"- {pt.system} {pt.key} x {pt.clients}: {top}")
    return "\n".join(lines)


def write_markdown(results: Results, path: Path) -> None:
    meta = results.meta
    parts = [
        "# tpmbroker benchmark\n",
        f"`{meta.get('command', '')}`\n" if meta.get("command") else "",
        f"{meta['date']}; commit {meta.get('commit') or '?'}"
        f"{' (with uncommitted changes)' if meta.get('tree_modified') else ''}; "
        f"{meta['cpu']}, {meta['cpus']} CPUs, {meta['memory_gib']} GiB; "
        f"load average {meta['loadavg_before']} before, {meta.get('loadavg_after', '?')} "
        "after.\n",
        markdown_table(results),
        "\nx direct: operations/s over direct-password's (one client, same key and "
        "operation: TPM2_Sign, TPM2_RSA_Decrypt or TPM2_ECDH_ZGen in a loop)."
        + (" (1) see below." if any(pt.note for pt in results.points) else "") + "\n",
    ]
    idle = meta.get("idle_connections")
    if idle:
        parts.append(f"\nBroker memory with {idle['connections']} idle client connections: "
                     f"{idle['rss_mib_idle']} MiB resident ({idle['rss_mib_before']} MiB "
                     "before they connected).\n")
    verification = verification_section(results)
    if verification:
        parts.append(verification)
    histograms = turnaround_section(results)
    if histograms:
        parts.append(histograms)
    errors = _errors_section(results)
    if errors:
        parts.append("\nFailures and errors:\n\n" + errors + "\n")
    checks = targets.check(results.points, results.meta)
    if checks:
        parts.append("\nAgainst the targets:\n\n" + targets.markdown(checks))
    path.write_text("\n".join(part for part in parts if part))


def write_png(results: Results, path: Path) -> bool:
    """Throughput and p99 against concurrency; one panel column per key type.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(pt.key for pt in results.points))
    systems = list(dict.fromkeys(pt.system for pt in results.points))
    if not keys:
        return False
    fig, axes = plt.subplots(2, len(keys), figsize=(6.5 * len(keys), 8.5), squeeze=False)
    markers = "osD^vP*X"
    for col, key in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        for index, system in enumerate(systems):
            pts = sorted((pt for pt in results.points
                          if pt.key == key and pt.system == system and pt.signatures > 0),
                         key=lambda pt: pt.clients)
            if not pts:
                continue
            xs = [pt.clients for pt in pts]
            style = {"marker": markers[index % len(markers)], "label": system,
                     "color": f"C{index}"}
            top.plot(xs, [pt.rate for pt in pts], **style)
            bottom.plot(xs, [pt.p99_ms for pt in pts], **style)
            for pt in pts:
                if pt.failures:
                    share = 100 * pt.failures / (pt.failures + pt.signatures)
                    top.annotate(f"{share:.0f} % failed", (pt.clients, pt.rate),
                                 textcoords="offset points", xytext=(4, -12), fontsize=7,
                                 color=f"C{index}")
        top.set_title(f"{key}: signatures/s")
        bottom.set_title(f"{key}: p99 latency (ms)")
        levels = sorted({pt.clients for pt in results.points if pt.key == key})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.minorticks_off()
            ax.set_xlabel("concurrent signers (threads or processes)")
            ax.grid(True, which="both", alpha=0.3)
        top.set_ylim(bottom=0)
        bottom.set_yscale("log")
        bottom.minorticks_on()
        top.legend(fontsize=8)
    meta = results.meta
    fig.suptitle(f"tpmbroker benchmark, swtpm, {meta['cpus']} CPUs, {meta['date']}, "
                 f"commit {(meta.get('commit') or '?')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: Results, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    write_json(results, paths["json"])
    write_markdown(results, paths["markdown"])
    if not write_png(results, paths["png"]):
        del paths["png"]
    return paths
