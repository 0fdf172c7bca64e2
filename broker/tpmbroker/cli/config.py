"""The broker's configuration file, `tpmbroker serve --config FILE` (tpmbroker.conf(5)).

TOML whose keys are serve's long options without their leading dashes, so the options
declared in serve.py are the one list of settings: a key becomes its option on the
command line, before the options typed there, and argparse checks it as it checks
those. An option typed on the command line therefore overrides the file, except
repeatable ones (allow-uid, ...), which add to it."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from .common import Arg, Command, Parser, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Options that are no settings of the file: the file itself.
NOT_IN_FILE = frozenset({"config"})


def config_keys(command: Command) -> dict[str, Arg]:
    """Key of the file -> the option it stands for: every long option of `command`."""
    keys: dict[str, Arg] = {}
    for option in command.args:
        long_flags = [flag for flag in option.flags if flag.startswith("--")]
        if long_flags and long_flags[0][2:] not in NOT_IN_FILE:
            keys[long_flags[0][2:]] = option
    return keys


def repeatable(option: Arg) -> bool:
    return option.options.get("action") == "append"


class _FileParser(Parser):
    """Checks the file's settings as the command line's, naming the file in errors."""

    def __init__(self, path: str, text: str, *args: Any, **kwargs: Any) -> None:
        self.path = path
        self.text = text
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        named = re.match(r"argument --([\w-]+)(?:/\S+)?: (.*)", message, re.DOTALL)
        if named:
            message = f"{named[1]}{_line_of(self.text, named[1])}: {named[2]}"
        raise UsageError(f"--config {self.path}: {message}")


def _line_of(text: str, key: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return f" (line {number})"
    return ""


def read_config(path: str, command: Command) -> list[str]:
    """The options the file at `path` sets, as command-line arguments of `command`.
    Raises UsageError naming the file, the line and the fix."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # it names the line and column
        raise UsageError(f"--config {path}: not TOML: {exc}") from None
    keys = config_keys(command)
    argv: list[str] = []
    for key, value in data.items():
        option = keys.get(key)
        if option is None:
            raise UsageError(f"--config {path}: unknown key {key!r}{_line_of(text, key)}: the "
                             f"keys are {', '.join(sorted(keys))} (tpmbroker.conf(5))")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not repeatable(option):
            raise UsageError(f"--config {path}: {key}{_line_of(text, key)} takes one value, "
                             "not a list")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise UsageError(f"--config {path}: {key}{_line_of(text, key)}: give a string "
                                 "or a number")
            argv += [f"--{key}", str(item)]
    checker = _FileParser(path, text, prog=f"tpmbroker {command.name}", add_help=False)
    for option in keys.values():
        checker.add_argument(*option.flags, **option.options)
    checker.parse_args(argv)
    return argv


def with_config(argv: Sequence[str], command: Command, path: str) -> list[str]:
    """`argv` (the whole command line) with the file's options placed right after the
    subcommand's name, so that what is typed after them wins."""
    argv = list(argv)
    at = argv.index(command.name) + 1
    return [*argv[:at], *read_config(path, command), *argv[at:]]
