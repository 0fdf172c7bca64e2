"""The `tpmbroker` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .paths import provider_path


def _cmd_provider_path(args: argparse.Namespace) -> int:
    path = provider_path()
    if not path.exists():
        print(f"tpmbroker: provider module missing at {path}; reinstall the package",
              file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpmbroker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tpmbroker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provider-path", help="print the path of the OpenSSL provider module")
    p.set_defaults(func=_cmd_provider_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
