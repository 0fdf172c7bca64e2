"""Prometheus metrics (`tpmbroker serve --metrics-file`): the file in Prometheus's text
format, then the real chain a site runs, node_exporter's textfile collector scraped by a
Prometheus server, read back through Prometheus's query API."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tpmbroker.client import Client
from tpmbroker.errors import BadDigestError
from tpmbroker.ops.sign import Sign
from tpmbroker.simulator import Swtpm

from .test_provider import TPMBROKER
from .tpmfixtures import Broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a metrics file."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def metered(swtpm: Swtpm, tmp_path: Path) -> tuple[Broker, Path]:
    metrics = tmp_path / "textfile" / "tpmbroker.prom"
    metrics.parent.mkdir()
    broker = Broker(swtpm.tcti, tmp_path / "broker",
                    extra_args=("--metrics-file", str(metrics), "--metrics-interval", "0.2"))
    return broker, metrics


def make_key(broker: Broker, path: Path, alg: str) -> Path:
    subprocess.run([TPMBROKER, "keygen", "--alg", alg, "-o", str(path), "--socket",
                    broker.socket], check=True, capture_output=True, timeout=120)
    return path


def test_the_metrics_file_counts_what_was_served(metered: tuple[Broker, Path],
                                                 tmp_path: Path) -> None:
    broker, metrics = metered
    with broker, Client(broker.socket) as client:
        ec = client.load_key(make_key(broker, tmp_path / "ec.pem", "ec:P-256"))
        rsa = client.load_key(make_key(broker, tmp_path / "rsa.pem", "rsa:2048"))
        for _ in range(5):
            client.sign(ec, bytes(32))
        for _ in range(3):
            client.sign(rsa, bytes(32))
        with pytest.raises(BadDigestError):
            client._call(Sign(ec.key_id, 1, 0x0B, bytes(20)), key=ec)
        time.sleep(0.5)
        found = samples(metrics)
        assert found[("tpmbroker_operations_total",
                      (("key_type", "EC"), ("operation", "sign")))] == 5
        assert found[("tpmbroker_operations_total",
                      (("key_type", "RSA"), ("operation", "sign")))] == 3
        assert found[("tpmbroker_errors_total", (("status", "BAD_DIGEST"),))] == 1
        assert found[("tpmbroker_pool_sessions", (("pool", "hmac"),))] == 2
        assert found[("tpmbroker_tpm_lockout_counter", ())] == 0
        assert found[("tpmbroker_connections", ())] >= 1
        service = found[("tpmbroker_tpm_service_seconds_bucket",
                         (("le", "+Inf"), ("operation", "sign")))]
        assert service >= 8 - 2  # the first signature of each key is not measured
        assert ("process_start_time_seconds", ()) in found
    # The broker writes its last figures as it stops.
    assert samples(metrics)[("tpmbroker_connections", ())] == 0


@pytest.mark.skipif(shutil.which("prometheus") is None
                    or shutil.which("prometheus-node-exporter") is None,
                    reason="prometheus and prometheus-node-exporter not installed")
def test_prometheus_reads_the_broker_through_node_exporter(metered: tuple[Broker, Path],
                                                           tmp_path: Path) -> None:
    broker, metrics = metered
    exporter_port, prometheus_port = free_port(), free_port()
    exporter = subprocess.Popen(
        ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{exporter_port}",
         "--collector.disable-defaults", "--collector.textfile",
         f"--collector.textfile.directory={metrics.parent}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tpmbroker\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expression: str) -> list[dict[str, object]]:
        url = (f"http://127.0.0.1:{prometheus_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expression}))
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                body = json.load(answer)
        except OSError:
            return []
        result = body.get("data", {}).get("result", [])
        assert isinstance(result, list)
        return result

    try:
        with broker, Client(broker.socket) as client:
            key = client.load_key(make_key(broker, tmp_path / "ec.pem", "ec:P-256"))
            for _ in range(7):
                client.sign(key, bytes(32))
            signed = 'tpmbroker_operations_total{operation="sign",key_type="EC"}'
            wait_for(lambda: any(entry.get("value", [0, "0"])[1] == "7"  # type: ignore[index]
                                 for entry in query(signed)), 60, f"{signed} == 7")
            pool = query('tpmbroker_pool_sessions{pool="hmac"}')
            assert pool and pool[0]["value"][1] == "2"  # type: ignore[index]
    finally:
        for proc in (server, exporter):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
