"""What every subcommand of the `tpmbroker` command is made of: the declaration of a
subcommand as data (`Command`, `arg`), the parser with one-line errors, argument types,
and reaching the broker with a key and its passwords."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..definitions import (
    CURVES,
    STORAGE_PRIMARY,
    Hash,
    KeySource,
    KeyType,
    Padding,
    Scheme,
    Usage,
)

# Spellings on the command line of the numbers definitions.py holds.
SCHEMES = {scheme.name.lower(): scheme for scheme in Scheme}  # --scheme
# --alg: ec:CURVE, rsa:BITS, rsa-pss:BITS; the TPM decides which it has (tpmbroker status
# lists them).
KEY_TYPES = {key_type.name.lower().replace("_", "-"): key_type for key_type in KeyType}
CURVE_NAMES = {facts.nist_name: curve for curve, facts in CURVES.items()}
# --usage: sign, decrypt or both, in either order; none: the broker's default.
USAGES: dict[str | None, Usage] = {
    None: Usage.DEFAULT, "sign": Usage.SIGN, "decrypt": Usage.DECRYPT,
    "sign,decrypt": Usage.SIGN_DECRYPT, "decrypt,sign": Usage.SIGN_DECRYPT}
USAGE_CHOICES = ["sign", "decrypt", "sign,decrypt"]
PADDINGS = [padding.name.lower() for padding in (Padding.PKCS1, Padding.OAEP, Padding.NONE)]
PARENT_AUTH_ENV = ("TPMBROKER_PARENT_AUTH", "TPM2OPENSSL_PARENT_AUTH")


@dataclasses.dataclass(frozen=True)
class Arg:
    """One add_argument call: its flags (or positional name) and its options."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name, the line `tpmbroker --help` shows, its arguments and the
    function it runs (or its own subcommands, as `policy sign`). `client` adds --socket
    and --timeout, to reach the broker."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int] | None = None
    args: tuple[Arg, ...] = ()
    client: bool = False
    subcommands: tuple[Command, ...] = ()
    subcommand_dest: str = ""

    def add_to(self, commands: Any) -> None:
        parser = commands.add_parser(self.name, help=self.help)
        for option in (*self.args, *(CLIENT_ARGS if self.client else ())):
            parser.add_argument(*option.flags, **option.options)
        if self.subcommands:
            inner = parser.add_subparsers(dest=self.subcommand_dest, required=True)
            for command in self.subcommands:
                command.add_to(inner)
        else:
            parser.set_defaults(func=self.run)


class UsageError(Exception):
    """Bad input found after parsing: the command prints the message, one line, naming the
    option and the fix, and exits 2 as argparse does."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, that remembers how each of its options is spelled,
    so that what goes wrong after parsing (a file that cannot be read or written) names
    the option it came from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.option_names: dict[str, str] = {}  # before argparse adds -h/--help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.option_names[action.dest] = ("/".join(action.option_strings)
                                          or str(action.metavar or action.dest).upper())
        return action

    def set_defaults(self, **kwargs: Any) -> None:
        super().set_defaults(**kwargs, parser=self)

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_alg(text: str) -> tuple[KeyType, int]:
    """(key type, param) of an --alg value, or argparse's error."""
    kind, _, param = text.partition(":")
    try:
        if kind == "ec":
            return KEY_TYPES[kind], CURVE_NAMES[param.upper()]
        if kind in ("rsa", "rsa-pss") and 0 < int(param) < 0x10000:
            return KEY_TYPES[kind], int(param)
    except (KeyError, ValueError):
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r}: give ec:CURVE ({', '.join(CURVE_NAMES)}), rsa:BITS or rsa-pss:BITS")


def parent_handle(text: str) -> int:
    """--parent: the storage primary 0x40000001 or a persistent handle 0x81xxxxxx."""
    try:
        handle = int(text, 0)
    except ValueError:
        handle = -1
    if handle != STORAGE_PRIMARY and not 0x81000000 <= handle <= 0x81FFFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give 0x40000001 (the storage primary) or a persistent 0x81xxxxxx")
    return handle


def hash_name(text: str) -> str:
    """A hash name the broker knows (sha256, SHA2-256, ...), as given."""
    try:
        Hash.from_name(text)
    except ValueError:
        names = [hash_alg.name.lower() for hash_alg in Hash]
        raise argparse.ArgumentTypeError(
            f"{text!r}: give {', '.join(names[:-1])} or {names[-1]}") from None
    return text


def hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex: give bytes as hex digits, "
                                         "e.g. 6162") from None


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: give permissions in octal, e.g. 660")
    return mode


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value
    return parse


