"""A benchmark run: every system side by side on one TPM.

The run owns everything it uses: a swtpm on free loopback ports (unless --tcti names a TPM),
a private D-Bus with tpm2-abrmd for the systems that need a resource manager, and the
broker as a subprocess. Systems that need the TPM to themselves run in phases; the TPM is
restarted (Startup CLEAR) between phases so each starts clean. Everything is stopped on the
way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from tpmbroker.loadgen import LoadReport
from tpmbroker.processes import Abrmd, BrokerProcess, DbusDaemon

from . import operations as ops
from . import pkcs11, tpm2_openssl
from . import systems as s
from . import turnaround as ta
from .chip import MODELS, ChipRelay
from .machine import machine_description
from .results import ABRMD, BROKER, DIRECT, TPM2_OPENSSL, Point, Results
from .services import CpuMeter, process_rss_mib


@dataclasses.dataclass
class Options:
    systems: list[str]
    keys: list[str]
    clients: list[int]
    seconds: float
    out: Path
    tcti: str | None = None
    sessions: int = 2
    max_processes: int = 32
    command: str = ""
    idle_connections: int = 1000
    ops: tuple[str, ...] = ("sign",)  # benchmarks.operations.OPS
    tpm_model: str = "none"  # benchmarks.chip.MODELS: "discrete" puts a chip's timing in front


def plan(options: Options) -> list[tuple[str, str, int]]:
    """(system, key, clients) in run order: grouped by what each system needs running."""
    out: list[tuple[str, str, int]] = []
    for group in (DIRECT, BROKER, ABRMD) if "sign" in options.ops else ():
        for system in group:
            if system not in options.systems:
                continue
            for key in options.keys:
                if system in DIRECT:
                    levels = [1]  # a raw TPM: one connection, three object slots
                elif system in (*TPM2_OPENSSL, "tpm2-pkcs11"):
                    levels = sorted({min(c, options.max_processes) for c in options.clients})
                elif system == "engine-style" and not key.startswith("ec:"):
                    continue
                else:
                    levels = list(options.clients)
                out.extend((system, key, c) for c in levels)
    for op in options.ops:  # decryption and ECDH: the systems that have them, their key
        if op == "sign" or ops.KEY_FOR[op] not in options.keys:
            continue
        for group in (DIRECT, BROKER, ABRMD):
            for system in group:
                if system not in options.systems or system not in ops.SYSTEMS:
                    continue
                if system in DIRECT:
                    levels = [1]
                elif system in TPM2_OPENSSL:
                    levels = sorted({min(c, options.max_processes) for c in options.clients})
                else:
                    levels = list(options.clients)
                out.extend((system, ops.label(ops.KEY_FOR[op], op), c) for c in levels)
    order = {system: n for n, system in enumerate(DIRECT + BROKER + ABRMD)}
    return sorted(out, key=lambda x: order[x[0]])  # stable: grouped by what runs them


# --- progress on stderr -------------------------------------------------------------------------

class Progress:
    """`[#####-----] 7/22  provider ec:P-256 64 clients  3.1/5.0 s` on stderr."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 24) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.done = 0
        self.label = ""
        self.started = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.tty:
            self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._draw(final=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                self._draw()

    def _draw(self, final: bool = False) -> None:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total}"
        if self.label and not final and not self.tty:
            line += f"  {self.label}"
        elif self.label and not final:
            elapsed = min(time.monotonic() - self.started, self.seconds) if self.started else 0
            line += f"  {self.label}  {elapsed:4.1f}/{self.seconds:.1f} s"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        elif final or self.label:
            self.stream.write(line + "\n")
        self.stream.flush()

    def point(self, label: str, seconds: float) -> None:
        with self._lock:
            self.label = label
            self.seconds = seconds
            self.started = time.monotonic()
            if not self.tty:
                self._draw()

    def advance(self) -> None:
        with self._lock:
            self.done += 1
            self.label = ""
            self.started = 0.0

    def message(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text + "\n")
            self.stream.flush()


# --- running ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _point(system: str, key: str, clients: int, report: LoadReport | None,
           utilization: float | None, sessions_known: bool, note: str = "",
           broker_cpu: float | None = None,
           turnaround: dict[str, Any] | None = None,
           signer_cpu: float | None = None) -> Point:
    if report is None:
        return Point(system, key, clients, 0.0, 0, 0.0, 0.0, 0.0, 0, 0, None, utilization,
                     {}, note)
    p50 = statistics.median(report.latencies_ms) if report.latencies_ms else 0.0
    return Point(system, key, clients, round(report.seconds, 3), report.signatures,
                 round(report.rate, 1), round(p50, 3), round(report.percentile(99), 3),
                 report.failures, report.bad_signatures,
                 report.max_active_sessions if sessions_known else None,
                 None if utilization is None else round(utilization, 3),
                 dict(sorted(report.errors.items(), key=lambda kv: -kv[1])[:8]), note,
                 None if broker_cpu is None or not report.signatures
                 else round(broker_cpu / report.signatures * 1e6, 1),
                 round(report.fairness, 3) if len(report.per_client) > 1 else None,
                 turnaround,
                 None if signer_cpu is None or not report.signatures
                 else round(signer_cpu / report.signatures * 1e6, 1))


