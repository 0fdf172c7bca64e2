"""`python -m benchmarks`: every system side by side on one TPM; JSON, Markdown and PNG out."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .results import DEFAULT_SYSTEMS, KEYS, SYSTEMS, TPM2_OPENSSL  # plain data

PROG = "python -m benchmarks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="signatures/s, latency and TPM sessions of tpmbroker beside "
        "its peers, on a simulated TPM of its own")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma-separated from " + ", ".join(SYSTEMS) + " (default: all "
                        "but the -noverify ones; tpm2-openssl: every release line)")
    parser.add_argument("--keys", default=",".join(KEYS),
                        help="comma-separated key types")
    parser.add_argument("--clients", default="1,8,64,256",
                        help="concurrency levels, comma-separated (default 1,8,64,256)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds per point (default 5)")
    parser.add_argument("--sessions", type=int, default=2, help="the broker's pool (default 2)")
    parser.add_argument("--max-processes", type=int, default=32,
                        help="cap on tpm2-openssl processes (default 32)")
    parser.add_argument("--out", default="bench-results",
                        help="directory for bench.json, bench.md, bench.png")
    parser.add_argument("--tcti", help="run against this TPM instead of a swtpm of the "
                        "benchmark's own (never the machine's TPM unless given here)")
    parser.add_argument("--ops", default="sign",
                        help="comma-separated from sign, decrypt (RSA-2048 PKCS#1 v1.5), "
                        "derive (P-256 ECDH); decrypt and derive run on the provider, client "
                        "and tpm2-openssl systems (default sign)")
    parser.add_argument("--tpm-model", default="none", choices=("none", "discrete"),
                        help="discrete: a relay in front of the swtpm gives every command a "
                        "discrete TPM's duration, one command at a time (default none)")
    parser.add_argument("--idle-connections", type=int, default=1000,
                        help="broker memory with this many idle clients (default 1000, 0: skip)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before anything loads an OpenSSL (hashlib, cryptography and tss2-esys read
    # OPENSSL_CONF once): this process loads providers into private library contexts
    # only, never through a configuration that might name the tpmbroker provider.
    os.environ["OPENSSL_CONF"] = os.devnull
    os.environ.setdefault("TSS2_LOG", "all+none")  # expected failures are counted, not logged

    from tpmbroker import TpmBrokerError

    from .report import write_all
    from .runner import Options, run

    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if "tpm2-openssl" in systems:  # every release line found (benchmarks/tpm2_openssl.py)
        at = systems.index("tpm2-openssl")
        systems[at:at + 1] = [x for x in TPM2_OPENSSL if x not in systems]
    keys = [x.strip() for x in args.keys.split(",") if x.strip()]
    try:
        clients = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    except ValueError:
        clients = []
    op_names = [x.strip() for x in args.ops.split(",") if x.strip()]
    unknown = [x for x in systems if x not in SYSTEMS] + [x for x in keys if x not in KEYS] + [
        x for x in op_names if x not in ("sign", "decrypt", "derive")]
    if unknown or not systems or not keys or not clients or min(clients) < 1:
        print(f"{PROG}: systems from {', '.join(SYSTEMS)}; keys from "
              f"{', '.join(KEYS)}; clients a list of positive integers"
              + (f" (unknown: {', '.join(unknown)})" if unknown else ""), file=sys.stderr)
        return 2
    if args.tcti and args.tpm_model != "none":
        print(f"{PROG}: --tpm-model models a chip in front of the benchmark's own swtpm; "
              "it cannot be combined with --tcti", file=sys.stderr)
        return 2
    if args.tcti is None and os.environ.get("TPMBROKER_TCTI"):
        print(f"{PROG}: ignoring TPMBROKER_TCTI; the benchmark runs on a swtpm of its "
              "own unless --tcti is given", file=sys.stderr)
    command = f"{PROG} " + " ".join(
        [f"--systems {','.join(systems)}", f"--keys {','.join(keys)}",
         f"--clients {','.join(map(str, clients))}", f"--seconds {args.seconds:g}",
         f"--sessions {args.sessions}", f"--max-processes {args.max_processes}",
         f"--idle-connections {args.idle_connections}",
         f"--out {args.out}"]
        + ([f"--ops {','.join(op_names)}"] if op_names != ["sign"] else [])
        + ([f"--tpm-model {args.tpm_model}"] if args.tpm_model != "none" else [])
        + ([f"--tcti {args.tcti}"] if args.tcti else []))
    options = Options(systems=systems, keys=keys, clients=clients, seconds=args.seconds,
                      out=Path(args.out), tcti=args.tcti, sessions=args.sessions,
                      max_processes=args.max_processes, command=command,
                      idle_connections=args.idle_connections, tpm_model=args.tpm_model,
                      ops=tuple(op_names))
    try:
        results = run(options)
    except TpmBrokerError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    paths = write_all(results, options.out)
    print(Path(paths["markdown"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
