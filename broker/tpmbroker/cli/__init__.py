"""The `tpmbroker` command: run the broker, make and use TPM keys, inspect the broker."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..version import __version__
from .common import Command, Parser, UsageError, neutral_openssl_conf, os_error_text
from .config import with_config
from .keys import DECRYPT, EVICT, KEYGEN, KEYS, PARENT_PUBKEY, PERSIST, POLICY, PUBKEY, SIGN
from .serve import PROVIDER_PATH, SERVE, SIMULATOR
from .tools import LOAD, PCRREAD, RANDOM, STATUS

# In the order `tpmbroker --help` lists them.
COMMANDS: tuple[Command, ...] = (
    SERVE, KEYGEN, PARENT_PUBKEY, POLICY, PUBKEY, SIGN, DECRYPT, RANDOM, PCRREAD, STATUS,
    LOAD, PERSIST, EVICT, KEYS, SIMULATOR, PROVIDER_PATH)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tpmbroker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tpmbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config is not None:
        try:  # the file's settings, then the command line's again, which win
            args = parser.parse_args(with_config(argv, SERVE, args.config))
        except UsageError as exc:
            print(f"tpmbroker serve: {exc}", file=sys.stderr)
            return 2
    if args.command == "serve":
        # Before anything loads an OpenSSL (hashlib, ssl via asyncio, cryptography,
        # tss2-esys all read OPENSSL_CONF once, when they first start OpenSSL).
        neutral_openssl_conf()
    import termios

    from ..errors import TpmBrokerError

    prog = args.parser.prog
    # The one place where what went wrong becomes one line for the user: the option, what
    # is wrong, the fix. No traceback: a traceback tells a user nothing they can act on.
    try:
        result: int = args.func(args)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except TpmBrokerError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {os_error_text(args, exc)}", file=sys.stderr)
        return 1
    except (EOFError, termios.error):
        print(f"{prog}: no terminal to read from: give the input in a file", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result
