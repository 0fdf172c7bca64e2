"""The broker's CPU per operation, each operation beside the signature of its key type,
interleaved so that they share the machine's weather.

    python -m benchmarks.broker_cpu [--systems provider,client] [--rounds 24]
                                    [--slice 0.4] [--clients 1,8]
                                    [--meter cpu|instructions] [--dumps DIR]

A point of `python -m benchmarks` runs for seconds, one after another; on a shared
machine the broker's CPU per operation moves by a third from one such window to the
next, more than decryption and signing differ. Here every round runs each operation
for one short slice, in a fresh random order, on one broker and one swtpm, and reads
the broker's CPU time (every thread's, in nanoseconds, /proc/PID/task/*/schedstat)
around each slice. A round gives a ratio per operation: its CPU per operation over the
signature's of the same key type in the same round. The report gives each operation's
median, and the median ratio with its interquartile range.

`--meter instructions` counts the broker's instructions instead, with valgrind's
callgrind running the broker: the same figure run after run whatever else the machine
does, so that a few rounds of a few seconds settle what CPU time cannot. The broker runs
some fifty times slower under it, one thread at a time, and valgrind's CPU has no SHA
extensions: hashing weighs more there than on the machine. Say `--rounds 3 --slice 3`;
`--dumps DIR` keeps a dump per slice, for `callgrind_annotate --inclusive=yes` to say
where an operation's instructions go.

Operations: ECDSA P-256 and RSA-2048 PKCS#1 v1.5 signatures (the provider's through
EVP_PKEY_sign of a SHA-256 digest, the client's through Client.sign), RSA-2048 PKCS#1
v1.5 decryption, P-256 ECDH; every result checked. Systems: the provider in this
process (cffi releases the GIL), and the Python client.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from tpmbroker.loadgen import run_for

OPERATIONS = ("ECDSA P-256 sign", "P-256 ECDH", "RSA-2048 sign", "RSA-2048 decrypt")
SIGNATURE_OF = {"P-256 ECDH": "ECDSA P-256 sign", "RSA-2048 decrypt": "RSA-2048 sign"}
SYSTEMS = ("provider", "client")
PROG = "python -m benchmarks.broker_cpu"

Call = Callable[[], object]


def broker_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, in nanoseconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return total


class Meter(Protocol):
    """The broker's work between `begin` and `end`, in `unit`."""

    unit: str

    def begin(self) -> None: ...
    def end(self, label: str) -> float: ...


class CpuMeter:
    unit = "broker CPU µs/op"

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = 0

    def begin(self) -> None:
        self._start = broker_cpu_ns(self.pid)

    def end(self, label: str) -> float:
        return (broker_cpu_ns(self.pid) - self._start) / 1000


class InstructionMeter:
    """callgrind's count for the broker: zeroed at `begin`, dumped and read at `end`. Each
    dump (OUT.PID.N) stays, headed "Trigger: dump LABEL", for callgrind_annotate."""

    unit = "broker instructions/op, thousands"
    # valgrind's options for the broker; its dumps go to OUT.PID.N
    WRAPPER = ("valgrind", "--tool=callgrind", "--callgrind-out-file={out}.%p")

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self._dumps = 0

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True,
                       capture_output=True, timeout=120)

    def begin(self) -> None:
        self._control("--zero")

    def end(self, label: str) -> float:
        self._control(f"--dump={label}")
        self._dumps += 1
        dump = Path(f"{self.out}.{self.pid}.{self._dumps}")
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):  # the events counted: Ir, instructions
                return int(line.split()[1]) / 1000
        raise RuntimeError(f"no summary in {dump}")


