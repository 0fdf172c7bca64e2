"""The compatibility suite: tpm2-openssl's documented command lines (tests/compat_flows.py)
replayed against tpmbroker, each with `-provider tpmbroker` alone, with `-provider base` and
with `-provider default`.

One swtpm, tpm2-abrmd in front of it and one broker on that abrmd serve every flow in
sequence, with tpm2-tools beside the broker on the same abrmd: keys persisted, used and evicted
by one flow are followed by the next flow's keys at the same handles, as on a user's machine.
The module's last lines of output count the flows that pass, per variant, and give the TPM's
lockout counter after them.

Run the module whole: some expected failures follow from what earlier flows left at a handle,
and a flow run on its own may pass where it fails in the sequence (a strict expected failure
then reports XPASS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.client import Client
from tpmbroker.paths import provider_path

from .compat_flows import FLOWS, VARIANTS, Expect, Flow, RandomFromTpm, Serve
from .tpmfixtures import Abrmd, Broker, DbusDaemon, have, running_swtpm

pytestmark = pytest.mark.skipif(not (have("tpm2_createak") and have("tpm2-abrmd")),
                                reason="tpm2-tools and tpm2-abrmd are needed")

# TPMBROKER_COMPAT_PROVIDER=tpm2 replays the same table with tpm2-openssl (the system's
# provider, on the same abrmd) in place of tpmbroker: what the flows give where they come from.
# The expected failures are tpmbroker's, so that run has none.
PROVIDER = os.environ.get("TPMBROKER_COMPAT_PROVIDER", "tpmbroker")

TESTDATA = b"testdata: tpm2-openssl's commands, replayed against tpmbroker\n"
COMMAND_TIMEOUT = 120.0


class FlowFailed(AssertionError):
    pass


@dataclasses.dataclass
class CompatWorld:
    dir: Path
    broker: Broker
    env: dict[str, str]
    results: dict[tuple[str, str], str | None]  # (flow, variant) -> None if passed, or why not


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_bus: DbusDaemon,
          request: pytest.FixtureRequest) -> Iterator[CompatWorld]:
    base = tmp_path_factory.mktemp("compat")
    with running_swtpm(base / "tpmstate") as tpm:
        rm = Abrmd(tpm.tcti, base / "abrmd", session_bus, max_connections=100)
        rm.start()
        try:
            with Broker(rm.tcti, base / "broker", env=rm.env()) as broker:
                env = dict(rm.env(), TPM2TOOLS_TCTI=rm.tcti, TPMBROKER_SOCKET=broker.socket,
                           OPENSSL_CONF=os.devnull, TPM2OPENSSL_TCTI=rm.tcti)
                if PROVIDER == "tpmbroker":
                    env["OPENSSL_MODULES"] = str(provider_path().parent)
                compat = CompatWorld(base, broker, env, {})
                yield compat
                _report(request.config, compat)
        finally:
            rm.stop()


def _report(config: pytest.Config, world: CompatWorld) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not world.results:
        return
    lockout = _lockout_counter(world)
    with capture.global_and_fixture_disabled():
        _write_counts(reporter, world.results, lockout)


def _write_counts(reporter: pytest.TerminalReporter,
                  results: dict[tuple[str, str], str | None], lockout: int) -> None:
    reporter.write_line("")
    for (flow, variant), why in results.items():
        if why is not None:
            reporter.write_line(f"compat: {flow} [{variant}] fails: {why}")
    for variant in VARIANTS:
        ran = [why for (_, v), why in results.items() if v == variant]
        if ran:
            passed = sum(why is None for why in ran)
            reporter.write_line(f"compat [{variant}]: {passed} of {len(ran)} flows pass")
    passed = sum(why is None for why in results.values())
    reporter.write_line(f"compat: {passed} of {len(results)} flows pass")
    reporter.write_line(f"compat: the TPM's lockout counter after them: {lockout}")


def _cases() -> list[object]:
    cases: list[object] = []
    for flow in FLOWS:
        for variant in VARIANTS:
            marks: list[pytest.MarkDecorator] = []
            if variant in flow.not_for:
                marks.append(pytest.mark.skip(reason=f"{flow.name} [{variant}]: "
                                                     f"{flow.not_for[variant]}"))
            elif variant in flow.known and PROVIDER == "tpmbroker":
                marks.append(pytest.mark.xfail(strict=True, reason=flow.known[variant]))
            cases.append(pytest.param(flow, variant, marks=marks,
                                      id=f"{flow.name}-{variant}"))
    return cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=COMMAND_TIMEOUT)


def _last_lines(text: str, count: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


@contextlib.contextmanager
def _serving(command: str, cwd: Path, env: dict[str, str], port: int) -> Iterator[None]:
    log_path = cwd / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise FlowFailed(f"`{command}` exited {proc.returncode}: "
                                 + _last_lines(log_path.read_text(errors="replace")))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise FlowFailed(f"`{command}` did not listen on {port} in 30 s")
            time.sleep(0.05)
        yield
    finally:
        from tpmbroker.processes import kill_group
        kill_group(proc)


def _random_bytes(world: CompatWorld) -> int:
    with Client(world.broker.socket) as client:
        value = client.status()["random_bytes"]
    assert isinstance(value, int)
    return value


def run_flow(world: CompatWorld, flow: Flow, variant: str, workdir: Path) -> None:
    """Every step in order; the first that fails (exit code or output) ends the flow."""
    port = _free_port()
    env = dict(world.env, **flow.env)
    (workdir / "testdata").write_bytes(TESTDATA)
    random_before = _random_bytes(world)

    def fill(command: str) -> str:
        command = (command.replace("{providers}", VARIANTS[variant])
                   .replace("{port}", str(port)).replace("{dir}", str(workdir)))
        return command.replace("tpmbroker", PROVIDER)

    with contextlib.ExitStack() as servers:
        for number, step in enumerate(flow.steps, 1):
            if isinstance(step, RandomFromTpm):
                if PROVIDER != "tpmbroker":
                    continue  # the broker's count is no witness for another provider
                grown = _random_bytes(world) - random_before
                if grown < step.count:
                    raise FlowFailed(f"step {number}: the TPM gave {grown} random bytes, "
                                     f"not at least {step.count}")
                continue
            if isinstance(step, Serve):
                servers.enter_context(_serving(fill(step.command), workdir, env, port))
                continue
            command = fill(step.command if isinstance(step, Expect) else step)
            res = _shell(command, workdir, env)
            if res.returncode != 0:
                raise FlowFailed(f"step {number} `{command}` exited {res.returncode}: "
                                 + (_last_lines(res.stderr + res.stdout) or "(no output)"))
            if isinstance(step, Expect) and not re.search(
                    step.output.replace("tpmbroker", PROVIDER), res.stdout + res.stderr):
                raise FlowFailed(f"step {number} `{command}` printed no match for "
                                 f"{step.output!r}: " + _last_lines(res.stdout + res.stderr))


def _tidy_tpm(world: CompatWorld, workdir: Path) -> None:
    """Evict the persistent keys and undefine the NV indices the flow made (the owner's
    ranges), as a user does before putting the next key at the same handle."""
    res = _shell("tpm2_getcap handles-persistent", workdir, world.env)
    for handle in re.findall(r"0x81[0-9a-fA-F]{6}", res.stdout):
        _shell(f"tpm2_evictcontrol -C o -c {handle}", workdir, world.env)
    res = _shell("tpm2_getcap handles-nv-index", workdir, world.env)
    for index in re.findall(r"0x1[0-3][0-9a-fA-F]{5}\b", res.stdout):
        _shell(f"tpm2_nvundefine -C o {index}", workdir, world.env)


@pytest.mark.parametrize(("flow", "variant"), _cases())
def test_compat(world: CompatWorld, flow: Flow, variant: str) -> None:
    workdir = world.dir / f"{flow.name}-{variant}"
    workdir.mkdir()
    try:
        run_flow(world, flow, variant, workdir)
    except Exception as failure:
        world.results[(flow.name, variant)] = str(failure) or repr(failure)
        raise
    finally:
        _tidy_tpm(world, workdir)
    world.results[(flow.name, variant)] = None


def _lockout_counter(world: CompatWorld) -> int:
    res = _shell("tpm2_getcap properties-variable", world.dir, world.env)
    assert res.returncode == 0, res.stderr
    found = re.search(r"TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-fA-F]+|\d+)", res.stdout)
    assert found is not None, res.stdout
    return int(found.group(1), 0)


def test_the_flows_spent_no_lockout_try(world: CompatWorld) -> None:
    """After every flow above, in sequence on one TPM: no try counted toward the TPM's
    dictionary-attack lockout (every password given was right)."""
    if not world.results:
        pytest.skip("no flow ran before this test: run the module whole")
    assert _lockout_counter(world) == 0
