"""The Debian package (debian/), built with dpkg-buildpackage in a clean Debian 12 and a
clean Debian 13 root (scripts/debian13.sh, fresh overlays of its cached roots), installed
in another fresh one, and used there as a user would: the broker started as the unit's
ExecStart says, as the packaged user, against swtpm (systemd is not PID 1 in a root);
`openssl dgst -provider tpmbroker` alone signs, with no -provider-path and no
environment; `man` reads the pages; remove keeps the config and the state, purge takes
them. tests/debian_package_check.sh is what runs inside.

The .deb of a tree is cached by a hash of the files that go into it (under
$TPMBROKER_CI_CACHE/packages), so a second run only installs. Runs as root from the
host, as CI's Debian 12 leg does; inside CI's Debian 13 root it is skipped (that root is
where it would build)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TPMBROKER_CI_CACHE", "/var/cache/tpmbroker-ci"))
# Python of each release, which the package's private environment is bound to.
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, mounts, chroot)"),
    pytest.mark.skipif(Path("/.tpmbroker-root-complete").exists(),
                       reason="inside CI's Debian root: the host's leg builds and installs"),
    pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                       reason="needs the git checkout (debian13.sh copies what git lists)"),
]


def tree_hash() -> str:
    """Of the files a package is built from (not the tests, not the benchmarks)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(n.decode() for n in names if n):
        if name.startswith(("tests/", "benchmarks/")) or not (ROOT / name).is_file():
            continue
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def in_root(suite: str, out: Path, *command: str,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPMBROKER_CI_SUITE": suite, "TPMBROKER_CI_OUT": str(out)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "debian13.sh"), "--shell",
                           *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# The version debian/changelog gives, and the one an upgrade goes to.
VERSION = (ROOT / "debian" / "changelog").read_text().split("(", 1)[1].split(")", 1)[0]
NEXT = f"{VERSION}+1"


def package(suite: str, version: str | None = None) -> Path:
    """The directory holding this tree's .deb for `suite` (and, given `version`, the same
    tree built as that version), built there if not cached."""
    out = CACHE / "packages" / f"{suite}-{tree_hash()}"
    if not list(out.glob(f"tpmbroker_{VERSION}_*.deb")):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        built = in_root(suite, out, "bash", "scripts/package.sh", "/out")
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    if version is not None and not list(out.glob(f"tpmbroker_{version}_*.deb")):
        built = in_root(suite, out, "bash", "scripts/package.sh", "--version", version, "/out")
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    for old in out.parent.glob(f"{suite}-*"):  # other trees' packages
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return out


def free_port_pair() -> int:
    """A port P with P+1 free too (swtpm's command and control ports)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no two free ports in a row")


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_package_installs_signs_and_goes(suite: str) -> None:
    out = package(suite)
    ran = in_root(suite, out, "bash", "tests/debian_package_check.sh", str(free_port_pair()))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    checks = dict(re.findall(r"(?m)^check: (\S+) ?(.*)$", ran.stdout))
    print(ran.stdout)  # the run, for the record (pytest -s)

    assert checks["installed"] == VERSION
    assert checks["user"].split(",") == ["tpmbroker", "tss"]
    # the provider is in OpenSSL's own modules directory, the command finds it there
    assert checks["modules_dir"] == "/usr/lib/x86_64-linux-gnu/ossl-modules"
    assert checks["module"] == "yes"
    assert checks["provider_path"] == (f"/usr/lib/tpmbroker/lib/python{PYTHON[suite]}/"
                                       "site-packages/tpmbroker/tpmbroker.so")
    # byte code made on install (the package carries none)
    assert int(checks["byte_code"]) >= 5
    # sysusers and tmpfiles entries took effect; the config is a conffile
    assert checks["runtime_dir"] == "tpmbroker:755"
    assert checks["state_dir"] == "tpmbroker:700"
    assert checks["conffile"] == "/etc/tpmbroker/tpmbroker.conf"
    # the unit's command, as its user, made the socket the config asks for
    assert checks["exec_start"] == "/usr/bin/tpmbroker serve --config /etc/tpmbroker/tpmbroker.conf"
    assert checks["socket"] == "tpmbroker:www-data:660"
    assert checks["broker_log"] == "1"
    # `openssl dgst -provider tpmbroker` alone signed through the broker; openssl verified
    assert checks["verify"] == "Verified OK"
    assert checks["signatures"] == "1"
    for page, title in (("tpmbroker", "TPMBROKER(1)"), ("tpmbroker.conf", "TPMBROKER.CONF(5)"),
                        ("provider-tpmbroker", "PROVIDER-TPMBROKER(7)")):
        assert checks[f"man_{page}"].split()[0] == title
    # remove: the programs go, config and state stay; purge: those go too
    assert checks["removed"] == "deinstall ok config-files"
    assert checks["after_remove"] == "cmd=no module=no unit=no venv=no conf=yes state=yes"
    assert checks["purged"] == "not-installed"
    assert checks["after_purge"] == "conf=no state=no venv=no"
    # enabled on install only where /dev/tpmrm0 exists; purge forgets it
    assert checks["enabled_without_tpm"] == "no"
    assert checks["enabled_with_tpm"] == "yes"
    assert checks["enabled_after_purge"] == "no"


def test_an_upgrade_while_clients_sign_fails_no_signature() -> None:
    """Version N installed and serving; while 8 Python client threads (`tpmbroker load`)
    and 8 C threads of one process through the provider (benchmarks/loadgen.c, as nginx
    workers sign) sign, N+1 is installed and the broker restarted as postinst has
    systemd do (SIGTERM, then ExecStart again)."""
    suite = "trixie"
    out = package(suite, NEXT)
    ran = in_root(suite, out, "bash", "tests/debian_package_check.sh", str(free_port_pair()),
                  "upgrade")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    checks = dict(re.findall(r"(?m)^check: (\S+) ?(.*)$", ran.stdout))
    print(ran.stdout)
    assert (checks["installed"], checks["upgraded"]) == (VERSION, NEXT)
    assert checks["broker_starts"] == "2"
    # the restart and the new broker's start fell inside both loads' 30 s
    assert (checks["signing_at_restart"], checks["signing_after_restart"]) == ("yes", "yes")
    load = re.fullmatch(r"8 clients, .* (\d+) signatures .*, (\d+) failed, (\d+) bad;.*",
                        checks["load"])
    assert load is not None, checks["load"]
    assert int(load[1]) > 0 and (load[2], load[3]) == ("0", "0"), checks["load"]
    threads, signed, failed, bad = map(int, checks["provider_load"].split())
    assert threads == 8 and signed > 0, checks
    assert (failed, bad) == (0, 0), (checks["provider_load"], checks["provider_errors"])