def _calls(system: str, socket: str, works: dict[str, object],
           stack: contextlib.ExitStack) -> dict[str, Callable[[], Call]]:
    """For each operation, a maker of one thread's call; each call checks its result."""
    from tpmbroker.client import Client
    from tpmbroker.paths import provider_path

    from .libcrypto import Libcrypto, Operator, Signer
    from .operations import Work

    ec_work, rsa_work = works["ec"], works["rsa"]
    assert isinstance(ec_work, Work) and isinstance(rsa_work, Work)
    digest = hashlib.sha256(b"tpmbroker").digest()

    def checked(call: Callable[[], object], expected: bytes) -> Call:
        def run() -> object:
            if (out := call()) != expected:
                raise AssertionError("a wrong result")
            return out
        return run

    if system == "provider":
        os.environ["TPMBROKER_SOCKET"] = socket
        crypto = Libcrypto(["default", "tpmbroker"], search_path=str(provider_path().parent))
        stack.callback(crypto.close)
        ec_key = crypto.load_pem_key(ec_work.key.pem)
        rsa_key = crypto.load_pem_key(rsa_work.key.pem)
        for key in (ec_key, rsa_key):  # released before their library context goes
            stack.callback(crypto.ffi.release, key)

        def signer(key: object) -> Call:
            sign = Signer(crypto, key, "pkey-sign").sign  # verified by the provider
            return lambda: sign(b"tpmbroker")

        return {
            "ECDSA P-256 sign": lambda: signer(ec_key),
            "P-256 ECDH": lambda: checked(Operator(crypto, ec_key, "derive",
                                                   ec_work.data).run, ec_work.expected),
            "RSA-2048 sign": lambda: signer(rsa_key),
            "RSA-2048 decrypt": lambda: checked(Operator(crypto, rsa_key, "decrypt",
                                                         rsa_work.data).run,
                                                rsa_work.expected),
        }
    client = stack.enter_context(Client(socket, timeout=30, max_connections=16))
    ec_loaded, rsa_loaded = client.load_key(ec_work.key.der), client.load_key(rsa_work.key.der)
    return {  # the client verifies each signature (on by default)
        "ECDSA P-256 sign": lambda: lambda: client.sign(ec_loaded, digest),
        "P-256 ECDH": lambda: checked(lambda: client.derive(ec_loaded, ec_work.peer_point),
                                      ec_work.expected),
        "RSA-2048 sign": lambda: lambda: client.sign(rsa_loaded, digest),
        "RSA-2048 decrypt": lambda: checked(lambda: client.decrypt(rsa_loaded, rsa_work.data),
                                            rsa_work.expected),
    }


def _slice(make: Callable[[], Call], clients: int, seconds: float, meter: Meter,
           label: str) -> tuple[int, float]:
    """(operations done, the broker's work) over `seconds` of `clients` threads. The
    meter starts while every thread waits at the barrier, nothing in flight: starting
    callgrind's count takes a while, and work done meanwhile must count on both sides."""
    calls = [make() for _ in range(clients)]
    counts = [0] * clients
    stop = threading.Event()
    start = threading.Barrier(clients + 1, action=meter.begin)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        call = calls[index]
        # Uncounted: a thread's first call may set up. Should it fail, the loop fails too
        # and says why; the barrier is reached either way.
        with contextlib.suppress(Exception):
            call()
        start.wait()
        try:
            while not stop.is_set():
                call()
                counts[index] += 1
        except BaseException as exc:  # reported below, the slice does not count
            errors.append(exc)

    run_for(worker, clients, start, stop, seconds)
    work = meter.end(label)
    if errors:
        raise RuntimeError(f"{type(errors[0]).__name__}: {errors[0]}")
    return sum(counts), work


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q2, q3


def measure(system: str, clients: int, rounds: int, seconds: float, socket: str,
            meter: Meter, works: dict[str, object], seed: int) -> dict[str, list[float]]:
    """The broker's work per operation, one figure per round and operation."""
    order = list(OPERATIONS)
    rng = random.Random(seed)
    per_op: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    with contextlib.ExitStack() as stack:
        calls = _calls(system, socket, works, stack)
        for _ in range(rounds):
            rng.shuffle(order)
            for op in order:
                done, work = _slice(calls[op], clients, seconds, meter,
                                    f"{system} {clients} {op}")
                per_op[op].append(work / max(done, 1))
    return per_op