def persistent_handle(text: str) -> int:
    """A persistent handle argument: 0x81xxxxxx, or handle:0x81xxxxxx."""
    try:
        handle = int(text.removeprefix("handle:"), 16)
    except ValueError:
        handle = -1
    if not 0x81000000 <= handle <= 0x81FFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: give a persistent handle, 0x81xxxxxx")
    return handle


def os_error_text(args: argparse.Namespace, exc: OSError) -> str:
    """One line for a file that could not be used: the option it came from, what is wrong
    and what to do."""
    path = exc.filename
    if path is None:
        return exc.strerror or str(exc) or type(exc).__name__
    path = os.fsdecode(path)
    option = ""
    names: dict[str, str] = getattr(args, "parser", Parser()).option_names
    for dest, value in vars(args).items():
        if isinstance(value, str) and path in (value, value.partition(":")[2]) \
                and dest in names:
            option = names[dest] + " "
            break
    parent = Path(path).parent
    if exc.errno == errno.ENOENT and not parent.is_dir():
        fix = f"the directory {parent} does not exist: create it first (mkdir -p {parent})"
    elif exc.errno == errno.ENOENT:
        fix = "no such file: check the path"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "permission denied: check its permissions, or run as a user who may use it"
    elif exc.errno == errno.EISDIR:
        fix = "is a directory: give a file"
    elif exc.errno == errno.ENOTDIR:
        fix = "a part of the path is not a directory: check the path"
    else:
        fix = exc.strerror or str(exc)
    return f"{option}{path}: {fix}"


def ask(prompt: str, option: str) -> bytes:
    """A password typed on the terminal; without a terminal, a UsageError naming `option`
    and the way to give it otherwise."""
    import getpass
    import termios
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            return getpass.getpass(prompt).encode()
    except (EOFError, termios.error, OSError, getpass.GetPassWarning):
        raise UsageError(f"{option}: no terminal to ask the password on: give it in a file "
                         "instead (--password-file FILE)") from None


def check_output_path(path: str, option: str = "-o/--output") -> None:
    """Refuse an output path that cannot be written before the TPM does any work."""
    if path == "-":
        return
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {parent} does not exist: create it "
                         f"first (mkdir -p {parent})")
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a directory: give a file")


def neutral_openssl_conf() -> None:
    """The broker's own libcrypto must never load the tpmbroker provider (it would call the
    broker)."""
    os.environ["OPENSSL_CONF"] = os.devnull


def connect(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..client import Client

    return Client(args.socket, timeout=args.timeout)


def read_password(args: argparse.Namespace) -> bytes | None:
    from ..client import read_password_file

    if getattr(args, "password_file", None):
        return read_password_file(args.password_file)
    return None


def parent_password(args: argparse.Namespace, parent: int | None) -> bytes | None:
    """The parent's password: --parent-auth-file, else (for a persistent parent, as
    tpm2-openssl does) $TPMBROKER_PARENT_AUTH, else $TPM2OPENSSL_PARENT_AUTH. Never on
    the command line."""
    from ..client import read_password_file

    if getattr(args, "parent_auth_file", None):
        return read_password_file(args.parent_auth_file)
    if parent is None or not 0x81000000 <= parent <= 0x81FFFFFF:
        return None  # the environment names persistent parents' passwords only
    for name in PARENT_AUTH_ENV:
        value = os.environb.get(name.encode())
        if value:
            return value
    return None


def load_named_key(client: Any, args: argparse.Namespace) -> Any:
    """LOAD the key named by args.key, with its password and its parent's."""
    import dataclasses

    from ..keyfile import tss2_parent
    from ..keyref import KeySpec

    key: str | bytes = args.key
    if not args.key.startswith("handle:") and not args.key.lower().startswith("0x81"):
        key = Path(args.key).read_bytes()  # an OSError names --key (main)
    spec = KeySpec.from_any(key, read_password(args))
    if spec.source == KeySource.TSS2_DER:  # a key file: its parent may need a password
        parent_auth = parent_password(args, tss2_parent(spec.key))
        if parent_auth:
            spec = dataclasses.replace(spec, parent_auth=parent_auth)
    return client.load_key(spec)


def write_output(path: str, data: bytes, mode: int = 0o644) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file: this one (main names it)
            exc.filename = path
        raise


CLIENT_ARGS = (
    arg("--socket", help="broker socket (default: $TPMBROKER_SOCKET, "
        "$XDG_RUNTIME_DIR/tpmbroker.sock, /run/tpmbroker/tpmbroker.sock)"),
    arg("--timeout", type=positive(float), default=30.0, help="seconds (default 30)"),
)
# The arguments that name a key for LOAD: the key, its password, its parent's.
PASSWORD_FILE = arg("--password-file")
PARENT_AUTH_FILE = arg("--parent-auth-file", metavar="FILE",
                       help="file whose first line is the password of the key's parent")
