"""Turn-around: the host's time from the TPM's answer to the next command, while work
waits (tpm/turnaround.py), recorded per TPM command and shown by STATUS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tpmbroker.client import Client
from tpmbroker.loadgen import run_threads
from tpmbroker.tpm.turnaround import BOUNDS_US, TurnAround

from .test_provider import TPMBROKER
from .tpmfixtures import Broker

SIGN = bytes.fromhex("80010000000a0000015d")  # a TPM2_Sign header (sizes do not matter)
DECRYPT = bytes.fromhex("80020000000a00000159")  # TPM2_RSA_Decrypt


def test_a_gap_counts_only_while_work_waits() -> None:
    recorder = TurnAround()
    waiting = [False]
    recorder.waiting = lambda: waiting[0]
    recorder.answered(now=1.0)
    recorder.sent(SIGN, now=1.5)  # nothing was waiting: the TPM was idle for want of work
    assert recorder.status() == {}
    waiting[0] = True
    recorder.answered(now=2.0)
    recorder.sent(SIGN, now=2.000_040)  # 40 µs
    recorder.answered(now=3.0)
    recorder.sent(DECRYPT, now=3.000_250)  # 250 µs
    recorder.sent(DECRYPT, now=4.0)  # no answer since the last send: no gap to count
    recorder.answered(now=5.0)
    recorder.sent(SIGN, now=5.02)  # 20 ms: the last bucket
    status = recorder.status()
    assert set(status) == {"TPM2_Sign", "TPM2_RSA_Decrypt"}
    sign, decrypt = status["TPM2_Sign"], status["TPM2_RSA_Decrypt"]
    assert isinstance(sign, dict) and isinstance(decrypt, dict)
    assert sign["count"] == 2 and decrypt["count"] == 1
    assert sign["buckets_us"]["50"] == 1 and sign["buckets_us"]["inf"] == 1
    assert decrypt["buckets_us"]["300"] == 1
    assert list(sign["buckets_us"]) == [*map(str, BOUNDS_US), "inf"]


def test_status_shows_the_turnaround_of_a_busy_tpm(broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256", "-o", str(key),
                    "--socket", broker.socket], check=True, capture_output=True, timeout=120)
    with Client(broker.socket) as client:
        loaded = client.load_key(key)
        before = client.status()["tpm_turnaround"]
        report = run_threads(client, loaded, clients=8, seconds=1.0)
        after = client.status()["tpm_turnaround"]
    assert report.signatures > 50
    assert isinstance(before, dict) and isinstance(after, dict)
    signs = after["TPM2_Sign"]
    assert isinstance(signs, dict)
    earlier = before.get("TPM2_Sign", {"count": 0})
    assert isinstance(earlier, dict)
    counted = int(signs["count"]) - int(earlier["count"])
    # Eight signers keep work waiting: most signatures followed another's answer.
    assert counted > report.signatures // 2, (counted, report.signatures)
    assert sum(signs["buckets_us"].values()) == signs["count"]