def report(system: str, clients: int, per_op: dict[str, list[float]]) -> list[str]:
    lines = []
    for op in OPERATIONS:
        q1, median, q3 = _quartiles(per_op[op])
        ratio = ""
        if op in SIGNATURE_OF:
            ratios = [a / b for a, b in zip(per_op[op], per_op[SIGNATURE_OF[op]], strict=True)]
            r1, rm, r3 = _quartiles(ratios)
            at_most = sum(r <= 1.0 for r in ratios)
            ratio = (f"{rm:.2f} ({r1:.2f}-{r3:.2f}); <= 1 in {at_most} of {len(ratios)} "
                     f"rounds; {'met' if rm <= 1.0 else 'not met'}")
        lines.append(f"| {system} | {clients} | {op} | {median:.0f} ({q1:.0f}-{q3:.0f}) | "
                     f"{ratio or '-'} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated from provider, client (default both)")
    parser.add_argument("--clients", default="1,8", help="threads per slice (default 1,8)")
    parser.add_argument("--rounds", type=int, default=24, help="rounds (default 24)")
    parser.add_argument("--slice", type=float, default=0.4,
                        help="seconds each operation runs per round (default 0.4)")
    parser.add_argument("--seed", type=int, default=1, help="the order's random seed")
    parser.add_argument("--meter", choices=("cpu", "instructions"), default="cpu",
                        help="the broker's CPU time (default), or its instructions counted "
                             "by valgrind's callgrind")
    parser.add_argument("--dumps", type=Path, help="with --meter instructions: keep "
                        "callgrind's dumps here, one per slice, for callgrind_annotate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["OPENSSL_CONF"] = os.devnull  # providers only in private library contexts
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        print(f"{PROG}: unknown systems: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",") if c]
    counting = args.meter == "instructions"
    if counting and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print(f"{PROG}: --meter instructions needs valgrind (Debian: apt install valgrind; "
              "scripts/setup.sh installs it)", file=sys.stderr)
        return 2

    from tpmbroker.processes import BrokerProcess
    from tpmbroker.simulator import Swtpm

    from .operations import make_work

    # The stack stops the broker, then the TPM, whatever fails.
    with tempfile.TemporaryDirectory(prefix="tpmbroker-cpu-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        swtpm = Swtpm(work / "tpm")
        swtpm.start()
        stack.callback(swtpm.stop)
        works: dict[str, object] = {"ec": make_work(swtpm.tcti, "ec:P-256 derive"),
                                    "rsa": make_work(swtpm.tcti, "rsa:2048 decrypt")}
        if args.dumps is not None:
            args.dumps.mkdir(parents=True, exist_ok=True)
        callgrind = (args.dumps or work) / "callgrind.out"
        wrapper = tuple(a.format(out=callgrind) for a in InstructionMeter.WRAPPER)
        broker = BrokerProcess(swtpm.tcti, work / "broker", wrapper=wrapper if counting else ())
        broker.start(timeout=600 if counting else 30)  # valgrind may take minutes
        stack.callback(broker.stop)
        assert broker.proc is not None
        pid = broker.proc.pid
        meter: Meter = InstructionMeter(pid, callgrind) if counting else CpuMeter(pid)
        what = "instructions per operation, thousands" if counting else "CPU per operation, µs"
        print(f"broker {what}: median (interquartile range) of {args.rounds} rounds of "
              f"{args.slice:g} s slices per operation, in random order; ratio: over the "
              "signature of the same key type, same round")
        print()
        print(f"| system | clients | operation | {meter.unit} | ratio to the signature |")
        print("|---|---:|---|---:|---|")
        for system in systems:
            for count in clients:
                per_op = measure(system, count, args.rounds, args.slice, broker.socket, meter,
                                 works, args.seed)
                for line in report(system, count, per_op):
                    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
