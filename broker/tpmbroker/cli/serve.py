"""`tpmbroker serve`, `simulator` and `provider-path`: the broker, the embedded TPM, the
provider module."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import grp
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..paths import EK_PIN_FILE as PIN_FILE
from ..paths import default_socket, default_state_dir, provider_path
from .common import Command, UsageError, arg, octal_mode, positive


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


@dataclasses.dataclass
class Tpm:
    """The TPM `serve` and `enroll` use: its TCTI, and for the embedded simulator the
    Swtpm and its EK CA's root (None for a state made before EK certificates)."""

    tcti: str
    simulator: Any = None
    ek_ca: Path | None = None


@contextlib.contextmanager
def _tpm(tcti: str | None, state_dir: Path) -> Iterator[Tpm]:
    if tcti is not None:
        yield Tpm(tcti)
        return
    from ..simulator import Swtpm, local_ca_root, provision, provisioned

    tpm_dir, ca_dir = state_dir / "tpm", state_dir / "ek-ca"
    if not provisioned(tpm_dir):
        # A new embedded TPM gets EK certificates like a real one, from a local CA:
        # the default is then verified too.
        provision(tpm_dir, ca_dir)
    root = local_ca_root(ca_dir)
    tpm = Swtpm(tpm_dir, die_with_parent=True).start()
    print(f"tpmbroker: no TPM device; embedded simulator at {tpm.tcti}, state in {state_dir}",
          file=sys.stderr)
    try:
        yield Tpm(tpm.tcti, tpm, root if root.exists() else None)
    finally:
        tpm.stop()


