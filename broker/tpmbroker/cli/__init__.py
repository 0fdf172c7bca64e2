"""The `tpmbroker` command: run the broker, make and use TPM keys, inspect the broker."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ..version import __version__
from .common import Command, Parser, UsageError, neutral_openssl_conf, os_error_text
from .config import with_config
from .serve import SERVE


def all_commands() -> tuple[Command, ...]:
    """Every module's COMMANDS, serve's first, so adding a subcommand edits no list here."""
    names = sorted((m.name for m in pkgutil.iter_modules(__path__)
                    if m.name not in ("common", "config", "manpages", "__main__")),
                   key=lambda name: (name != "serve", name))
    found: list[Command] = []
    for name in names:
        found.extend(getattr(importlib.import_module(f"{__name__}.{name}"), "COMMANDS", ()))
    return tuple(found)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tpmbroker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tpmbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands():
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
