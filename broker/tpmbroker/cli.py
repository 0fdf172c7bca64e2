"""The `tpmbroker` command: run the broker, make and use TPM keys, inspect the broker."""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import json
import os
import pwd
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .paths import default_socket, default_state_dir, provider_path
from .version import __version__

SCHEMES = {"ecdsa": 1, "pkcs1": 2, "pss": 3}
# --alg: ec:CURVE, rsa:BITS, rsa-pss:BITS; the TPM decides which it has (tpmbroker status
# lists them). Curves by their TPM2_ECC_CURVE ids, key types by their wire numbers.
CURVES = {"P-192": 0x0001, "P-224": 0x0002, "P-256": 0x0003, "P-384": 0x0004,
          "P-521": 0x0005}
KEY_TYPES = {"ec": 1, "rsa": 2, "rsa-pss": 3}
USAGES = {None: 0, "sign": 1, "decrypt": 2, "sign,decrypt": 3, "decrypt,sign": 3}


def _alg(text: str) -> tuple[int, int]:
    """(key type, param) of an --alg value, or argparse's error."""
    kind, _, param = text.partition(":")
    try:
        if kind == "ec":
            return KEY_TYPES[kind], CURVES[param.upper()]
        if kind in ("rsa", "rsa-pss") and 0 < int(param) < 0x10000:
            return KEY_TYPES[kind], int(param)
    except (KeyError, ValueError):
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r}: give ec:CURVE ({', '.join(CURVES)}), rsa:BITS or rsa-pss:BITS")


class UsageError(Exception):
    """Bad input found after parsing: the command prints the message, one line, naming the
    option and the fix, and exits 2 as argparse does."""


class _Parser(argparse.ArgumentParser):
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


def _parent_handle(text: str) -> int:
    """--parent: the storage primary 0x40000001 or a persistent handle 0x81xxxxxx."""
    try:
        handle = int(text, 0)
    except ValueError:
        handle = -1
    if handle != 0x40000001 and not 0x81000000 <= handle <= 0x81FFFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give 0x40000001 (the storage primary) or a persistent 0x81xxxxxx")
    return handle


def _hash_name(text: str) -> str:
    """A hash name the broker knows (sha256, SHA2-256, ...), as given."""
    from . import protocol as p

    try:
        p.Hash.from_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give sha1, sha256, sha384 or sha512") from None
    return text


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex: give bytes as hex digits, "
                                         "e.g. 6162") from None


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: give permissions in octal, e.g. 660")
    return mode


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value
    return parse


def _os_error_text(args: argparse.Namespace, exc: OSError) -> str:
    """One line for a file that could not be used: the option it came from, what is wrong
    and what to do."""
    path = exc.filename
    if path is None:
        return exc.strerror or str(exc) or type(exc).__name__
    path = os.fsdecode(path)
    option = ""
    names: dict[str, str] = getattr(args, "parser", _Parser()).option_names
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


def _ask(prompt: str, option: str) -> bytes:
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


def _check_output(path: str, option: str = "-o/--output") -> None:
    """Refuse an output path that cannot be written before the TPM does any work."""
    if path == "-":
        return
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {parent} does not exist: create it "
                         f"first (mkdir -p {parent})")
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a directory: give a file")


def _neutral_openssl_conf() -> None:
    """The broker's own libcrypto must never load the tpmbroker provider (it would call the
    broker)."""
    os.environ["OPENSSL_CONF"] = os.devnull


# --- serve -------------------------------------------------------------------------------

def resolve_tcti(explicit: str | None) -> str | None:
    """--tcti, else TPMBROKER_TCTI, else /dev/tpmrm0 if present; None = embedded simulator."""
    tcti = explicit or os.environ.get("TPMBROKER_TCTI")
    if tcti:
        return tcti
    if Path("/dev/tpmrm0").exists():
        return "device:/dev/tpmrm0"
    return None


def _ids(values: list[str], lookup: str, option: str) -> frozenset[int]:
    out: set[int] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                if item.isdigit():
                    out.add(int(item))
                elif lookup == "user":
                    out.add(pwd.getpwnam(item).pw_uid)
                else:
                    out.add(grp.getgrnam(item).gr_gid)
            except KeyError:
                raise UsageError(f"{option}: no {lookup} {item!r} on this machine: give a "
                                 f"{lookup} name or number that exists") from None
    return frozenset(out)


@contextlib.contextmanager
def _tpm(tcti: str | None, state_dir: Path) -> Iterator[tuple[str, Any]]:
    """(TCTI, the embedded Swtpm or None)."""
    if tcti is not None:
        yield tcti, None
        return
    from .simulator import Swtpm

    tpm = Swtpm(state_dir / "tpm", die_with_parent=True).start()
    print(f"tpmbroker: no TPM device; embedded simulator at {tpm.tcti}, state in {state_dir}",
          file=sys.stderr)
    try:
        yield tpm.tcti, tpm
    finally:
        tpm.stop()


