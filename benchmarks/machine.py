"""The machine a benchmark ran on: hardware, kernel, package versions, the commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import tpmbroker


def _run(*cmd: str, cwd: str | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout or out.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _package_version(name: str) -> str:
    return _run("dpkg-query", "-W", "-f", "${Version}", name)


def machine_description() -> dict[str, Any]:
    src = str(Path(__file__).resolve().parents[1])  # the checkout the harness runs from
    commit = _run("git", "rev-parse", "HEAD", cwd=src)
    dirty = bool(_run("git", "status", "--porcelain", "--untracked-files=no", cwd=src))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tpmbroker": tpmbroker.__version__,
        "commit": commit if len(commit) == 40 else "",
        "tree_modified": dirty,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": _run("openssl", "version"),
        "swtpm": _package_version("swtpm"),
        "tss2_esys": _package_version("libtss2-esys-3.0.2-0"),
        "tpm2_abrmd": _package_version("tpm2-abrmd"),
        "tpm2_openssl": _package_version("tpm2-openssl"),
        "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
