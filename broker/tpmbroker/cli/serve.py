"""`tpmbroker serve`, `simulator` and `provider-path`: the broker, the embedded TPM, the
provider module."""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def _tpm(tcti: str | None, state_dir: Path) -> Iterator[tuple[str, Any]]:
    """(TCTI, the embedded Swtpm or None)."""
    if tcti is not None:
        yield tcti, None
        return
    from ..simulator import Swtpm

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

    async def run(tcti: str, simulator: Any) -> None:
        server = BrokerServer(config, TpmWorker(tcti, sessions=args.sessions,
                                                policy_sessions=args.policy_sessions,
                                                pss_padding=args.pss_padding,
                                                da_reserve=args.da_reserve))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_policy)
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

    from ..errors import TpmBrokerError

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

    from ..simulator import Swtpm

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    tpm = Swtpm(Path(args.state_dir) / "tpm", port=args.port, die_with_parent=True).start()
    print(tpm.tcti, flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        tpm.stop()
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
        help="where the embedded simulator keeps its state"),
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

PROVIDER_PATH = Command("provider-path", "print the path of the OpenSSL provider module",
                        _cmd_provider_path)
