"""No swtpm, tpm2-abrmd, dbus-daemon or broker outlives the tests that started them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def processes_with_marker(marker: bytes) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def test_a_failing_test_leaves_no_process_behind() -> None:
    inner = Path(tempfile.mkdtemp(prefix="tb-"))  # short: socket paths stay under 108 bytes
    marker = f"TPMBROKER_LEAK_PROBE={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ, **{name: value})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={inner}", str(HERE / "test_fixtures.py"),
         str(HERE / "leak_probe.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert "deliberate failure" in out.stdout, out.stdout + out.stderr
    assert "1 failed" in out.stdout and "3 passed" in out.stdout, out.stdout
    shutil.rmtree(inner, ignore_errors=True)
    assert processes_with_marker(marker.encode()) == []
