"""Every shell and Python block of README.md and docs/*.md runs as written, in order per
file, in a temporary directory, against a broker on swtpm (the embedded default's TPM).

The convention, parsed here by a small fence parser (docs/architecture.md, "The docs
test"):
- ```sh and ```python blocks run; ```console blocks run each `$ ` command and compare
  what it prints (stdout and stderr) with the lines below it, where `...` stands for any
  text, and a line of its own `...` for any lines. Other blocks (ini, nginx, toml, layout
  sketches, untagged) are not commands.
- A block that cannot run here is marked, visibly, by the paragraph line just before it:
  `*Not run by the docs test: REASON.*`
- Shell blocks of a file share one shell's exported variables (each block runs in a bash
  that starts from what the previous one exported) and the directory; each Python block
  is a script of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .tpmfixtures import Broker, CertifiedTpm, running_swtpm

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("sh", "console", "python")
NOT_RUN = re.compile(r"^\*Not run by the docs test: (.+)\.\*$")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when marked

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the mark before each."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        mark = NOT_RUN.match(previous.strip())
        out.append(Block(path, start + 1, match.group(1), "\n".join(body) + "\n",
                         mark.group(1) if mark else None))
        i += 1
    return out


def test_marks_are_few_and_say_why() -> None:
    marked = [b for path in DOCS for b in blocks(path) if b.lang in RUN and b.not_run]
    ran = [b for path in DOCS for b in blocks(path) if b.lang in RUN and not b.not_run]
    assert len(marked) * 3 < len(ran), [b.where() for b in marked]
    for block in marked:
        assert len(block.not_run or "") > 8, block.where()


def test_shell_commands_are_tagged() -> None:
    """A block of commands without a language would be skipped silently."""
    for path in DOCS:
        for block in blocks(path):
            if block.lang == "":
                first = block.text.split(" ", 1)[0]
                assert first not in ("tpmbroker", "openssl", "$", "nginx", "curl",
                                     "python", "sudo"), block.where()


class Shell:
    """bash runs for one file: one directory, exported variables carried from block to
    block, every process a block leaves running stopped at the end."""

    def __init__(self, base: Path, socket: str) -> None:
        self.dir = base / "work"
        self.dir.mkdir()
        # The docs speak from the checkout's root, where set-up made .venv and where the
        # benchmark harness lives (`python -m benchmarks`).
        (self.dir / ".venv").symlink_to(Path(sys.executable).parent.parent)
        (self.dir / "benchmarks").symlink_to(ROOT / "benchmarks")
        self.state = base / "exported.sh"
        bindir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENSSL_CONF", "TPMBROKER_SOCKET", "VIRTUAL_ENV")}
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["TPMBROKER_SOCKET"] = socket  # what the broker the test started listens on
        env["HOME"] = str(self.dir)
        env["PORT"] = str(free_port())  # docs/nginx.md takes it; 8443 may be in use here
        self.env = env
        self.groups: list[int] = []

    def run(self, script: str, strict: bool = True) -> subprocess.CompletedProcess[str]:
        prelude = (("set -euo pipefail\n" if strict else "")
                   + f'[ -f "{self.state}" ] && . "{self.state}"\n'
                   + f"trap 'export -p > \"{self.state}\"' EXIT\n")
        # Output to a file, not a pipe: a process the block leaves running in the
        # background (the broker) keeps its descriptors, and a pipe would never end.
        log = self.state.with_name("output.txt")
        with log.open("w") as out:
            proc = subprocess.Popen(["bash", "-c", prelude + script], cwd=self.dir,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.groups.append(proc.pid)
            proc.wait(timeout=120)
        output = log.read_text(errors="replace")
        return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if self.state.exists():  # what the shell blocks exported, e.g. TPMBROKER_SOCKET
            for match in re.finditer(r'^declare -x (\w+)="(.*)"$', self.state.read_text(),
                                     re.M):
                env[match.group(1)] = match.group(2)
        return subprocess.run([sys.executable, "-"], input=code, cwd=self.dir, env=env,
                              capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                continue
        # Daemons leave their process group (nginx): find them by the directory.
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(self.dir).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def console_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block."""
    command: list[str] = []
    expected: list[str] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            if command:
                yield "\n".join(command), expected
            command, expected = [line[2:]], []
        elif command and command[-1].endswith("\\") and not expected:
            command.append(line)
        else:
            expected.append(line)
    if command:
        yield "\n".join(command), expected


