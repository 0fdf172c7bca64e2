"""TLS 1.3 key exchange groups with a TPM server key, OpenSSL 3.5's defaults first.

OpenSSL 3.5 offers the hybrid group X25519MLKEM768 first. The TPM key takes no part in
the key exchange: it signs the handshake (CertificateVerify) once, and the broker's
counters show exactly that (one signature, no derivation). The classical groups still
work when a client asks for them. What was negotiated is read from the handshake
messages (tls_transcript), not from s_client's summary lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.client import Client
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from . import tls_transcript
from .test_nginx import Nginx, make_key_and_cert, openssl_conf
from .tpmfixtures import Broker

OPENSSL = shutil.which("openssl") or "openssl"
PROV = ["-provider-path", str(provider_path().parent), "-provider", "default",
        "-provider", "tpmbroker"]


def _has_ml_kem() -> bool:
    out = subprocess.run([OPENSSL, "list", "-kem-algorithms"], capture_output=True,
                         text=True, timeout=30)
    return out.returncode == 0 and "ML-KEM-768" in out.stdout


pytestmark = pytest.mark.skipif(not _has_ml_kem(),
                                reason="this OpenSSL has no ML-KEM (3.5 and later have)")

# (what s_client asks for, the group it must get); None: OpenSSL's default list
GROUPS = [(None, "X25519MLKEM768"), ("X25519MLKEM768", "X25519MLKEM768"),
          ("X25519", "x25519"), ("P-256", "secp256r1"), ("P-384", "secp384r1")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError("server did not listen")


def handshake(port: int, cert: Path, group: str | None, tls: str = "-tls1_3") -> str:
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", tls, "-CAfile", str(cert),
            "-verify_return_error", "-servername", "localhost", "-msg",
            "-ign_eof"]  # read the reply: both servers close after it
    if group is not None:
        args += ["-groups", group]
    res = subprocess.run(args, input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True,
                         timeout=60, env=dict(os.environ, OPENSSL_CONF=os.devnull))
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out
    return out


def counters(broker: Broker) -> tuple[int, int]:
    with Client(broker.socket) as client:
        status = client.status()
    signatures, derivations = status["signatures"], status["derivations"]
    assert isinstance(signatures, int) and isinstance(derivations, int)
    return signatures, derivations


@pytest.fixture
def tls_broker(swtpm: Swtpm, world_dir: Path) -> Iterator[Broker]:
    """A broker nginx's master (root) and workers (www-data) may both use."""
    (world_dir / "run").mkdir(mode=0o755)
    broker = Broker(swtpm.tcti, world_dir / "run", extra_args=(
        "--allow-uid", "root", "--allow-uid", "www-data",
        "--socket-group", "www-data", "--socket-mode", "660"))
    with broker:
        yield broker


@pytest.mark.parametrize("alg,scheme", [("ec:P-256", "ecdsa_secp256r1_sha256"),
                                        ("rsa:2048", "rsa_pss_rsae_sha256")])
def test_s_server_negotiates_hybrid_ml_kem_and_classical_groups(
        tls_broker: Broker, world_dir: Path, alg: str, scheme: str) -> None:
    env = dict(os.environ, OPENSSL_CONF=os.devnull, TPMBROKER_SOCKET=tls_broker.socket)
    key, cert = make_key_and_cert(tls_broker, world_dir, alg, dict(
        env, OPENSSL_CONF=str(openssl_conf(world_dir / "openssl.cnf", tls_broker.socket))))
    port = free_port()
    server = subprocess.Popen([OPENSSL, "s_server", *PROV, "-accept", f"127.0.0.1:{port}",
                               "-cert", str(cert), "-key", str(key), "-www"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_listening(port, server)
        for asked, expected in GROUPS:
            before = counters(tls_broker)
            out = handshake(port, cert, asked)
            assert tls_transcript.key_exchange_group(out) == expected, (asked, out)
            assert tls_transcript.signature_scheme(out) == scheme
            signatures, derivations = counters(tls_broker)
            # the TPM signed the handshake once and derived nothing
            assert (signatures - before[0], derivations - before[1]) == (1, 0), asked
        # TLS 1.2 has no hybrid groups: classical ECDHE, signed by the TPM key
        out = handshake(port, cert, None, "-tls1_2")
        assert tls_transcript.key_exchange_group(out) in {"x25519", "secp256r1"}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_negotiates_hybrid_ml_kem_with_a_tpm_key(tls_broker: Broker,
                                                       world_dir: Path) -> None:
    env = dict(os.environ, OPENSSL_CONF=str(openssl_conf(world_dir / "openssl.cnf",
                                                         tls_broker.socket)))
    key, cert = make_key_and_cert(tls_broker, world_dir, "ec:P-256", env)
    port = free_port()
    nginx = Nginx(world_dir, env)
    nginx.write([(port, cert, key)])
    assert nginx.check().returncode == 0, nginx.log()
    nginx.start([port])
    try:
        for asked, expected in GROUPS:
            before = counters(tls_broker)
            out = handshake(port, cert, asked)
            assert tls_transcript.key_exchange_group(out) == expected, (asked, nginx.log())
            assert tls_transcript.signature_scheme(out) == "ecdsa_secp256r1_sha256"
            assert "tpm says hello" in out
            signatures, derivations = counters(tls_broker)
            assert (signatures - before[0], derivations - before[1]) == (1, 0), asked
    finally:
        nginx.stop()
