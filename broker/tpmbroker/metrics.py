"""Prometheus metrics: what the broker serves and what the TPM costs it, in Prometheus's
text format (prometheus_client), written to a file that node_exporter's textfile
collector serves (`tpmbroker serve --metrics-file`).

Why a file and not a port: the systemd unit runs the broker with PrivateNetwork=yes, so
nothing it listens on is reachable, and the broker owns a security device: it should
accept no connection but its Unix socket's. node_exporter runs on most monitored
machines already; its textfile directory is where local daemons leave their metrics.
The file is replaced atomically, so a scrape never sees half of it, and made readable
by node_exporter's user whatever the broker's umask (the unit's is 0077). Everything is
read on the event loop from what the broker already knows: writing the metrics sends no
command to the TPM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .definitions import KeyType, Opcode
from .tpm.turnaround import BOUNDS_US

if TYPE_CHECKING:
    from .server import BrokerServer

log = logging.getLogger("tpmbroker.metrics")

# Upper bounds (seconds) of the TPM service-time histogram, discrete chips included.
SERVICE_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DEFAULT_INTERVAL = 15.0


def _histogram(name: str, doc: str, label: str,
               series: dict[str, list[int]], bounds: tuple[float, ...]) -> Metric:
    """A histogram family from per-bucket counts (one more count than bounds: +Inf)."""
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, counts in sorted(series.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        # The sum is not kept: bucket counts are what service times are judged by.
        family.add_metric([value], buckets, sum_value=float("nan"))
    return family


class BrokerCollector(Collector):
    """Reads the server, its worker and the shield at each write; talks to no TPM."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server, stats = self.server, self.server.stats
        worker = server.worker
        operations = CounterMetricFamily(
            "tpmbroker_operations", "Requests answered, by operation and key type.",
            labels=["operation", "key_type"])
        for (opcode, key_type), count in sorted(stats.by_key_type.items()):
            operations.add_metric([_operation(opcode), KeyType(key_type).name], count)
        yield operations
        answered = CounterMetricFamily("tpmbroker_answers", "Successful answers, by opcode.",
                                       labels=["operation"])
        for opcode, count in sorted(stats.answered.items()):
            answered.add_metric([_operation(opcode)], count)
        yield answered
        errors = CounterMetricFamily("tpmbroker_errors", "Error answers, by status.",
                                     labels=["status"])
        for status, count in sorted(stats.by_status.items()):
            errors.add_metric([status], count)
        yield errors
        yield CounterMetricFamily("tpmbroker_busy_refusals",
                                  "Requests refused BUSY on arrival (fail fast).",
                                  value=server.admission.refused)
        yield GaugeMetricFamily("tpmbroker_queue_depth", "Requests waiting for the TPM.",
                                value=server.queue.depth)
        yield _histogram("tpmbroker_tpm_service_seconds",
                         "Time a request held the TPM, by operation.", "operation",
                         {_operation(opcode): counts for opcode, counts in stats.service.items()},
                         SERVICE_BOUNDS)
        yield _histogram("tpmbroker_tpm_turnaround_seconds",
                         "Time from the TPM's answer to the next command while work waited, "
                         "by TPM command.", "command",
                         _turnaround(worker.link.turnaround.status()),
                         tuple(bound / 1e6 for bound in BOUNDS_US))
        yield CounterMetricFamily("tpmbroker_lane_commands",
                                  "Commands the event loop sent to the TPM itself.",
                                  value=server.lane.served)
        sessions = GaugeMetricFamily("tpmbroker_pool_sessions",
                                     "Sessions in the broker's pools, by pool.",
                                     labels=["pool"])
        sessions.add_metric(["hmac"], worker.pool.count)
        sessions.add_metric(["policy"], worker.policy_pool.count)
        yield sessions
        size = GaugeMetricFamily("tpmbroker_pool_size", "Sessions each pool may hold.",
                                 labels=["pool"])
        size.add_metric(["hmac"], worker.pool.size)
        size.add_metric(["policy"], worker.policy_pool.size)
        yield size
        shield = worker.shield
        if shield is not None:
            if shield.counter is not None:
                yield GaugeMetricFamily(
                    "tpmbroker_tpm_lockout_counter",
                    "The TPM's dictionary-attack counter when last read.",
                    value=shield.counter)
            refusals = CounterMetricFamily(
                "tpmbroker_da_refusals",
                "Password attempts the dictionary-attack shield refused, by reason.",
                labels=["reason"])
            for reason, count in sorted(shield.refusals.items()):
                refusals.add_metric([reason], count)
            yield refusals
        yield GaugeMetricFamily("tpmbroker_loaded_keys", "Keys the broker knows.",
                                value=len(worker.objects.keys))
        yield GaugeMetricFamily("tpmbroker_connections", "Client connections open.",
                                value=len(server.connections))
        yield CounterMetricFamily("tpmbroker_connections_accepted", "Client connections.",
                                  value=stats.connections_total)
        yield CounterMetricFamily("tpmbroker_tpm_recoveries",
                                  "Times the broker rebuilt its TPM state (TPM restart, "
                                  "lost link).", value=worker.recoveries)
        yield CounterMetricFamily("tpmbroker_tpm_forged_answers",
                                  "TPM answers that failed their HMAC check (dropped, "
                                  "their session replaced).",
                                  value=worker.counters["tpm_forged_answers"])
        if worker.identity is not None:
            identity = GaugeMetricFamily("tpmbroker_tpm_identity",
                                         "1 for the mode the TPM's identity was checked in.",
                                         labels=["mode"])
            identity.add_metric([worker.identity.mode], 1)
            yield identity


def _operation(opcode: int) -> str:
    try:
        return Opcode(opcode).name.lower()
    except ValueError:
        return str(opcode)


def _turnaround(status: dict[str, object]) -> dict[str, list[int]]:
    series = {}
    for command, entry in status.items():
        if isinstance(entry, dict) and isinstance(entry.get("buckets_us"), dict):
            series[command] = [int(count) for count in entry["buckets_us"].values()]
    return series


def registry_for(server: BrokerServer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(server))
    # process_start_time_seconds tells restarts apart; memory and descriptors too.
    ProcessCollector(registry=registry)
    # python_gc_collections_total: each pass of the cycle collector stops the event loop
    GCCollector(registry=registry)
    return registry


class TextfileWriter:
    """Writes the metrics to `path` every `interval` seconds, on the event loop."""

    def __init__(self, server: BrokerServer, path: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.registry = registry_for(server)
        self._task: asyncio.Task[None] | None = None

    def write(self) -> None:
        text = generate_latest(self.registry)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tpmbroker-", suffix=".tmp")
            try:
                os.fchmod(fd, 0o644)  # metrics are no secret; node_exporter must read them
                os.write(fd, text)
                os.close(fd)
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as exc:  # a full disk or a removed directory: say so, serve on
            log.warning("cannot write the metrics to %s: %s", self.path, exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.write()  # the last figures, before the broker goes
