"""Per-key access control (`tpmbroker serve --policy`): each peer gets only its keys.

Two real users: root (this process) and www-data (openssl with the provider, through
runuser). The socket is world-writable so that the broker's checks are what decide.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpmbroker.access import AccessPolicyError, Peer, load_policy
from tpmbroker.client import Client
from tpmbroker.errors import PermissionDeniedError
from tpmbroker.keyfile import der_to_pem, pem_to_der
from tpmbroker.paths import provider_path
from tpmbroker.protocol import Curve, KeySource, KeyType, key_id_for
from tpmbroker.simulator import Swtpm

from .test_audit import events, full_log
from .tpmfixtures import Broker

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root to run a client as www-data")
OPENSSL = os.path.realpath(shutil.which("openssl") or "/usr/bin/openssl")


def sign_as_www_data(socket: str, key: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "www-data", "--", "openssl", "dgst", "-sha256",
         "-provider-path", str(provider_path().parent), "-provider", "default",
         "-provider", "tpmbroker", "-sign", str(key), "-out", os.devnull, str(data)],
        env=dict(os.environ, TPMBROKER_SOCKET=socket, OPENSSL_CONF=os.devnull),
        capture_output=True, text=True, timeout=60)


def make_keys(socket: str, world: Path, names: list[str]) -> dict[str, Path]:
    paths = {}
    with Client(socket) as client:
        for name in names:
            der, _ = client.generate_key(KeyType.EC, Curve.P256)
            path = world / f"{name}.pem"
            path.write_bytes(der_to_pem(der))
            path.chmod(0o644)
            paths[name] = path
    return paths


@needs_root
def test_policy_admits_and_refuses_per_key(swtpm: Swtpm, world_dir: Path) -> None:
    run = world_dir / "run"
    run.mkdir(mode=0o755)
    # Keys first (by a broker without a policy), then the broker under the policy.
    keygen = Broker(swtpm.tcti, run / "keygen", extra_args=("--socket-mode", "666")).start()
    try:
        keys = make_keys(keygen.socket, world_dir, ["ca", "web", "tool", "other"])
    finally:
        keygen.stop()
    policy = world_dir / "policy.toml"
    policy.write_text(f"""
default = "deny"

[keys.ca]
file = "{keys['ca']}"
uids = ["root"]

[keys.web]
file = "{keys['web']}"
gids = ["www-data"]

[keys.tool]
file = "{keys['tool']}"
uids = ["www-data", 0]
executables = ["{OPENSSL}"]
""")
    data = world_dir / "data"
    data.write_text("who may sign\n")
    data.chmod(0o644)
    broker = Broker(swtpm.tcti, run / "broker",
                    extra_args=("--socket-mode", "666", "--allow-uid", "www-data",
                                "--policy", str(policy), "--usage-interval", "0.5")).start()
    try:
        # www-data: its web key and the tool key through openssl; not the CA, nor a key
        # the policy does not name (default deny).
        for name, allowed in (("web", True), ("tool", True), ("ca", False), ("other", False)):
            out = sign_as_www_data(broker.socket, keys[name], data)
            if allowed:
                assert out.returncode == 0, (name, out.stderr)
            else:
                assert out.returncode != 0, name
                assert "PERMISSION_DENIED" in out.stderr, (name, out.stderr)
        # root, from this Python process: the CA; not web (root is not exempt), not tool
        # (not openssl), not other.
        with Client(broker.socket) as client:
            ca = client.load_key(keys["ca"])
            assert client.sign(ca, bytes(32))
            for name in ("web", "tool", "other"):
                with pytest.raises(PermissionDeniedError):
                    client.load_key(keys[name])
            # The same key in another encoding (emptyAuth TRUE as 0x01, as tpm2-openssl
            # writes it) has another key id but the same public key: still refused.
            der = pem_to_der(keys["web"].read_bytes())
            again = der.replace(b"\xa0\x03\x01\x01\xff", b"\xa0\x03\x01\x01\x01", 1)
            assert again != der
            with pytest.raises(PermissionDeniedError):
                client.load_key(again)
            status = client.status()
        assert int(str(status["refused_keys"])) >= 6
        time.sleep(0.8)  # a usage summary
        log = full_log(broker)
        other = key_id_for(KeySource.TSS2_DER, pem_to_der(keys["other"].read_bytes())).hex()[:16]
        refused = {(r["uid"], r["key"]) for r in events(log, "key_refused")}
        assert refused == {("33", "ca"), ("33", other), ("0", "web"), ("0", "tool"),
                           ("0", other)}
        usage = {(u["uid"], u["key"]): u for u in events(log, "usage")}
        assert ("33", "web") in usage and usage["33", "web"]["exe"] == OPENSSL
        assert ("0", "ca") in usage and usage["0", "ca"]["exe"] == os.path.realpath(
            sys.executable)
    finally:
        broker.stop()


def test_policy_file_errors_are_clear(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    for text, words in (('default = "maybe"', "default must be"),
                        ('[keys.a]\nuids = [0]', "exactly one of"),
                        ('[keys.a]\nhandle = 0x81000001\nuid = [0]', "unknown field"),
                        ('[keys.a]\nhandle = 0x40000001', "not a persistent handle"),
                        ('[keys.a]\nkey_id = "abcd"', "32 bytes"),
                        ('[keys.a]\nfile = "/nonexistent"', "cannot read"),
                        ('[keys.a]\nhandle = 0x81000001\nuids = ["no-such-user-x"]', "keys.a"),
                        ('[keys.a]\nhandle = 0x81000001\nexecutables = ["nginx"]', "absolute"),
                        ("default = ", "p.toml")):
        policy.write_text(text)
        with pytest.raises(AccessPolicyError, match=words):
            load_policy(policy)


def test_policy_by_handle_and_key_id(tmp_path: Path) -> None:
    handle_id = key_id_for(KeySource.PERSISTENT_HANDLE, (0x81000010).to_bytes(4, "big"))
    other_id = bytes(range(32))
    policy = tmp_path / "p.toml"
    policy.write_text(f"""