async def _keep_simulator_running(tpm: Any, log: Any) -> None:
    """The embedded TPM is the broker's to keep: if swtpm dies, start it again on the same
    ports and state (to the worker, a TPM reset it recovers from)."""
    import asyncio

    while True:
        await asyncio.sleep(0.5)
        if tpm.proc is not None and tpm.proc.poll() is None:
            continue
        log.warning("the embedded swtpm exited; starting it again")
        try:
            await asyncio.get_running_loop().run_in_executor(None, tpm.restart)
        except Exception as exc:  # try again at the next tick
            log.error("could not restart the embedded swtpm: %s", exc)


def _raise_fd_limit() -> None:
    """One descriptor per client: take the hard limit, not the shell's soft 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    # tss2 logs expected failures (slots full, object memory, a key the TPM refuses) as
    # errors on stderr; the broker handles those and logs what matters itself. Its lines
    # go through our logger at debug (tss2log), and are not even formatted otherwise.
    os.environ.setdefault("TSS2_LOG", "all+warning" if args.log_level == "debug" else "all+none")
    from .tss2log import capture_stderr

    capture_stderr()
    from .server import BrokerServer, ServerConfig
    from .tpm import TpmWorker

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.sessions <= 3:
        print("tpmbroker: --sessions must be 1, 2 or 3", file=sys.stderr)
        return 2
    if not 1 <= args.policy_sessions <= 2:
        print("tpmbroker: --policy-sessions must be 1 or 2", file=sys.stderr)
        return 2
    if args.sessions + args.policy_sessions > 3:
        logging.getLogger("tpmbroker").warning(
            "%d HMAC and %d policy sessions: a TPM holds 3 loaded sessions, so keys with a "
            "policy may find no slot (NO_SESSIONS); use --sessions %d",
            args.sessions, args.policy_sessions, 3 - args.policy_sessions)
    if args.socket_group is not None:
        _ids([args.socket_group], "group", "--socket-group")
    _raise_fd_limit()
    config = ServerConfig(
        socket_path=args.socket or default_socket(),
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        allow_uids=_ids(args.allow_uid, "user", "--allow-uid"),
        allow_gids=_ids(args.allow_gid, "group", "--allow-gid"),
        default_timeout=args.timeout,
        max_keys_per_connection=args.max_keys_per_connection,
        frame_timeout=args.frame_timeout,
        usage_interval=args.usage_interval,
        admin_uids=_ids(args.admin_uid, "user", "--admin-uid"),
        admin_gids=_ids(args.admin_gid, "group", "--admin-gid"),
    )
    if args.policy is not None:
        from .access import AccessPolicyError, load_policy

        try:
            config.policy = load_policy(args.policy)
        except AccessPolicyError as exc:
            print(f"tpmbroker serve: --policy {exc}", file=sys.stderr)
            return 2
        logging.getLogger("tpmbroker.server").info(
            "key policy %s: %d key(s), default %s", args.policy, len(config.policy.rules),
            config.policy.default_name)

    async def run(tcti: str, simulator: Any) -> None:
        server = BrokerServer(config, TpmWorker(tcti, sessions=args.sessions,
                                                policy_sessions=args.policy_sessions,
                                                pss_padding=args.pss_padding,
                                                da_reserve=args.da_reserve))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        watchdog = None
        if simulator is not None:
            watchdog = loop.create_task(
                _keep_simulator_running(simulator, logging.getLogger("tpmbroker.simulator")))
        print(f"tpmbroker: serving on {config.socket_path} ({tcti}, {args.sessions} sessions)",
              file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            await server.stop(drain=args.drain_timeout)

    from .errors import TpmBrokerError

    tcti = resolve_tcti(args.tcti)
    try:
        with _tpm(tcti, Path(args.state_dir)) as (tcti, simulator):
            asyncio.run(run(tcti, simulator))
    except TpmBrokerError as exc:
        print(f"tpmbroker: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"tpmbroker serve: --tcti {tcti}: the TPM did not answer in time: is another "
              "program (another broker) using it?", file=sys.stderr)
        return 1
    return 0


def _cmd_simulator(args: argparse.Namespace) -> int:
    import signal

    from .simulator import Swtpm

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    tpm = Swtpm(Path(args.state_dir) / "tpm", port=args.port, die_with_parent=True).start()
    print(tpm.tcti, flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        tpm.stop()
    return 0


# --- client commands ------------------------------------------------------------------------

def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import Client

    return Client(args.socket, timeout=args.timeout)


def _password(args: argparse.Namespace) -> bytes | None:
    from .client import read_password_file

    if getattr(args, "password_file", None):
        return read_password_file(args.password_file)
    return None


PARENT_AUTH_ENV = ("TPMBROKER_PARENT_AUTH", "TPM2OPENSSL_PARENT_AUTH")


def _parent_auth(args: argparse.Namespace, parent: int | None) -> bytes | None:
    """The parent's password: --parent-auth-file, else (for a persistent parent, as
    tpm2-openssl does) $TPMBROKER_PARENT_AUTH, else $TPM2OPENSSL_PARENT_AUTH. Never on
    the command line."""
    from .client import read_password_file

    if getattr(args, "parent_auth_file", None):
        return read_password_file(args.parent_auth_file)
    if parent is None or not 0x81000000 <= parent <= 0x81FFFFFF:
        return None  # the environment names persistent parents' passwords only
    for name in PARENT_AUTH_ENV:
        value = os.environb.get(name.encode())
        if value:
            return value
    return None


def _load(client: Any, args: argparse.Namespace) -> Any:
    """LOAD the key named by args.key, with its password and its parent's."""
    import dataclasses

    from .keyfile import tss2_parent
    from .keyref import KeySpec

    key: str | bytes = args.key
    if not args.key.startswith("handle:") and not args.key.lower().startswith("0x81"):
        key = Path(args.key).read_bytes()  # an OSError names --key (main)
    spec = KeySpec.from_any(key, _password(args))
    if spec.source == 1:  # a key file: its parent may need a password
        parent_auth = _parent_auth(args, tss2_parent(spec.key))
        if parent_auth:
            spec = dataclasses.replace(spec, parent_auth=parent_auth)
    return client.load_key(spec)


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
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


