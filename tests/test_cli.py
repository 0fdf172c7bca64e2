"""The `tpmbroker` command: embedded simulator default, provider path, errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpmbroker.client import Client
from tpmbroker.errors import TpmBrokerError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.load import verify
from tpmbroker.paths import provider_path
from tpmbroker.protocol import Curve, Hash, KeyType, Scheme
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPMBROKER, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_provider_path_points_at_the_built_module() -> None:
    out = run("provider-path")
    assert out.returncode == 0
    path = Path(out.stdout.strip())
    assert path.is_absolute() and path.name == "tpmbroker.so" and path.is_file()


@pytest.mark.skipif(Path("/dev/tpmrm0").exists(), reason="a TPM device is the default here")
def test_embedded_simulator_is_the_default_and_keeps_its_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TPMBROKER_TCTI"}
    state = tmp_path / "state"
    sock = str(tmp_path / "broker.sock")

    def start() -> subprocess.Popen[bytes]:
        # No --tcti: the broker starts (and owns) its simulator in the state directory.
        proc = subprocess.Popen([TPMBROKER, "serve", "--socket", sock, "--state-dir",
                                 str(state)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with Client(sock, timeout=2) as client:
                    client.hello()
                    return proc
            except Exception:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("broker with embedded simulator did not start")

    proc = start()
    try:
        with Client(sock) as client:
            der, _ = client.generate_key(KeyType.EC, Curve.P256)
            status = client.status()
            assert str(status["tcti"]).startswith("swtpm:host=127.0.0.1")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert (state / "tpm" / "tpm2-00.permall").exists()
    proc = start()  # same state: the key made before still loads and signs
    try:
        with Client(sock, timeout=20) as client:
            key = client.load_key(der_to_pem(der))
            assert client.sign(key, bytes(32))
            # The embedded TPM dies: the broker starts it again and keeps serving.
            (swtpm_pid,) = swtpm_pids(state)
            os.kill(swtpm_pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert client.sign(key, bytes(32))
                    break
                except TpmBrokerError:
                    assert time.monotonic() < deadline, "no signature after the restart"
                    time.sleep(0.2)
            assert swtpm_pids(state) != [swtpm_pid]
            assert int(str(client.status()["tpm_restarts_recovered"])) >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert swtpm_pids(state) == []


def swtpm_pids(state: Path) -> list[int]:
    """swtpm processes running on this state directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"swtpm") and any(
                    str(state).encode() in arg for arg in cmdline):
                pids.append(int(entry.name))
    return pids


def test_client_commands_name_the_socket_when_the_broker_is_down(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    out = run("status", "--socket", sock)
    assert out.returncode == 1
    assert sock in out.stderr and "tpmbroker serve" in out.stderr


def test_simulator_command_runs_a_tpm(tmp_path: Path) -> None:
    proc = subprocess.Popen([TPMBROKER, "simulator", "--state-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tcti = proc.stdout.readline().strip()
        assert tcti.startswith("swtpm:host=127.0.0.1,port=")
        from tpm2_pytss import ESAPI, TCTILdr

        with ESAPI(TCTILdr.parse(tcti)) as ectx:
            assert len(ectx.get_random(8)) == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_sessions_out_of_range_is_refused(tmp_path: Path) -> None:
    out = run("serve", "--sessions", "4", "--socket", str(tmp_path / "s"), "--tcti", "x")
    assert out.returncode == 2 and "--sessions" in out.stderr


def test_serve_ignores_an_openssl_conf_that_loads_tpmbroker(swtpm: Swtpm, tmp_path: Path) -> None:
    """A system-wide OPENSSL_CONF activating the provider must not make the broker load
    itself (its own libcrypto, and cryptography's, read OPENSSL_CONF)."""
    sock = str(tmp_path / "b.sock")
    conf = tmp_path / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n"
        "[provider_sect]\ndefault = default_sect\ntpmbroker = tpmbroker_sect\n"
        "[default_sect]\nactivate = 1\n"
        f"[tpmbroker_sect]\nmodule = {provider_path()}\nsocket = {sock}\nactivate = 1\n")
    env = dict(os.environ, OPENSSL_CONF=str(conf))
    broker = Broker(swtpm.tcti, tmp_path / "b", env=env)
    broker.socket = sock
    broker.start()
    try:
        with Client(sock) as client:
            der, spki = client.generate_key(KeyType.RSA, 2048)
            key = client.load_key(der)
            digest = hashlib.sha256(b"no recursion").digest()
            assert verify(spki, KeyType.RSA, client.sign(key, digest, "sha256", Scheme.PSS),
                          digest, Hash.SHA256, Scheme.PSS)
        maps = Path(f"/proc/{broker.proc.pid}/maps").read_text() if broker.proc else ""
        assert "tpmbroker.so" not in maps
    finally:
        broker.stop()
