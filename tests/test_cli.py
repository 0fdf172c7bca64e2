"""The `tpmbroker` command: embedded simulator default, provider path, errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tpmbroker.client import Client
from tpmbroker.errors import TpmBrokerError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.loadgen import verify
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
            # Made with EK certificates from a local CA: the default is verified.
            assert status["tpm_identity"] == "verified-by-certificate"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert (state / "tpm" / "tpm2-00.permall").exists()
    proc = start()  # same state: the key made before still loads and signs
    try:
        with Client(sock, timeout=20) as client:
            assert client.status()["tpm_identity"] == "verified-by-certificate"
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


# --- bad input: one line naming the option and the fix, never a traceback ---------------

MISSING = "/nonexistent-dir/file"
# (arguments, what the line must name). `{key}` is a key file the broker made, `{soft}`
# a software key, `{enc}` the same encrypted, `{dir}` the test's directory. Every
# subcommand appears (checked below).
BAD_INPUTS: list[tuple[tuple[str, ...], str]] = [
    (("serve", "--socket-mode", "99x", "--tcti", "x"), "--socket-mode"),
    (("serve", "--allow-uid", "no-such-user", "--tcti", "x"), "--allow-uid"),
    (("serve", "--socket-group", "no-such-group", "--tcti", "x"), "--socket-group"),
    (("serve", "--policy", MISSING, "--tcti", "x"), "--policy"),
    (("serve", "--sessions", "seven"), "--sessions"),
    (("keygen", "-o", MISSING), "-o/--output"),
    (("keygen", "-a", "-o", "{dir}/k.pem"), "-a/--auth"),
    (("keygen", "--wrap", MISSING, "-o", "{dir}/k.pem"), "--wrap"),
    (("keygen", "--parent", "foo", "-o", "{dir}/k.pem"), "--parent"),
    (("keygen", "--password-file", MISSING, "-o", "{dir}/k.pem"), "--password-file"),
    (("keygen", "--parent-auth-file", MISSING, "-o", "{dir}/k.pem"), "--parent-auth-file"),
    (("keygen", "--auth-policy", MISSING, "-o", "{dir}/k.pem"), "--auth-policy"),
    (("keygen", "--alg", "ec:P-999", "-o", "{dir}/k.pem"), "--alg"),
    (("keygen", "--pcr-lock", "99", "-o", "{dir}/k.pem"), "--pcr-lock"),
    (("keygen", "--pcr-lock", "16", "--pcr-values", "zz", "-o", "{dir}/k.pem"),
     "--pcr-values"),
    (("keygen", "--wrap", "{soft}", "--import", MISSING, "-o", "{dir}/k.pem"), "--import"),
    (("keygen", "--wrap", "{soft}", "--passin", f"file:{MISSING}", "-o", "{dir}/k.pem"),
     "--passin"),
    (("keygen", "--usage", "everything", "-o", "{dir}/k.pem"), "--usage"),
    (("keygen", "--wrap", "{enc}", "-o", "{dir}/k.pem"), "--passin"),
    (("keygen", "--wrap", "{enc}", "--passin", "pass:wrong", "-o", "{dir}/k.pem"), "--wrap"),
    (("parent-pubkey", "--parent", "0x1"), "--parent"),
    (("parent-pubkey", "-o", MISSING), "-o/--output"),
    (("policy", "sign", "--signing-key", MISSING, "{key}"), "--signing-key"),
    (("policy", "sign", "--signing-key", "{soft}", "--pcr-lock", "16", "--pcr-values", "HEX",
      "{key}"), "--pcr-values"),
    (("policy", "sign", "--signing-key", "{soft}", MISSING), "KEYFILE"),
    (("pubkey", MISSING), "KEY"),
    (("pubkey", "{key}", "-o", MISSING), "-o/--output"),
    (("sign", "--key", "{key}", "--in", MISSING, "--out", "{dir}/s"), "--in"),
    (("sign", "--key", "{key}", "--in", "{key}", "--out", MISSING), "--out"),
    (("sign", "--key", MISSING, "--in", "{key}", "--out", "{dir}/s"), "--key"),
    (("sign", "--key", "{key}", "--in", "{key}", "--out", "{dir}/s", "--hash", "md5"),
     "--hash"),
    (("decrypt", "--key", "{key}", "--in", MISSING), "--in"),
    (("decrypt", "--key", MISSING, "--in", "{key}"), "--key"),
    (("decrypt", "--key", "{key}", "--in", "{key}", "--padding", "oaep", "--label-hex",
      "zz"), "--label-hex"),
    (("random", "8", "-o", MISSING), "-o/--output"),
    (("random", "many"), "count"),
    (("pcrread", "sha3:16"), "PCRS"),
    (("status", "--timeout", "0"), "--timeout"),
    (("load", "--key", "{key}", "--clients", "0"), "--clients"),
    (("load", "--key", MISSING), "--key"),
    (("persist", "{key}", "0x80000010"), "handle"),
    (("persist", "{key}", "0x81000010", "--owner-auth-file", MISSING), "--owner-auth-file"),
    (("evict", "0x81000010", "--owner-auth-file", MISSING), "--owner-auth-file"),
    (("evict", "handle:zz"), "handle"),
    (("keys", "--socket", MISSING), MISSING),
    (("simulator", "--state-dir", "/proc/nonexistent"), "--state-dir"),
    (("simulator", "--port", "70000"), "--port"),
    (("provider-path", "--extra"), "--extra"),
    (("enroll", "--kind", "EK-NONE"), "--kind"),
    (("attest",), "KEY"),
    (("attest", "--verify", "{key}"), "--ek-ca"),
    (("attest", "--verify", "{key}", "--ek-ca", MISSING), "--ek-ca"),
    (("attest", "--verify", MISSING, "--ek-ca", MISSING), "--verify"),
    (("attest", "{key}", "--challenge-file", MISSING), "--challenge-file"),
    (("attest", "{key}", "--challenge-hex", "xyz"), "--challenge-hex"),
]


def test_bad_inputs_cover_every_subcommand() -> None:
    out = run("no-such-command")
    assert out.returncode == 2
    listed = set(out.stderr.split("(choose from ", 1)[1].split(")", 1)[0]
                 .replace("'", "").split(", "))
    assert listed == {args[0] for args, _ in BAD_INPUTS}


def test_bad_input_gets_one_line_naming_the_option(broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    with Client(broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
    key.write_bytes(der_to_pem(der))
    software = ec.generate_private_key(ec.SECP256R1())
    soft = tmp_path / "software.pem"  # a software key, to wrap or to sign policies with
    soft.write_bytes(software.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    enc = tmp_path / "encrypted.pem"  # the same, with a passphrase
    enc.write_bytes(software.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"right")))
    env = {k: v for k, v in os.environ.items() if k != "TPMBROKER_TCTI"}
    env["TPMBROKER_SOCKET"] = broker.socket
    before = sorted(tmp_path.iterdir())
    for args, option in BAD_INPUTS:
        argv = [a.format(key=key, soft=soft, enc=enc, dir=tmp_path) for a in args]
        # No terminal (a new session, stdin from /dev/null), as under cron or CI.
        out = subprocess.run([TPMBROKER, *argv], capture_output=True, text=True, timeout=60,
                             env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        line = out.stderr.strip()
        assert out.returncode in (1, 2), (argv, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and "\n" not in line, (argv, out.stderr)
        assert line.startswith(f"tpmbroker {argv[0]}") or line.startswith("tpmbroker:"), line
        assert option in line, (argv, line)
    assert sorted(tmp_path.iterdir()) == before  # nothing written on the way


def test_pcrread_shows_what_the_tpm_holds(abrmd_broker: Broker, abrmd: Any) -> None:
    """Values extended by another TPM user (through tpm2-abrmd) read back through the
    broker, as --pcr-values takes them."""
    from tpm2_pytss import ESAPI, TCTILdr

    from .test_policy_keys import pcr16_extend

    with ESAPI(TCTILdr.parse(abrmd.tcti)) as ectx:
        pcr16_extend(ectx, b"measured")
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(b"measured").digest()).hexdigest()
    env = dict(os.environ, TPMBROKER_SOCKET=abrmd_broker.socket)
    out = subprocess.run([TPMBROKER, "pcrread", "sha1:16+sha256:16,17"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == "sha1:16" and len(lines[0].split()[1]) == 40
    # PCRs 17 to 22 reset to all ones, the others to zeros.
    assert lines[1:] == [f"sha256:16 {expected}", f"sha256:17 {'ff' * 32}"]
    out = subprocess.run([TPMBROKER, "pcrread", "16", "--values"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.stdout.strip() == expected
    with Client(abrmd_broker.socket) as client:
        assert client.pcr_read("sha256:16") == [("sha256", 16, bytes.fromhex(expected))]