def _passin(spec: str | None) -> bytes | None:
    """An encrypted key's passphrase, as openssl's -passin spells it: pass:TEXT,
    file:PATH (its first line), env:VAR, fd:N (its first line); None when not given."""
    from .client import read_password_file

    if spec is None:
        return None
    kind, _, value = spec.partition(":")
    if kind == "pass":
        return value.encode()
    if kind == "file":
        return read_password_file(value)
    if kind == "env":
        found = os.environb.get(value.encode())
        if found is None:
            raise SystemExit(f"tpmbroker keygen: --passin env:{value}: no such variable")
        return found
    if kind == "fd" and value.isdigit():
        with os.fdopen(int(value), "rb", closefd=False) as f:
            return f.readline().rstrip(b"\r\n")
    raise SystemExit(f"tpmbroker keygen: --passin {spec!r}: give pass:, file:, env: or fd:")


def _key_password(args: argparse.Namespace) -> bytes | None:
    """--password-file, or with -a/--auth (as create_tpm2_key) a prompt, twice."""
    if not args.auth:
        return _password(args)
    first = _ask("Enter TPM key authority: ", "-a/--auth")
    if _ask("Verifying - Enter TPM key authority: ", "-a/--auth") != first:
        raise UsageError("-a/--auth: the passwords do not match: type the same one twice")
    return first


def _cmd_wrap(args: argparse.Namespace) -> int:
    """keygen --wrap KEY: a software key into the TPM (or, with --import, for another)."""
    import sys as _sys

    from . import protocol as p
    from .errors import TpmBrokerError
    from .keyfile import der_to_pem
    from .wrap import parent_public, read_private_key, wrap_key

    if args.alg is not None or args.digest is not None:
        raise SystemExit("tpmbroker keygen: --wrap takes the algorithm from the key; "
                         "drop --alg and --digest")
    _check_output(args.output)
    data = Path(args.wrap).read_bytes()
    passphrase = _passin(args.passin)
    try:
        try:
            key = read_private_key(data, passphrase)
        except ValueError as exc:
            if passphrase is None and "encrypted" in str(exc) and _sys.stdin.isatty():
                passphrase = _ask(f"Enter pass phrase for {args.wrap}: ", "--passin")
                key = read_private_key(data, passphrase)
            else:
                raise
    except ValueError as exc:
        fix = (" with --passin (pass:, file:, env:, fd:), or on a terminal"
               if passphrase is None and "encrypted" in str(exc) else "")
        raise SystemExit(f"tpmbroker keygen: --wrap {args.wrap}: {exc}{fix}") from None
    del data
    password = _key_password(args)
    usage = p.Usage(USAGES[args.usage])
    parent = args.parent
    try:
        if args.import_parent:
            # A TPM elsewhere: nothing here talks to any TPM or broker.
            der = wrap_key(key, parent_public(Path(args.import_parent).read_bytes()),
                           password=password, usage=usage, parent_handle=parent)
        else:
            with _client(args) as client:
                der = client.wrap_key(key, password, usage=usage, parent=parent,
                                      parent_auth=_parent_auth(args, parent))
    except ValueError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    except TpmBrokerError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    _write(args.output, der_to_pem(der), 0o600)
    print(f"tpmbroker keygen: {args.wrap} still holds the private key in the clear: "
          "destroy it (and every copy) once the TPM key works", file=_sys.stderr)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from . import protocol as p
    from .keyfile import der_to_pem

    if args.wrap:
        return _cmd_wrap(args)
    if args.import_parent:
        raise SystemExit("tpmbroker keygen: --import wraps an existing key: give --wrap KEY")
    _check_output(args.output)
    key_type, param = args.alg or _alg("ec:P-256")
    if args.digest is not None and key_type != p.KeyType.RSA_PSS:
        raise SystemExit("tpmbroker keygen: --digest binds the hash of rsa-pss keys only")
    try:
        digest = p.Hash.from_name(args.digest) if args.digest is not None else None
    except ValueError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    password = _key_password(args)
    policy = _keygen_policy(args, bool(password))
    with _client(args) as client:
        der, _spki = client.generate_key(p.KeyType(key_type), param, password,
                                         args.parent, usage=p.Usage(USAGES[args.usage]),
                                         hash_alg=digest,
                                         parent_auth=_parent_auth(args, args.parent),
                                         policy=policy)
    _write(args.output, der_to_pem(der), 0o600)
    return 0