def _modules_env(env: dict[str, str], module: tpm2_openssl.Module) -> dict[str, str]:
    """The environment of processes that load this tpm2-openssl (`-provider tpm2`)."""
    return dict(env, OPENSSL_MODULES=module.directory)


def run(options: Options, stream: TextIO = sys.stderr) -> Results:
    todo = plan(options)
    points: list[Point] = []
    meta = machine_description()
    meta.update(command=options.command, seconds_per_point=options.seconds,
                clients=options.clients, keys=options.keys, systems=options.systems,
                pool_sessions=options.sessions, tcti=options.tcti or "swtpm (own)",
                tpm_model=options.tpm_model,
                descriptions={k: v for k, v in s.DESCRIPTIONS.items() if k in options.systems})
    saved_env = {k: os.environ.get(k) for k in ("TPMBROKER_SOCKET", "DBUS_SESSION_BUS_ADDRESS")}
    idle: dict[int, dict[str, float]] = {}
    found_modules: dict[str, Any] = {}  # tpm2-openssl system -> version and directory
    workdir = Path(tempfile.mkdtemp(prefix="tpmbroker-bench-"))
    try:
        with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, workdir, True)
            if stream is sys.stderr:  # survives _quiet_stderr()
                stream = stack.enter_context(open(os.dup(2), "w", buffering=1))
            progress = stack.enter_context(Progress(len(todo), stream))
            _run_all(options, todo, points, workdir, stack, progress, idle, found_modules)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    meta["loadavg_after"] = _loadavg()
    if found_modules:
        meta["tpm2_openssl_modules"] = found_modules
    if idle:
        meta["idle_connections"] = next(iter(idle.values()))
    return Results(meta, points)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (the progress bar writes to a duplicate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _orderly_restart(swtpm: Any, tcti: str) -> None:
    """Restart the swtpm (Startup CLEAR) after a TPM2_Shutdown(STATE).

    Stopping a TPM without it after DA-protected keys were used counts as a failure in
    its dictionary-attack counter; phases of direct loops add one each, and the broker
    then (rightly) refuses to spend the last ones.
    """
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.constants import TPM2_SU

    with contextlib.suppress(Exception), ESAPI(TCTILdr.parse(tcti)) as ectx:
        ectx.shutdown(TPM2_SU.STATE)
    swtpm.restart()


def _own_cpu_seconds() -> float:
    """CPU of this process and of its children that have ended (the load generator):
    what the signing side spends, the broker (a child still running) not included."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _broker_turnaround(socket: str) -> ta.Histograms | None:
    """The broker's turn-around histograms now; None when its STATUS has none (or it
    does not answer)."""
    from tpmbroker import TpmBrokerError
    from tpmbroker.client import Client

    try:
        with Client(socket, timeout=10) as client:
            return ta.read(client.status())
    except (TpmBrokerError, OSError):
        return None


def _restart_abrmd(abrmd: Abrmd, phase: contextlib.ExitStack) -> Any:
    import gc

    gc.collect()  # ESAPI contexts of finished threads close their connections
    abrmd.stop()
    abrmd.start()
    probe, close_probe = s.abrmd_session_probe(abrmd.tcti)
    phase.callback(close_probe)
    return probe


def _pkcs11_token(abrmd: Abrmd | None, workdir: Path,
                  phase: contextlib.ExitStack) -> pkcs11.Token:
    """tpm2-pkcs11's token and p11-kit server on this phase's tpm2-abrmd, once a phase."""
    assert abrmd is not None
    token = pkcs11.Token(abrmd.tcti, abrmd.env(), workdir / "pkcs11")
    (workdir / "pkcs11").mkdir(exist_ok=True)
    phase.callback(token.stop)
    return token.start()


def idle_connections_rss(broker: BrokerProcess, count: int) -> dict[str, float]:
    """The broker's resident memory before and while `count` idle clients are connected."""
    import resource
    import socket

    from tpmbroker.client import Client

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, hard))
    assert broker.proc is not None
    before = process_rss_mib(broker.proc.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.connect(broker.socket)
        with Client(broker.socket, timeout=10) as client:  # it still answers
            connections = int(str(client.status()["connections"]))
        during = process_rss_mib(broker.proc.pid)
    finally:
        for sock in socks:
            sock.close()
    return {"connections": connections, "rss_mib_before": before, "rss_mib_idle": during}


def _run_all(options: Options, todo: list[tuple[str, str, int]], points: list[Point],
             workdir: Path, stack: contextlib.ExitStack, progress: Progress,
             idle: dict[int, dict[str, float]],
             found_modules: dict[str, Any]) -> None:
    from tpmbroker.simulator import Swtpm

    swtpm: Swtpm | None = None
    if options.tcti:
        tcti = options.tcti
    else:
        swtpm = Swtpm(workdir / "tpm")
        swtpm.start()
        stack.callback(swtpm.stop)
        tcti = swtpm.tcti
    relay: ChipRelay | None = None
    if options.tpm_model != "none":
        if swtpm is None:
            raise ValueError("--tpm-model needs the benchmark's own swtpm (no --tcti)")
        relay = ChipRelay(swtpm.port, MODELS[options.tpm_model])
        stack.callback(relay.close)
        tcti = relay.tcti  # every system, the key maker included, reaches the TPM through it

    keys: dict[str, s.Key] = {}
    for name in options.keys:
        progress.message(f"making a {name} key in the TPM")
        keys[name] = s.make_key(tcti, name)
        (workdir / f"{name.replace(':', '-')}.pem").write_bytes(keys[name].pem)
    works: dict[str, ops.Work] = {}
    for key_label in dict.fromkeys(k for _, k, _ in todo if ops.split(k)[1] != "sign"):
        progress.message(f"making a {ops.split(key_label)[0]} key for {key_label}")
        works[key_label] = ops.make_work(tcti, key_label)
        keys[key_label] = works[key_label].key

    bus: DbusDaemon | None = None
    if any(system in ABRMD for system, _, _ in todo) and not tcti.startswith("tabrmd"):
        bus = DbusDaemon()
        stack.callback(bus.stop)
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address

    modules: dict[str, tpm2_openssl.Module] = {}
    tpm2_openssl_missing: dict[str, str] = {}
    if any(x[0] in TPM2_OPENSSL for x in todo):
        progress.message("looking for tpm2-openssl modules")
        modules, tpm2_openssl_missing = tpm2_openssl.find(tcti)
        meta_modules = {system: dataclasses.asdict(m) for system, m in modules.items()}
        progress.message("tpm2-openssl: " + (", ".join(
            f"{system} is {m.version} ({m.directory})" for system, m in modules.items())
            or "none") + "".join(f"; {system}: {why}"
                                 for system, why in tpm2_openssl_missing.items()))
        found_modules.update(meta_modules)

    for group in (DIRECT, BROKER, ABRMD):
        group_todo = [x for x in todo if x[0] in group]
        if not group_todo:
            continue
        if swtpm is not None:
            _orderly_restart(swtpm, tcti)  # a clean TPM for each phase
        with contextlib.ExitStack() as phase:
            target = tcti
            env = dict(os.environ)
            broker: BrokerProcess | None = None
            probe = None
            abrmd: Abrmd | None = None
            token: pkcs11.Token | None = None
            token_failed = ""  # why the token could not be set up: once is enough
            try:
                if group is BROKER:
                    broker = BrokerProcess(tcti, workdir / "broker", sessions=options.sessions)
                    phase.callback(broker.stop)
                    broker.start()
                elif group is ABRMD:
                    if bus is not None:
                        # tpm2-abrmd admits at most 100 connections
                        abrmd = Abrmd(tcti, workdir / "abrmd", bus, max_connections=100)
                        phase.callback(abrmd.stop)
                        abrmd.start()
                        target = abrmd.tcti
                        env = abrmd.env()
                    probe, close_probe = s.abrmd_session_probe(target)
                    phase.callback(close_probe)
            except Exception as exc:
                for system, key_name, clients in group_todo:
                    points.append(_point(system, key_name, clients, None, None, False,
                                         f"setup failed: {exc}"[:300]))
                    progress.advance()
                progress.message(f"{', '.join(group)}: setup failed: {exc}")
                continue
            meter: CpuMeter | ChipRelay = relay if relay is not None else phase.enter_context(
                CpuMeter(swtpm.pid if swtpm is not None else None))
            broker_meter = phase.enter_context(CpuMeter(
                broker.proc.pid if broker is not None and broker.proc is not None else None))
            for system, key_name, clients in group_todo:
                key = keys[key_name]
                progress.point(f"{system} {key_name} {clients} client"
                               f"{'s' if clients > 1 else ''}", options.seconds)
                note = ""
                report: LoadReport | None = None
                start = end = 0.0
                if system == "engine-style" and abrmd is not None:
                    # Threads that fail leave tpm2-abrmd's connection and session tables
                    # in an unknown state: every point starts with a fresh one.
                    probe = _restart_abrmd(abrmd, phase)
                work = works.get(key_name)
                turnaround_before = (_broker_turnaround(broker.socket)
                                     if broker is not None else None)
                cpu_before = _own_cpu_seconds()
                try:
                    if system in TPM2_OPENSSL and system not in modules:
                        note = tpm2_openssl_missing.get(system, "tpm2-openssl not found")
                    elif system == "tpm2-pkcs11" and (pkcs11.missing() or abrmd is None
                                                      or token_failed):
                        note = (pkcs11.missing() or token_failed
                                or "needs the benchmark's own tpm2-abrmd")
                    elif work is not None and system in DIRECT:
                        report = ops.run_direct(target, work, options.seconds,
                                                hmac=system == "direct-hmac")
                    elif work is not None and system == "provider":
                        assert broker is not None
                        report = ops.run_provider(broker.socket, workdir, work, clients,
                                                  options.seconds)
                    elif work is not None and system == "client":
                        assert broker is not None
                        report = ops.run_client(broker.socket, work, clients, options.seconds)
                    elif work is not None and system in TPM2_OPENSSL:
                        key_path, data, expected = work.write(workdir)
                        report, start = s.run_processes(
                            target, _modules_env(env, modules[system]), key_path, clients,
                            options.seconds, probe,
                            mode=("--mode", work.op, "--input", str(data), "--expect",
                                  str(expected)))
                        end = start + options.seconds
                    elif system in DIRECT:
                        report = s.run_direct(target, key, options.seconds,
                                              hmac=system == "direct-hmac")
                    elif system in ("provider", "provider-noverify"):
                        assert broker is not None
                        report = s.run_provider(broker.socket, workdir, key, clients,
                                                options.seconds, verify=system == "provider")
                    elif system in ("client", "client-noverify"):
                        assert broker is not None
                        report = s.run_client(broker.socket, key, clients, options.seconds,
                                              verify=system == "client")
                    elif system in TPM2_OPENSSL:
                        key_path = workdir / f"{key_name.replace(':', '-')}.pem"
                        report, start = s.run_processes(
                            target, _modules_env(env, modules[system]), key_path, clients,
                            options.seconds, probe)
                        end = start + options.seconds
                    elif system == "tpm2-pkcs11":
                        if token is None:
                            # engine-style, run before, leaves tpm2-abrmd's connection
                            # table full ("MAX_COMMANDS exceeded") and tpm2_ptool could not
                            # connect: the token starts on a fresh one.
                            assert abrmd is not None
                            probe = _restart_abrmd(abrmd, phase)
                            try:
                                token = _pkcs11_token(abrmd, workdir, phase)
                            except (RuntimeError, OSError) as exc:
                                token_failed = f"token setup failed: {exc}"[:600]
                                raise
                        report, start = s.run_processes(
                            target, token.client_env, pkcs11.private_uri(key_name), clients,
                            options.seconds, probe, providers="",
                            mode=("--engine", "pkcs11", "--openssl-conf",
                                  token.client_env["OPENSSL_CONF"], "--mode", "digest-sign"))
                        end = start + options.seconds
                    elif system == "engine-style":
                        with _quiet_stderr():  # GLib warns once per refused connection
                            report = s.run_engine_style(target, key, clients,
                                                        options.seconds, probe)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    note = f"error: {type(exc).__name__}: {exc}"[:300]
                    if broker is not None and not (broker.proc and broker.proc.poll() is None):
                        note += f" (broker log: {broker.log()[-300:]})"
                if report is not None and not end:
                    end = time.monotonic()
                    start = end - report.seconds
                time.sleep(0.1)  # let the meter take a sample past the window's end
                utilization = meter.utilization(start, end) if report is not None else None
                broker_share = (broker_meter.utilization(start, end)
                                if report is not None else None)
                signer_cpu = _own_cpu_seconds() - cpu_before
                turnaround = None
                if broker is not None and report is not None:
                    turnaround = ta.summary(ta.difference(
                        turnaround_before, _broker_turnaround(broker.socket)),
                        ops.split(key_name)[1])
                points.append(_point(system, key_name, clients, report, utilization,
                                     sessions_known=True, note=note,
                                     broker_cpu=None if broker_share is None
                                     else broker_share * (end - start),
                                     turnaround=turnaround,
                                     signer_cpu=signer_cpu if group is BROKER else None))
                if note:
                    progress.message(f"{system} {key_name} {clients}: {note}")
                progress.advance()
            if broker is not None and options.idle_connections:
                progress.message(f"{options.idle_connections} idle connections to the broker")
                idle[options.sessions] = idle_connections_rss(broker, options.idle_connections)
