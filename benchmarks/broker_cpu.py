"""The broker's CPU per operation, each operation beside the signature of its key type,
interleaved so that they share the machine's weather.

    python -m benchmarks.broker_cpu [--systems provider,client] [--rounds 24]
                                    [--slice 0.4] [--clients 1,8]

A point of `python -m benchmarks` runs for seconds, one after another; on a shared
machine the broker's CPU per operation moves by a third from one such window to the
next, more than decryption and signing differ. Here every round runs each operation
for one short slice, in a fresh random order, on one broker and one swtpm, and reads
the broker's CPU time (every thread's, in nanoseconds, /proc/PID/task/*/schedstat)
around each slice. A round gives a ratio per operation: its CPU per operation over the
signature's of the same key type in the same round. The report gives each operation's
median, and the median ratio with its interquartile range.

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
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

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


def _slice(make: Callable[[], Call], clients: int, seconds: float, pid: int) -> tuple[int, int]:
    """(operations done, broker CPU ns) over `seconds` of `clients` threads."""
    calls = [make() for _ in range(clients)]
    counts = [0] * clients
    stop = threading.Event()
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []
    cpu0 = [0]

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

    run_for(worker, clients, start, stop, seconds,
            lambda: cpu0.__setitem__(0, broker_cpu_ns(pid)))
    cpu = broker_cpu_ns(pid) - cpu0[0]
    if errors:
        raise RuntimeError(f"{type(errors[0]).__name__}: {errors[0]}")
    return sum(counts), cpu


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q2, q3


def measure(system: str, clients: int, rounds: int, seconds: float, socket: str, pid: int,
            works: dict[str, object], seed: int) -> dict[str, list[float]]:
    """µs of broker CPU per operation, one figure per round and operation."""
    order = list(OPERATIONS)
    rng = random.Random(seed)
    per_op: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    with contextlib.ExitStack() as stack:
        calls = _calls(system, socket, works, stack)
        for _ in range(rounds):
            rng.shuffle(order)
            for op in order:
                done, cpu = _slice(calls[op], clients, seconds, pid)
                per_op[op].append(cpu / 1000 / max(done, 1))
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["OPENSSL_CONF"] = os.devnull  # providers only in private library contexts
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        print(f"{PROG}: unknown systems: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",") if c]

    from tpmbroker.processes import BrokerProcess
    from tpmbroker.simulator import Swtpm

    from .operations import make_work

    with tempfile.TemporaryDirectory(prefix="tpmbroker-cpu-") as tmp:
        work = Path(tmp)
        swtpm = Swtpm(work / "tpm")
        swtpm.start()
        try:
            works: dict[str, object] = {"ec": make_work(swtpm.tcti, "ec:P-256 derive"),
                                        "rsa": make_work(swtpm.tcti, "rsa:2048 decrypt")}
            with BrokerProcess(swtpm.tcti, work / "broker") as broker:
                assert broker.proc is not None
                print(f"broker CPU per operation, µs: median (interquartile range) of "
                      f"{args.rounds} rounds of {args.slice:g} s slices per operation, "
                      "in random order; ratio: over the signature of the same key type, "
                      "same round")
                print()
                print("| system | clients | operation | broker CPU µs/op | "
                      "ratio to the signature |")
                print("|---|---:|---|---:|---|")
                for system in systems:
                    for count in clients:
                        per_op = measure(system, count, args.rounds, args.slice,
                                         broker.socket, broker.proc.pid, works, args.seed)
                        for line in report(system, count, per_op):
                            print(line, flush=True)
        finally:
            swtpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
