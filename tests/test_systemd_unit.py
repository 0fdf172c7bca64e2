"""The shipped service files (contrib/systemd) are valid for systemd, and the Debian
package (debian/) says the version the program does.

Not under a top-level packaging/: the in-tree build backend puts the repo root on
sys.path, where such a directory would shadow the `packaging` library."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # Installed as docs/nginx.md says: the command's path from this installation.
    exe = str(Path(sys.executable).parent / "tpmbroker")
    subprocess.run(["sh", "-c", 'sed "s|@TPMBROKER@|$(command -v tpmbroker)|" "$1" > "$2"',
                    "sh", str(ROOT / "contrib" / "systemd" / "tpmbroker.service"),
                    str(tmp_path / "tpmbroker.service")], check=True,
                   env={**os.environ, "PATH": f"{Path(exe).parent}:{os.environ['PATH']}"})
    unit = (tmp_path / "tpmbroker.service").read_text()
    assert f"ExecStart={exe} serve" in unit and "@TPMBROKER@" not in unit
    # --man=no: the pages Documentation= names come with the Debian package
    # (tests/test_debian_package.py reads them there).
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          str(tmp_path / "tpmbroker.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tpmbroker.service" not in out.stderr, out.stderr  # no warning about our unit


def test_unit_reads_the_config_that_admits_nginx_users() -> None:
    from tpmbroker.cli import build_parser
    from tpmbroker.cli.config import with_config
    from tpmbroker.cli.serve import SERVE

    unit = (ROOT / "contrib" / "systemd" / "tpmbroker.service").read_text()
    assert "ExecStart=@TPMBROKER@ serve --config /etc/tpmbroker/tpmbroker.conf\n" in unit
    assert "Environment=OPENSSL_CONF=/dev/null" in unit
    # The shipped config, read as the unit's ExecStart reads it.
    config = str(ROOT / "contrib" / "tpmbroker.conf")
    args = build_parser().parse_args(with_config(["serve", "--config", config], SERVE, config))
    assert args.allow_uid == ["root", "www-data"]
    assert args.socket == "/run/tpmbroker/tpmbroker.sock"
    assert args.tcti == "device:/dev/tpmrm0"
    assert (args.socket_mode, args.socket_group) == (0o660, "www-data")
    # Giving the socket to www-data needs the broker in that group.
    groups = next(line for line in unit.splitlines() if line.startswith("SupplementaryGroups="))
    assert "www-data" in groups.split("=", 1)[1].split()


def test_unit_stop_timeout_fits_the_brokers_orderly_stop() -> None:
    from tpmbroker import server

    unit = (ROOT / "contrib" / "systemd" / "tpmbroker.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    bound = server.DRAIN_SECONDS + server.FLUSH_SECONDS + server.CLOSE_SECONDS + server.JOIN_SECONDS
    assert float(settings["TimeoutStopSec"]) >= bound + 5
    assert settings["KillMode"] == "mixed"  # SIGTERM reaches the broker, not its swtpm first


def test_the_package_version_is_the_programs() -> None:
    from tpmbroker import __version__

    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"tpmbroker ({__version__}) ")
    assert f'version = "{__version__}"' in (ROOT / "pyproject.toml").read_text()
