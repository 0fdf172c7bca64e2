"""The broker admits the users it is told to, by peer credentials, and says no to others.

The socket is left world-writable here so that the kernel lets every user connect and the
broker's own check (SO_PEERCRED against --allow-uid/--allow-gid) is what decides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tpmbroker.client import Client
from tpmbroker.keyfile import der_to_pem
from tpmbroker.paths import provider_path
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root to run a client as www-data")


def sign_as_www_data(broker: Broker, key: Path, data: Path) -> subprocess.CompletedProcess[str]:
    module_dir = str(provider_path().parent)
    return subprocess.run(
        ["runuser", "-u", "www-data", "--", "openssl", "dgst", "-sha256",
         "-provider-path", module_dir, "-provider", "default", "-provider", "tpmbroker",
         "-sign", str(key), "-out", os.devnull, str(data)],
        env=dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull),
        capture_output=True, text=True, timeout=60)


def setup_key(broker: Broker, world: Path) -> tuple[Path, Path]:
    with Client(broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
    key = world / "key.pem"
    key.write_bytes(der_to_pem(der))
    key.chmod(0o644)
    data = world / "data"
    data.write_text("who may sign\n")
    data.chmod(0o644)
    return key, data


@pytest.mark.parametrize("admit", [(), ("--allow-uid", "www-data"),
                                   ("--allow-gid", "www-data")])
def test_only_admitted_users_sign(swtpm: Swtpm, world_dir: Path,
                                  admit: tuple[str, ...]) -> None:
    run = world_dir / "run"
    run.mkdir(mode=0o755)
    broker = Broker(swtpm.tcti, run, extra_args=("--socket-mode", "666", *admit)).start()
    try:
        key, data = setup_key(broker, world_dir)
        out = sign_as_www_data(broker, key, data)
        with Client(broker.socket) as client:
            refused = int(str(client.status()["refused_peers"]))
        if admit:
            assert out.returncode == 0, out.stderr
            assert refused == 0
        else:
            assert out.returncode != 0
            assert "does not admit this process" in out.stderr, out.stderr
            assert refused >= 1
            assert "refused pid" in broker.log()
    finally:
        broker.stop()
