"""Subcommands of `tpmbroker` that read the TPM through the broker (random, pcrread),
inspect the broker (status) or put load on it (load)."""

from __future__ import annotations

import argparse
import json
import sys

from ..definitions import Hash
from .common import (
    PARENT_AUTH_FILE,
    PASSWORD_FILE,
    SCHEMES,
    Command,
    UsageError,
    arg,
    connect,
    hash_name,
    load_named_key,
    positive,
    write_output,
)


def _cmd_random(args: argparse.Namespace) -> int:
    if args.count < 0:
        print("tpmbroker random: the count must not be negative", file=sys.stderr)
        return 2
    with connect(args) as client:
        data = client.random(args.count)
    if args.hex:
        data = data.hex().encode() + b"\n"
    write_output(args.output, data)
    return 0


def _cmd_pcrread(args: argparse.Namespace) -> int:
    try:
        from ..keypolicy import parse_pcr_lock

        parse_pcr_lock(args.pcrs)
    except ValueError as exc:
        raise UsageError(f"PCRS {args.pcrs!r}: {exc}") from None
    with connect(args) as client:
        values = client.pcr_read(args.pcrs)
    if args.values:
        print(",".join(value.hex() for _, _, value in values))
    else:
        for bank, pcr, value in values:
            print(f"{bank}:{pcr} {value.hex()}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in status)
        for key in sorted(status):
            print(f"{key:<{width}}  {status[key]}")
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from ..client import Client
    from ..loadgen import run_threads

    with Client(args.socket, timeout=args.timeout, max_connections=args.clients + 1) as client:
        key = load_named_key(client, args)
        report = run_threads(client, key, args.clients, args.seconds,
                             Hash.from_name(args.hash), SCHEMES.get(args.scheme or ""))
    if args.json:
        print(json.dumps({
            "clients": report.clients, "seconds": round(report.seconds, 3),
            "signatures": report.signatures, "rate": round(report.rate, 1),
            "failures": report.failures, "bad_signatures": report.bad_signatures,
            "errors": report.errors, "p50_ms": round(report.percentile(50), 3),
            "p99_ms": round(report.percentile(99), 3),
            "max_active_sessions": report.max_active_sessions, "pool_size": report.pool_size,
        }, indent=2))
    else:
        print(report.summary())
    return 0 if report.failures == 0 and report.bad_signatures == 0 else 1


RANDOM = Command("random", "random bytes from the TPM (read encrypted)", _cmd_random, (
    arg("count", type=int, help="how many bytes"),
    arg("--hex", action="store_true", help="print them as hex"),
    arg("-o", "--output", default="-", help="file (default: stdout)"),
), client=True)

PCRREAD = Command(
    "pcrread", "PCR values, read through the broker (for --pcr-values)", _cmd_pcrread, (
        arg("pcrs", metavar="[BANK:]PCRS", nargs="?", default="sha256:0-23",
            help="as --pcr-lock spells them: 16, sha256:16,17, sha1:0+sha256:7 "
                 "(default sha256:0-23)"),
        arg("--values", action="store_true",
            help="only the values, comma-separated in PCR order, as --pcr-values "
                 "takes them"),
    ), client=True)

STATUS = Command("status", "pool, TPM sessions, queue and counters", _cmd_status,
                 (arg("--json", action="store_true"),), client=True)

LOAD = Command(
    "load", "sign from many threads at once; verify every signature", _cmd_load, (
        arg("--key", required=True, help="key file, or handle:0x81xxxxxx"),
        PASSWORD_FILE, PARENT_AUTH_FILE,
        arg("--clients", type=positive(int), default=64),
        arg("--seconds", type=positive(float), default=5.0),
        arg("--hash", type=hash_name, default="sha256"),
        arg("--scheme", choices=list(SCHEMES)),
        arg("--json", action="store_true"),
    ), client=True)

# In the order `tpmbroker --help` lists them (tpmbroker.cli gathers every module's).
COMMANDS = (RANDOM, PCRREAD, STATUS, LOAD)