[keys.persistent]
handle = "0x81000010"
uids = [1000]

[keys.blob]
key_id = "{other_id.hex()}"
gids = [50]
""")
    loaded = load_policy(policy)
    user = Peer(1000, frozenset({1000}), "/usr/bin/x")
    staff = Peer(2000, frozenset({2000, 50}), None)
    assert loaded.decide(user, handle_id, b"").allowed
    assert not loaded.decide(staff, handle_id, b"").allowed
    assert loaded.decide(staff, other_id, b"").allowed
    assert not loaded.decide(user, other_id, b"").allowed
    assert loaded.decide(user, bytes(32), b"").allowed  # unnamed: default allow


def test_sighup_reloads_the_policy_and_a_broken_one_changes_nothing(
        swtpm: Swtpm, tmp_path: Path) -> None:
    """SIGHUP reads the policy file again; a malformed one is refused with its line number
    and the policy in force stays; a request is judged by the policy in force when it is
    served, also on a connection that loaded the key before."""
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "allow"\n')
    broker = Broker(swtpm.tcti, tmp_path / "broker",
                    extra_args=("--policy", str(policy))).start()
    try:
        assert broker.proc is not None
        with Client(broker.socket) as client:
            der, _ = client.generate_key(KeyType.EC, Curve.P256)
            key = client.load_key(der)
            assert client.sign(key, bytes(32))

            def reload(text: str, wait_for: str) -> None:
                policy.write_text(text)
                before = full_log(broker).count(wait_for)
                assert broker.proc is not None
                broker.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while full_log(broker).count(wait_for) == before:
                    assert time.monotonic() < deadline, full_log(broker)
                    time.sleep(0.05)

            key_id = key_id_for(KeySource.TSS2_DER, der).hex()
            reload(f'default = "allow"\n\n[keys.tpm]\nkey_id = "{key_id}"\nuids = [12345]\n',
                   "event=policy_reloaded")
            with pytest.raises(PermissionDeniedError, match="key tpm"):
                client.sign(key, bytes(32))
            # Broken twice: the TOML itself on line 3, then a key entry on line 4.
            reload('default = "allow"\n\n[keys.tpm\n', "event=policy_refused")
            assert "line 3" in events(full_log(broker), "policy_refused")[-1]["reason"]
            reload('default = "allow"\n\n\n[keys.tpm]\nhandle = 7\n', "event=policy_refused")
            assert "policy.toml:4" in events(full_log(broker), "policy_refused")[-1]["reason"]
            with pytest.raises(PermissionDeniedError):  # the last good policy is in force
                client.sign(key, bytes(32))
            reload('default = "allow"\n', "event=policy_reloaded")
            assert client.sign(key, bytes(32))
    finally:
        broker.stop()
