"""`python -m benchmarks.oneshot`: every operation, one process each, checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.oneshot import OPERATIONS

CHECKOUT = Path(__file__).resolve().parents[2]


def test_every_operation_runs_for_tpmbroker_and_tpm2_openssl(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENSSL_CONF", "TPMBROKER_SOCKET", "TPMBROKER_TCTI",
                        "DBUS_SESSION_BUS_ADDRESS")}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.oneshot", "--tpm-model", "none", "--runs", "1",
         "--systems", "tpmbroker,tpm2-openssl", "--out", str(tmp_path)],
        cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "oneshot.json").read_text())["rows"]
    by = {(r["system"], r["operation"]): r for r in rows}
    for operation in OPERATIONS:  # signing, decryption and ECDH, each result checked
        row = by[("tpmbroker", operation)]
        assert row["ok"] == 1 and not row["failures"], row
        assert row["tpm_commands"] >= 1, row
    for line in ("1.1", "1.3"):  # each line runs where installed, else says why not
        for operation in OPERATIONS:
            row = by[(f"tpm2-openssl-{line}", operation)]
            if row["runs"]:
                assert row["ok"] == 1 and row["version"].startswith(line), row
            else:
                assert next(iter(row["failures"])).startswith(f"no tpm2-openssl {line} "), row
    assert "tpm2-openssl-1.3" in (tmp_path / "oneshot.md").read_text()