def output_matches(expected: list[str], actual: str) -> bool:
    pattern = ""
    for line in expected:
        if line.strip() == "...":
            pattern += r"(?:.*\n)*?"
        else:
            pattern += re.escape(line.rstrip()).replace(re.escape("..."), ".*") + r"\n"
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return re.fullmatch(pattern, text) is not None


# Files whose blocks attest keys: their TPM has EK certificates from a local CA, which
# the broker verifies (--ek-ca), and the blocks find those anchors in $EK_CA. The others
# run on a plain swtpm, whose `tpmbroker keys` lists no EKs persisted by swtpm_setup.
CERTIFIED_DOCS = ("docs/attestation.md", "docs/python.md")


def run_file(path: Path, base: Path, certified: CertifiedTpm) -> tuple[int, int]:
    """Run the blocks of one file; (blocks run, blocks marked)."""
    ran = marked = 0
    args: tuple[str, ...] = ()
    state = base / "tpm"
    if str(path.relative_to(ROOT)) in CERTIFIED_DOCS:
        args = ("--ek-ca", str(certified.anchors))
        certified.copy(state)
    with running_swtpm(state) as tpm, Broker(tpm.tcti, base / "broker",
                                             extra_args=args) as broker:
        shell = Shell(base, broker.socket)
        if args:
            shell.env["EK_CA"] = args[1]
        try:
            for block in blocks(path):
                if block.lang not in RUN:
                    continue
                if block.not_run:
                    marked += 1
                    continue
                ran += 1
                if block.lang == "sh":
                    out = shell.run(block.text)
                    assert out.returncode == 0, f"{block.where()}\n{block.text}\n{out.stdout}"
                elif block.lang == "python":
                    res = shell.python(block.text)
                    assert res.returncode == 0, f"{block.where()}\n{res.stdout}{res.stderr}"
                else:
                    for command, expected in console_commands(block.text):
                        out = shell.run(command, strict=False)
                        assert "Traceback" not in out.stdout, (block.where(), out.stdout)
                        assert output_matches(expected, out.stdout), (
                            f"{block.where()}: $ {command}\nexpected:\n" + "\n".join(expected)
                            + f"\ngot:\n{out.stdout}")
        finally:
            shell.stop()
    return ran, marked


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_runs_as_written(path: Path, tmp_path: Path, certified_tpm: CertifiedTpm) -> None:
    runnable = [b for b in blocks(path) if b.lang in RUN]
    if not runnable:
        pytest.skip("no shell or Python blocks")
    if all(b.not_run for b in runnable):
        pytest.skip(f"all {len(runnable)} blocks marked: "
                    + "; ".join(sorted({str(b.not_run) for b in runnable})))
    ran, marked = run_file(path, tmp_path, certified_tpm)
    print(f"{path.relative_to(ROOT)}: {ran} blocks run, {marked} marked")
    assert ran == len(runnable) - marked


@pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx")
def test_nginx_samples_pass_nginx_t(broker: Broker, tmp_path: Path) -> None:
    """docs/nginx.md's openssl.cnf and nginx.conf for a server, with this machine's paths
    for the module, the socket and the key: `nginx -t` accepts them and loads the key."""
    from tpmbroker.client import Client
    from tpmbroker.keyfile import der_to_pem
    from tpmbroker.paths import provider_path
    from tpmbroker.protocol import Curve, KeyType

    samples = {b.lang: b.text for b in blocks(ROOT / "docs" / "nginx.md")
               if b.lang == "nginx" or (b.lang == "ini" and "[tpmbroker_sect]" in b.text)}
    tls = tmp_path / "tls"
    tls.mkdir()
    with Client(broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
    (tls / "site.key").write_bytes(der_to_pem(der))
    subprocess.run(["openssl", "req", "-new", "-x509", "-provider-path",
                    str(provider_path().parent), "-provider", "default", "-provider",
                    "tpmbroker", "-key", str(tls / "site.key"), "-subj", "/CN=site",
                    "-out", str(tls / "site.crt")], check=True, capture_output=True,
                   env=dict(os.environ, TPMBROKER_SOCKET=broker.socket), timeout=60)
    cnf = re.sub(r"(?m)^module = .*$", f"module = {provider_path()}", samples["ini"])
    cnf = cnf.replace("/run/tpmbroker/tpmbroker.sock", broker.socket)
    (tmp_path / "openssl.cnf").write_text(cnf)
    (tmp_path / "nginx.conf").write_text(samples["nginx"].replace("/etc/nginx/tls", str(tls)))
    out = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                          "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, OPENSSL_CONF=str(tmp_path / "openssl.cnf")))
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