def _keygen_policy(args: argparse.Namespace, password: bool) -> bytes:
    """The GENERATE policy field for --pcr-lock / --pcr-values; a password with a policy
    adds TPM2_PolicyAuthValue (as create_tpm2_key does)."""
    from . import keypolicy

    if args.auth_policy is not None:
        if args.pcr_lock is not None:
            raise SystemExit("tpmbroker keygen: with --auth-policy, PCR locks go into the "
                             "signed policies (tpmbroker policy sign --pcr-lock)")
        steps = [keypolicy.authorize_step(_policy_public(args.auth_policy, "keygen"))]
    elif args.pcr_lock is None:
        if args.pcr_values is not None:
            raise SystemExit("tpmbroker keygen: --pcr-values goes with --pcr-lock")
        return b""
    else:
        steps = [_pcr_step(args, "keygen", required=False)]
    if password:
        steps.append(keypolicy.auth_value_step())
    return keypolicy.encode_request(steps)


def _policy_public(path: str, command: str) -> bytes:
    """TPMT_PUBLIC of the policy key in `path`: a PEM public key, or the private key."""
    from cryptography.hazmat.primitives import serialization

    from . import keypolicy

    data = Path(path).read_bytes()
    try:
        public: object = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            public = serialization.load_pem_private_key(data, None).public_key()
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"tpmbroker {command}: {path}: not a PEM EC or RSA key: "
                             f"{exc}") from None
    from .errors import TpmBrokerError

    try:
        return keypolicy.tpmt_public_of(public)
    except TpmBrokerError as exc:
        raise SystemExit(f"tpmbroker {command}: {path}: {exc}") from None


def _pcr_step(args: argparse.Namespace, command: str, required: bool) -> Any:
    """The PolicyPCR step of --pcr-lock/--pcr-values; without values, a request for the
    PCRs' current ones (GENERATE fills them in) unless `required`."""
    from . import keypolicy

    try:
        selections = keypolicy.parse_pcr_lock(args.pcr_lock)
    except ValueError as exc:
        raise UsageError(f"--pcr-lock: {exc}") from None
    digest = b""
    if args.pcr_values is None and required:
        raise UsageError(f"--pcr-values: give the values the policy allows (read them with "
                         f"`tpmbroker pcrread {args.pcr_lock}`, or compute them for a new boot)")
    if args.pcr_values is not None:
        wanted = sum(len(s.pcrs) for s in selections)
        try:
            values = [bytes.fromhex(v.strip()) for v in args.pcr_values.split(",")]
        except ValueError:
            raise UsageError(f"--pcr-values {args.pcr_values!r}: give the PCR values in hex, "
                             f"comma-separated (`tpmbroker pcrread {args.pcr_lock}` prints "
                             "them)") from None
        if len(values) != wanted:
            raise UsageError(f"--pcr-values: {len(values)} values for {wanted} PCRs: give "
                             "one per PCR of --pcr-lock, in PCR order")
        for selection, value in zip((s for s in selections for _ in s.pcrs), values, strict=True):
            if len(value) != selection.bank.digest_size:
                raise UsageError(f"--pcr-values: a {selection.bank.name.lower()} PCR value"
                                 f" is {selection.bank.digest_size} bytes "
                                 f"({2 * selection.bank.digest_size} hex digits)")
        digest = keypolicy.pcr_digest(values)
    return keypolicy.pcr_step(selections, digest)


def _cmd_policy_sign(args: argparse.Namespace) -> int:
    """Add a signed policy to a key file made with --auth-policy: the PCR lock, signed by
    the policy key. Needs no TPM and no broker."""
    from cryptography.hazmat.primitives import serialization

    from . import keypolicy
    from .errors import TpmBrokerError
    from .keyfile import der_to_pem, pem_to_der

    try:
        signer = serialization.load_pem_private_key(Path(args.signing_key).read_bytes(),
                                                    _password(args))
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"tpmbroker policy sign: --signing-key {args.signing_key}: {exc}"
                         ) from None
    body = [_pcr_step(args, "policy sign", required=True)] if args.pcr_lock else []
    approved = keypolicy.approved_digest(body)
    public = keypolicy.tpmt_public_of(signer.public_key())
    try:
        signature = keypolicy.sign_policy(signer, approved)
        step = keypolicy.authorize_step(public, b"", signature)
        key_file = Path(args.key_file)
        updated = keypolicy.add_signed_policy(pem_to_der(key_file.read_bytes()),
                                              args.name or "", [*body, step])
    except (TpmBrokerError, ValueError) as exc:
        raise SystemExit(f"tpmbroker policy sign: {exc}") from None
    tmp = key_file.with_name(key_file.name + ".new")
    _write(str(tmp), der_to_pem(updated), 0o600)
    os.replace(tmp, key_file)
    return 0