def _trust(args: argparse.Namespace, tpm: Tpm) -> tuple[Any, str]:
    """The TrustConfig of --ek-ca, the pin file and --tpm-unverified, and why the
    broker would run unverified without them. UsageError for an unreadable anchor or
    pin."""
    from ..ek_trust import EkTrustError, TrustConfig, load_anchors, read_pin

    trust = TrustConfig(unverified=args.tpm_unverified)
    anchors = args.ek_ca or (str(tpm.ek_ca) if tpm.ek_ca is not None else None)
    pin_path = Path(args.ek_pin) if args.ek_pin else Path(args.state_dir) / PIN_FILE
    try:
        if anchors is not None:
            trust.anchors = load_anchors(anchors)
            trust.anchors_source = anchors
        trust.pin = read_pin(pin_path)
    except EkTrustError as exc:
        option = "--ek-ca" if anchors is not None and not trust.anchors else "--ek-pin"
        raise UsageError(f"{option}: {exc}") from None
    trust.pin_path = str(pin_path)
    reason = ""
    if tpm.simulator is not None and tpm.ek_ca is None and not args.ek_ca:
        reason = ("the embedded simulator's state was made before it had EK "
                  "certificates; pin it with `tpmbroker enroll`, or start from a new "
                  "--state-dir")
    return trust, reason


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
    from ..tss2log import capture_stderr

    capture_stderr()
    from ..server import BrokerServer, ServerConfig
    from ..tpm import TpmWorker

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
        socket_path=args.socket or default_socket(serving=True),
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
        metrics_file=args.metrics_file,
        metrics_interval=args.metrics_interval,
    )
    if args.policy is not None:
        from ..access import AccessPolicyError, load_policy

        try:
            config.policy = load_policy(args.policy)
            config.policy_path = args.policy
        except AccessPolicyError as exc:
            print(f"tpmbroker serve: --policy {exc}", file=sys.stderr)
            return 2
        logging.getLogger("tpmbroker.server").info(
            "key policy %s: %d key(s), default %s", args.policy, len(config.policy.rules),
            config.policy.default_name)

    async def run(tcti: str, simulator: Any, trust: Any, unverified_reason: str) -> None:
        server = BrokerServer(config, TpmWorker(tcti, sessions=args.sessions,
                                                policy_sessions=args.policy_sessions,
                                                pss_padding=args.pss_padding,
                                                da_reserve=args.da_reserve, trust=trust,
                                                unverified_reason=unverified_reason))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_policy)
        await server.start()
        # What start-up made (modules, tables, the TPM's state) lives as long as the
        # broker: frozen out of the cycle collector's sight, a full pass walks only what
        # came after, not some 40,000 objects with the event loop stopped.
        gc.collect()
        gc.freeze()
        watchdog = None
        if simulator is not None:
            watchdog = loop.create_task(
                _keep_simulator_running(simulator, logging.getLogger("tpmbroker.simulator")))
        identity = server.worker.identity
        print(f"tpmbroker: serving on {server.socket_path} ({tcti}, {args.sessions} sessions, "
              f"TPM {identity.mode if identity else 'unverified'})", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            await server.stop(drain=args.drain_timeout)

    from ..errors import TpmBrokerError

    tcti = resolve_tcti(args.tcti)
    try:
        with _tpm(tcti, Path(args.state_dir)) as tpm:
            trust, unverified_reason = _trust(args, tpm)
            asyncio.run(run(tpm.tcti, tpm.simulator, trust, unverified_reason))
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

    from ..simulator import Swtpm

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    from ..simulator import local_ca_root, provision, provisioned

    state_dir = Path(args.state_dir)
    if not provisioned(state_dir / "tpm"):
        provision(state_dir / "tpm", state_dir / "ek-ca")
    tpm = Swtpm(state_dir / "tpm", port=args.port, die_with_parent=True).start()
    if local_ca_root(state_dir / "ek-ca").exists():
        print(f"tpmbroker: EK certificates signed by {local_ca_root(state_dir / 'ek-ca')}",
              file=sys.stderr)
    print(tpm.tcti, flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        tpm.stop()
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    import time

    from tpm2_pytss.constants import TPM2_ALG

    from ..ek_trust import EkTrustError, read_pin, write_pin
    from ..tpm import endorsement
    from ..tpm.link import Link

    state_dir = Path(args.state_dir)
    pin_path = Path(args.ek_pin) if args.ek_pin else state_dir / PIN_FILE
    if args.kind is not None and args.kind not in endorsement.KINDS:
        raise UsageError(f"--kind {args.kind}: one of {', '.join(endorsement.KINDS)}")
    try:
        old = read_pin(pin_path)
    except EkTrustError as exc:
        if not args.force:
            raise UsageError(f"{exc}; --force replaces it") from None
        old = None
    with _tpm(resolve_tcti(args.tcti), state_dir) as tpm:
        link = Link(tpm.tcti)
        try:
            link.connect(time.monotonic() + args.timeout)
            link.flush_leftovers()
            pin = endorsement.enroll(
                link.require(), lambda template: endorsement.create(link.ectx, template),
                link.ectx.flush_context, args.kind, link.has_algorithm(TPM2_ALG.ECC))
        finally:
            link.close()
    if old is not None and old.public_key == pin.public_key:
        print(f"tpmbroker enroll: this TPM's EK ({old.kind}, {old.fingerprint}) is pinned "
              f"in {pin_path} already")
        return 0
    if old is not None and not args.force:
        print(f"tpmbroker enroll: {pin_path} pins another EK ({old.fingerprint}) than this "
              f"TPM's ({pin.fingerprint}); --force replaces it", file=sys.stderr)
        return 1
    write_pin(pin_path, pin)
    print(f"tpmbroker enroll: pinned this TPM's EK ({pin.kind}, {pin.fingerprint}) in "
          f"{pin_path}\n"
          "Trust on first use: nothing vouches for this key but the TPM's answer now. "
          "`tpmbroker serve` with the same --state-dir refuses a TPM that answers "
          "another EK from now on.")
    return 0


def _cmd_provider_path(args: argparse.Namespace) -> int:
    path = provider_path()
    if not path.exists():
        print(f"tpmbroker: provider module missing at {path}; reinstall the package",
              file=sys.stderr)
        return 1
    print(path)
    return 0


SERVE = Command("serve", "run the broker", _cmd_serve, (
    arg("--config", metavar="FILE",
        help="read settings from FILE: TOML whose keys are these options' names without "
             "dashes (tpmbroker.conf(5)); options typed here override it, repeatable "
             "ones add to it"),
    arg("--socket", help="socket path (default as for the clients)"),
    arg("--tcti", help="TPM to use (default: $TPMBROKER_TCTI, /dev/tpmrm0, "
        "else an embedded simulator)"),
    arg("--sessions", type=int, default=2, help="HMAC sessions in the pool (1-3)"),
    arg("--policy-sessions", type=int, default=1,
        help="policy sessions for keys with a policy (1-2; docs/keys.md); with "
             "--sessions, at most 3 in all, the loaded sessions a TPM holds"),
    arg("--allow-uid", action="append", default=[], metavar="UID",
        help="user (name or number) allowed to connect; repeatable"),
    arg("--allow-gid", action="append", default=[], metavar="GID",
        help="group (name or number) allowed to connect; repeatable"),
    arg("--admin-uid", action="append", default=[], metavar="UID",
        help="user allowed to persist and evict keys, besides root and the "
             "broker's own user; repeatable (docs/security.md)"),
    arg("--admin-gid", action="append", default=[], metavar="GID",
        help="group allowed to persist and evict keys; repeatable"),
    arg("--da-reserve", type=int, default=1, metavar="N",
        help="dictionary-attack counts the broker keeps unused below the TPM's "
             "maxTries: password attempts on DA-protected keys are refused "
             "when one more failure would leave fewer (default 1; docs/broker.md)"),
    arg("--pss-padding", choices=["auto", "tpm", "broker"], default="auto",
        help="RSA-PSS: the TPM's own (tpm), padded by the broker with salt = "
        "digest length and a raw RSA operation in the TPM (broker), or the "
        "TPM's own unless its first signature shows another salt (auto)"),
    arg("--socket-mode", type=octal_mode, default="660",
        help="octal permissions (default 660)"),
    arg("--socket-group", help="group owning the socket"),
    arg("--state-dir", default=str(default_state_dir()),
        help="where the embedded simulator keeps its state, and the EK pin"),
    arg("--ek-ca", metavar="FILE|DIR",
        help="trust anchors for the TPM's EK certificate (PEM or DER, a file or a "
             "directory of them): the TPM is refused unless its EK certificate "
             "chains to one and certifies the EK it makes (docs/security.md)"),
    arg("--ek-pin", metavar="FILE",
        help=f"the EK pin `tpmbroker enroll` wrote (default STATE_DIR/{PIN_FILE}); "
             "when present, a TPM with another EK is refused"),
    arg("--tpm-unverified", action="store_true",
        help="run without checking the TPM's identity even though --ek-ca or a pin "
             "is given (off by default; STATUS says `unverified`)"),
    arg("--timeout", type=positive(float), default=30.0,
        help="default request deadline in seconds"),
    arg("--drain-timeout", type=float, default=5.0,
        help="on SIGTERM/SIGINT, seconds to serve requests already received "
        "before answering the rest SHUTTING_DOWN (default 5)"),
    arg("--max-keys-per-connection", type=int, default=1024,
        help="keys one client connection may have loaded at once (default 1024)"),
    arg("--frame-timeout", type=float, default=5.0, metavar="SECONDS",
        help="close a connection whose frame stays incomplete this long "
             "(default 5)"),
    arg("--policy", metavar="FILE",
        help="per-key access control, TOML (docs/security.md)"),
    arg("--metrics-file", metavar="FILE",
        help="write Prometheus metrics to FILE (a .prom file in node_exporter's "
             "textfile directory; docs/broker.md, Metrics)"),
    arg("--metrics-interval", type=float, default=15.0, metavar="SECONDS",
        help="how often the metrics file is written (default 15)"),
    arg("--usage-interval", type=float, default=3600.0, metavar="SECONDS",
        help="how often the audit log sums up who signed with which key "
             "(default 3600)"),
    arg("--log-level", default="info", choices=["debug", "info", "warning", "error"]),
))

SIMULATOR = Command(
    "simulator", "run the embedded simulated TPM alone; prints its TCTI", _cmd_simulator, (
        arg("--state-dir", default=str(default_state_dir())),
        arg("--port", type=int, choices=range(0, 65535), metavar="PORT", default=0,
            help="command port (control: port+1; default: a free one)"),
    ))

ENROLL = Command(
    "enroll", "pin the TPM's endorsement key for later starts (trust on first use)",
    _cmd_enroll, (
        arg("--tcti", help="TPM to use (as for serve); not while a broker uses it"),
        arg("--state-dir", default=str(default_state_dir()),
            help="the broker's state directory: the pin goes there"),
        arg("--ek-pin", metavar="FILE", help=f"the pin file (default STATE_DIR/{PIN_FILE})"),
        arg("--kind", metavar="TEMPLATE",
            help="the EK template to pin: EK-ECC256, EK-RSA2048, ... (default: the first "
                 "with a certificate, else EK-ECC256)"),
        arg("--force", action="store_true", help="replace a pin of another EK"),
        arg("--timeout", type=positive(float), default=30.0,
            help="seconds to wait for the TPM"),
    ))

PROVIDER_PATH = Command("provider-path", "print the path of the OpenSSL provider module",
                        _cmd_provider_path)

# In the order `tpmbroker --help` lists them (tpmbroker.cli gathers every module's).
COMMANDS = (SERVE, ENROLL, SIMULATOR, PROVIDER_PATH)