def _spki_pem(spki: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(spki)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _cmd_parent_pubkey(args: argparse.Namespace) -> int:
    from .wrap import parent_public_pem

    with _client(args) as client:
        public = client.parent_public(args.parent)
    _write(args.output, public if args.format == "tpm" else parent_public_pem(public))
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    with _client(args) as client:
        key = _load(client, args)
    _write(args.output, _spki_pem(key.public_key))
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    import hashlib

    from . import protocol as p

    hash_alg = p.Hash.from_name(args.hash)
    _check_output(args.output, "--out")
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    digest = hashlib.new(hash_alg.hashlib_name, data).digest()
    with _client(args) as client:
        key = _load(client, args)
        scheme = SCHEMES.get(args.scheme or "")
        signature = client.sign(key, digest, hash_alg,
                                p.Scheme(scheme) if scheme else None)
    _write(args.output, signature)
    return 0


def _cmd_decrypt(args: argparse.Namespace) -> int:
    from . import protocol as p

    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    padding = p.Padding[args.padding.upper()]
    oaep = padding is p.Padding.OAEP
    with _client(args) as client:
        key = _load(client, args)
        plaintext = client.decrypt(key, data, padding,
                                   args.oaep_hash if oaep else None,
                                   args.mgf1_hash if oaep else None,
                                   args.label_hex if oaep else b"")
    _write(args.output, plaintext)
    return 0


def _cmd_random(args: argparse.Namespace) -> int:
    if args.count < 0:
        print("tpmbroker random: the count must not be negative", file=sys.stderr)
        return 2
    with _client(args) as client:
        data = client.random(args.count)
    if args.hex:
        data = data.hex().encode() + b"\n"
    _write(args.output, data)
    return 0


def _cmd_pcrread(args: argparse.Namespace) -> int:
    try:
        from .keypolicy import parse_pcr_lock

        parse_pcr_lock(args.pcrs)
    except ValueError as exc:
        raise UsageError(f"PCRS {args.pcrs!r}: {exc}") from None
    with _client(args) as client:
        values = client.pcr_read(args.pcrs)
    if args.values:
        print(",".join(value.hex() for _, _, value in values))
    else:
        for bank, pcr, value in values:
            print(f"{bank}:{pcr} {value.hex()}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in status)
        for key in sorted(status):
            print(f"{key:<{width}}  {status[key]}")
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from . import protocol as p
    from .client import Client
    from .loadgen import run_threads

    with Client(args.socket, timeout=args.timeout, max_connections=args.clients + 1) as client:
        key = _load(client, args)
        scheme = p.Scheme(SCHEMES[args.scheme]) if args.scheme else None
        report = run_threads(client, key, args.clients, args.seconds,
                             p.Hash.from_name(args.hash), scheme)
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


def _handle(text: str) -> int:
    """A persistent handle argument: 0x81xxxxxx, or handle:0x81xxxxxx."""
    try:
        handle = int(text.removeprefix("handle:"), 16)
    except ValueError:
        handle = -1
    if not 0x81000000 <= handle <= 0x81FFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: give a persistent handle, 0x81xxxxxx")
    return handle


def _owner_auth(args: argparse.Namespace) -> bytes | None:
    from .client import read_password_file

    return read_password_file(args.owner_auth_file) if args.owner_auth_file else None


def _cmd_persist(args: argparse.Namespace) -> int:
    with _client(args) as client:
        key = _load(client, args)
        name = client.persist(key, args.handle, owner_auth=_owner_auth(args))
    print(f"0x{args.handle:08x} {name.hex()}")
    return 0


def _cmd_evict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.evict(args.handle, owner_auth=_owner_auth(args))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.keys()
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    print("persistent handles:")
    for obj in listing["persistent"]:
        size = obj.get("curve") or obj.get("bits") or ""
        policy = " policy" if obj.get("policy") else ""
        attributes = "|".join(str(a) for a in obj.get("attributes", []))
        print(f"  {obj['handle']}  {obj['type']} {size}{policy}  {attributes}")
    print("loaded by the broker:")
    for key in listing["loaded"]:
        where = key.get("handle") if key.get("source") == "handle" else "file"
        size = key.get("curve") or key.get("bits")
        print(f"  {str(key['key_id'])[:16]}  {key['type']} {size}  {where}  "
              f"connections {key.get('connections', 0)}"
              f"{'' if key.get('resident') else '  (not resident)'}")
    return 0


def _cmd_provider_path(args: argparse.Namespace) -> int:
    path = provider_path()
    if not path.exists():
        print(f"tpmbroker: provider module missing at {path}; reinstall the package",
              file=sys.stderr)
        return 1
    print(path)
    return 0


# --- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpmbroker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tpmbroker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", help="broker socket (default: $TPMBROKER_SOCKET, "
                        "$XDG_RUNTIME_DIR/tpmbroker.sock, /run/tpmbroker/tpmbroker.sock)")
        sp.add_argument("--timeout", type=_positive(float), default=30.0,
                        help="seconds (default 30)")

    sp = sub.add_parser("serve", help="run the broker")
    sp.add_argument("--socket", help="socket path (default as for the clients)")
    sp.add_argument("--tcti", help="TPM to use (default: $TPMBROKER_TCTI, /dev/tpmrm0, "
                    "else an embedded simulator)")
    sp.add_argument("--sessions", type=int, default=2, help="HMAC sessions in the pool (1-3)")
    sp.add_argument("--policy-sessions", type=int, default=1,
                    help="policy sessions for keys with a policy (1-2; docs/keys.md); with "
                         "--sessions, at most 3 in all, the loaded sessions a TPM holds")
    sp.add_argument("--allow-uid", action="append", default=[], metavar="UID",
                    help="user (name or number) allowed to connect; repeatable")
    sp.add_argument("--allow-gid", action="append", default=[], metavar="GID",
                    help="group (name or number) allowed to connect; repeatable")
    sp.add_argument("--admin-uid", action="append", default=[], metavar="UID",
                    help="user allowed to persist and evict keys, besides root and the "
                         "broker's own user; repeatable (docs/security.md)")
    sp.add_argument("--admin-gid", action="append", default=[], metavar="GID",
                    help="group allowed to persist and evict keys; repeatable")
    sp.add_argument("--da-reserve", type=int, default=1, metavar="N",
                    help="dictionary-attack counts the broker keeps unused below the TPM's "
                         "maxTries: password attempts on DA-protected keys are refused "
                         "when one more failure would leave fewer (default 1; docs/broker.md)")
    sp.add_argument("--pss-padding", choices=["auto", "tpm", "broker"], default="auto",
                    help="RSA-PSS: the TPM's own (tpm), padded by the broker with salt = "
                    "digest length and a raw RSA operation in the TPM (broker), or the "
                    "TPM's own unless its first signature shows another salt (auto)")
    sp.add_argument("--socket-mode", type=_octal_mode, default="660",
                    help="octal permissions (default 660)")
    sp.add_argument("--socket-group", help="group owning the socket")
    sp.add_argument("--state-dir", default=str(default_state_dir()),
                    help="where the embedded simulator keeps its state")
    sp.add_argument("--timeout", type=_positive(float), default=30.0,
                    help="default request deadline in seconds")
    sp.add_argument("--drain-timeout", type=float, default=5.0,
                    help="on SIGTERM/SIGINT, seconds to serve requests already received "
                    "before answering the rest SHUTTING_DOWN (default 5)")
    sp.add_argument("--max-keys-per-connection", type=int, default=1024,
                    help="keys one client connection may have loaded at once (default 1024)")
    sp.add_argument("--frame-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="close a connection whose frame stays incomplete this long "
                         "(default 5)")
    sp.add_argument("--policy", metavar="FILE",
                    help="per-key access control, TOML (docs/security.md)")
    sp.add_argument("--usage-interval", type=float, default=3600.0, metavar="SECONDS",
                    help="how often the audit log sums up who signed with which key "
                         "(default 3600)")
    sp.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    sp.set_defaults(func=_cmd_serve)

    sp = sub.add_parser("keygen", help="create a key in the TPM, or wrap a software key into "
                                       "it (--wrap), write a TSS2 PRIVATE KEY")
    sp.add_argument("-w", "--wrap", metavar="KEY",
                    help="wrap this EC or RSA private key (PEM or DER, PKCS#8, PKCS#1, SEC1) "
                         "instead of creating one; destroy it afterwards")
    sp.add_argument("--passin", metavar="SPEC",
                    help="--wrap: the key's passphrase if encrypted: pass:TEXT, file:PATH, "
                         "env:VAR, fd:N (default: asked on the terminal)")
    sp.add_argument("-i", "--import", dest="import_parent", metavar="PARENT_PUBKEY",
                    help="--wrap for a TPM elsewhere: its parent's public key (PEM, from "
                         "`tpmbroker parent-pubkey` there) or TPM2B_PUBLIC; writes an "
                         "importable key without any TPM here")
    sp.add_argument("-a", "--auth", action="store_true",
                    help="ask for the key's password on the terminal")
    sp.add_argument("--alg", type=_alg, default=None,
                    help="ec:P-192|P-224|P-256|P-384|P-521, rsa:BITS (1024 to 4096, as the "
                         "TPM has them), rsa-pss:BITS (scheme bound to RSASSA-PSS)")
    sp.add_argument("--usage", choices=["sign", "decrypt", "sign,decrypt"], default=None,
                    help="narrow what the key may do (default: sign and decrypt, as "
                         "tpm2-openssl; rsa-pss keys sign; docs/security.md, Key usage)")
    sp.add_argument("--digest", help="rsa-pss keys: the hash the key signs with "
                                     "(default sha256)")
    sp.add_argument("--password-file", help="file whose first line is the key's password")
    sp.add_argument("-p", "--parent", "--parent-handle", dest="parent", type=_parent_handle,
                    default="0x40000001",
                    help="parent: 0x40000001 (storage primary) or a persistent 0x81xxxxxx")
    sp.add_argument("--parent-auth-file", metavar="FILE",
                    help="file whose first line is the parent's password (default: "
                         "$TPMBROKER_PARENT_AUTH, else $TPM2OPENSSL_PARENT_AUTH)")
    sp.add_argument("--pcr-lock", metavar="[BANK:]PCRS",
                    help="bind the key to PCR values: 16, 16,17, sha256:16-17, "
                         "sha1:7+sha256:16 (default bank sha256); with a password the key "
                         "needs both (docs/keys.md)")
    sp.add_argument("--pcr-values", metavar="HEX,...",
                    help="with --pcr-lock: the PCR values to bind to, in PCR order (default: "
                         "the PCRs' current values)")
    sp.add_argument("--auth-policy", metavar="POLICYKEY",
                    help="the key opens under any policy signed by this key (PEM public or "
                         "private key); add policies with `tpmbroker policy sign`")
    sp.add_argument("-o", "--output", required=True)
    client_opts(sp)
    sp.set_defaults(func=_cmd_keygen)

    sp = sub.add_parser("parent-pubkey", help="print the public key of the TPM's storage "
                                              "parent, to wrap keys for this TPM elsewhere")
    sp.add_argument("--parent", type=_parent_handle, default="0x40000001",
                    help="0x40000001 (storage primary) or a persistent 0x81xxxxxx")
    sp.add_argument("--format", choices=["pem", "tpm"], default="pem",
                    help="pem: SubjectPublicKeyInfo; tpm: the whole TPM2B_PUBLIC")
    sp.add_argument("-o", "--output", default="-")
    client_opts(sp)
    sp.set_defaults(func=_cmd_parent_pubkey)

    sp = sub.add_parser("policy", help="signed policies of keys made with --auth-policy")
    policy_sub = sp.add_subparsers(dest="policy_command", required=True)
    sp = policy_sub.add_parser("sign", help="sign a PCR policy with the policy key and add "
                                            "it to a key file (no TPM needed)")
    sp.add_argument("--signing-key", "--key", required=True, metavar="POLICYKEY.pem",
                    help="the policy key's private key (PEM)")
    sp.add_argument("--password-file", help="file whose first line is POLICYKEY's password")
    sp.add_argument("--pcr-lock", metavar="[BANK:]PCRS", help="as keygen's")
    sp.add_argument("--pcr-values", metavar="HEX,...",
                    help="the PCR values the policy allows, in PCR order")
    sp.add_argument("--name", help="a name for the policy, shown in refusals")
    sp.add_argument("key_file", metavar="KEYFILE")
    sp.set_defaults(func=_cmd_policy_sign)

    sp = sub.add_parser("pubkey", help="print a TPM key's public key (SubjectPublicKeyInfo PEM)")
    sp.add_argument("key", help="key file, or handle:0x81xxxxxx")
    sp.add_argument("--password-file")
    sp.add_argument("--parent-auth-file", metavar="FILE",
                    help="file whose first line is the password of the key's parent")
    sp.add_argument("-o", "--output", default="-")
    client_opts(sp)
    sp.set_defaults(func=_cmd_pubkey)

    sp = sub.add_parser("sign", help="sign a file (DER signature for openssl dgst -verify)")
    sp.add_argument("--key", required=True, help="key file, or handle:0x81xxxxxx")
    sp.add_argument("--password-file")
    sp.add_argument("--parent-auth-file", metavar="FILE",
                    help="file whose first line is the password of the key's parent")
    sp.add_argument("--hash", type=_hash_name, default="sha256")
    sp.add_argument("--scheme", choices=["ecdsa", "pkcs1", "pss"])
    sp.add_argument("--in", dest="input", required=True, help="file to sign, - for stdin")
    sp.add_argument("--out", dest="output", required=True, help="signature file, - for stdout")
    client_opts(sp)
    sp.set_defaults(func=_cmd_sign)

    sp = sub.add_parser("decrypt", help="decrypt a file with an RSA TPM key (openssl "
                                        "pkeyutl -encrypt makes one)")
    sp.add_argument("--key", required=True, help="key file, or handle:0x81xxxxxx")
    sp.add_argument("--password-file")
    sp.add_argument("--padding", choices=["pkcs1", "oaep", "none"], default="pkcs1",
                    help="pkcs1 uses implicit rejection, as OpenSSL 3.2 does")
    sp.add_argument("--oaep-hash", type=_hash_name, default="sha256",
                    help="OAEP's hash (default sha256)")
    sp.add_argument("--mgf1-hash", type=_hash_name, help="MGF1's hash (default: the OAEP hash)")
    sp.add_argument("--label-hex", type=_hex, default="", help="OAEP label, in hex")
    sp.add_argument("--in", dest="input", required=True, help="ciphertext, - for stdin")
    sp.add_argument("--out", dest="output", default="-", help="plaintext file (default: "
                                                                "stdout)")
    client_opts(sp)
    sp.set_defaults(func=_cmd_decrypt)

    sp = sub.add_parser("random", help="random bytes from the TPM (read encrypted)")
    sp.add_argument("count", type=int, help="how many bytes")
    sp.add_argument("--hex", action="store_true", help="print them as hex")
    sp.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    client_opts(sp)
    sp.set_defaults(func=_cmd_random)

    sp = sub.add_parser("pcrread", help="PCR values, read through the broker (for "
                                        "--pcr-values)")
    sp.add_argument("pcrs", metavar="[BANK:]PCRS", nargs="?", default="sha256:0-23",
                    help="as --pcr-lock spells them: 16, sha256:16,17, sha1:0+sha256:7 "
                         "(default sha256:0-23)")
    sp.add_argument("--values", action="store_true",
                    help="only the values, comma-separated in PCR order, as --pcr-values "
                         "takes them")
    client_opts(sp)
    sp.set_defaults(func=_cmd_pcrread)

    sp = sub.add_parser("status", help="pool, TPM sessions, queue and counters")
    sp.add_argument("--json", action="store_true")
    client_opts(sp)
    sp.set_defaults(func=_cmd_status)

    sp = sub.add_parser("load", help="sign from many threads at once; verify every signature")
    sp.add_argument("--key", required=True, help="key file, or handle:0x81xxxxxx")
    sp.add_argument("--password-file")
    sp.add_argument("--parent-auth-file", metavar="FILE",
                    help="file whose first line is the password of the key's parent")
    sp.add_argument("--clients", type=_positive(int), default=64)
    sp.add_argument("--seconds", type=_positive(float), default=5.0)
    sp.add_argument("--hash", type=_hash_name, default="sha256")
    sp.add_argument("--scheme", choices=["ecdsa", "pkcs1", "pss"])
    sp.add_argument("--json", action="store_true")
    client_opts(sp)
    sp.set_defaults(func=_cmd_load)

    sp = sub.add_parser("persist", help="make a key persistent at a handle 0x81xxxxxx "
                                        "(the broker's administrators only)")
    sp.add_argument("key", help="key file (TSS2 PRIVATE KEY)")
    sp.add_argument("handle", type=_handle, help="free persistent handle, 0x81000000 to "
                                                 "0x817FFFFF")
    sp.add_argument("--parent-auth-file", metavar="FILE",
                    help="file whose first line is the password of the key's parent")
    sp.add_argument("--owner-auth-file", metavar="FILE",
                    help="file whose first line is the owner hierarchy's password")
    client_opts(sp)
    sp.set_defaults(func=_cmd_persist)

    sp = sub.add_parser("evict", help="take a persistent key out of the TPM "
                                      "(the broker's administrators only)")
    sp.add_argument("handle", type=_handle, help="persistent handle, 0x81xxxxxx")
    sp.add_argument("--owner-auth-file", metavar="FILE",
                    help="file whose first line is the owner hierarchy's password")
    client_opts(sp)
    sp.set_defaults(func=_cmd_evict)

    sp = sub.add_parser("keys", help="persistent handles and the keys the broker holds")
    sp.add_argument("--json", action="store_true")
    client_opts(sp)
    sp.set_defaults(func=_cmd_keys)

    sp = sub.add_parser("simulator", help="run the embedded simulated TPM alone; prints its TCTI")
    sp.add_argument("--state-dir", default=str(default_state_dir()))
    sp.add_argument("--port", type=int, choices=range(0, 65535), metavar="PORT", default=0,
                    help="command port (control: port+1; default: a free one)")
    sp.set_defaults(func=_cmd_simulator)

    sp = sub.add_parser("provider-path", help="print the path of the OpenSSL provider module")
    sp.set_defaults(func=_cmd_provider_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # Before anything loads an OpenSSL (hashlib, ssl via asyncio, cryptography,
        # tss2-esys all read OPENSSL_CONF once, when they first start OpenSSL).
        _neutral_openssl_conf()
    import termios

    from .errors import TpmBrokerError

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
        print(f"{prog}: {_os_error_text(args, exc)}", file=sys.stderr)
        return 1
    except (EOFError, termios.error):
        print(f"{prog}: no terminal to read from: give the input in a file", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
