"""nginx 1.22 serving TLS with TPM keys through the provider, as in production.

The master runs as root and loads the key (through the provider's decoder); four
workers run as www-data and sign every handshake through the broker, whose socket
admits exactly those two users.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker.client import Client
from tpmbroker.loadgen import LoadReport, sample_sessions
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nginx_broker(swtpm: Swtpm, world_dir: Path) -> Iterator[Broker]:
    broker = Broker(swtpm.tcti, world_dir / "run", extra_args=(
        "--allow-uid", "root", "--allow-uid", "www-data",
        "--socket-group", "www-data", "--socket-mode", "660"))
    (world_dir / "run").mkdir(mode=0o755)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def openssl_conf(path: Path, socket_path: str) -> Path:
    path.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nproviders = provider_sect\n"
        "[provider_sect]\ndefault = default_sect\ntpmbroker = tpmbroker_sect\n"
        "[default_sect]\nactivate = 1\n"
        f"[tpmbroker_sect]\nmodule = {provider_path()}\nsocket = {socket_path}\n"
        "timeout = 30\nactivate = 1\n")
    return path


class Nginx:
    def __init__(self, workdir: Path, conf_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = conf_env
        self.conf = workdir / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, servers: list[tuple[int, Path, Path]]) -> None:
        blocks = "\n".join(f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{ return 200 "tpm says hello\\n"; }}
    }}""" for port, cert, key in servers)
        self.conf.write_text(f"""
user www-data;
worker_processes 4;
daemon off;
master_process on;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log info;
events {{ worker_connections 1024; }}
env OPENSSL_CONF;
http {{
    access_log off;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
{blocks}
}}
""")

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([NGINX, "-t", "-c", str(self.conf), "-e", "stderr"],
                              env=self.env, capture_output=True, text=True, timeout=60)

    def start(self, ports: list[int]) -> None:
        self.proc = subprocess.Popen([NGINX, "-c", str(self.conf), "-e", "stderr"],
                                     env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "stderr.log", "wb"),  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: " + self.log())
            try:
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen: " + self.log())

    def log(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            path = self.workdir / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def reload(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGQUIT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def make_key_and_cert(broker: Broker, workdir: Path, alg: str, env: dict[str, str],
                      ) -> tuple[Path, Path]:
    """A TPM key from `tpmbroker keygen` and a self-signed certificate the TPM signed."""
    key = workdir / f"{alg.replace(':', '-')}.key"
    cert = workdir / f"{alg.replace(':', '-')}.crt"
    subprocess.run([TPMBROKER, "keygen", "--alg", alg, "-o", str(key), "--socket",
                    broker.socket], check=True, timeout=120)
    out = subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-subj",
                          "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                          "-days", "2", "-out", str(cert)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return key, cert


def curl(port: int, cert: Path, tls: str) -> subprocess.CompletedProcess[str]:
    args = ["--tlsv1.3"] if tls == "1.3" else ["--tlsv1.2", "--tls-max", "1.2"]
    return subprocess.run(
        ["curl", "-sS", *args, "--cacert", str(cert), "--resolve",
         f"localhost:{port}:127.0.0.1", "-w", "%{http_code} %{ssl_verify_result}",
         f"https://localhost:{port}/"], capture_output=True, text=True, timeout=60)


def handshakes(port: int, cert: Path, count: int, results: list[str]) -> None:
    """`count` concurrent fresh TLS handshakes (no resumption), each fetching the page."""
    start = threading.Barrier(count)

    def one() -> None:
        ctx = ssl.create_default_context(cafile=str(cert))
        try:
            start.wait(timeout=30)
            with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
            results.append("ok" if b"tpm says hello" in data else f"bad reply {data[:60]!r}")
        except Exception as exc:  # every failure is reported by the test
            results.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_nginx_serves_tls_with_tpm_keys(nginx_broker: Broker, world_dir: Path) -> None:
    env = dict(os.environ, OPENSSL_CONF=str(openssl_conf(world_dir / "openssl.cnf",
                                                         nginx_broker.socket)))
    ec_key, ec_cert = make_key_and_cert(nginx_broker, world_dir, "ec:P-256", env)
    rsa_key, rsa_cert = make_key_and_cert(nginx_broker, world_dir, "rsa:2048", env)
    ec_port, rsa_port = free_port(), free_port()
    nginx = Nginx(world_dir, env)
    nginx.write([(ec_port, ec_cert, ec_key), (rsa_port, rsa_cert, rsa_key)])
    checked = nginx.check()
    assert checked.returncode == 0, checked.stderr
    nginx.start([ec_port, rsa_port])
    try:
        for port, cert in ((ec_port, ec_cert), (rsa_port, rsa_cert)):
            for tls in ("1.2", "1.3"):
                out = curl(port, cert, tls)
                assert out.returncode == 0, f"TLS {tls} on {port}: {out.stderr}\n{nginx.log()}"
                assert out.stdout.endswith("200 0"), out.stdout

        # A burst of fresh handshakes, with a reload in the middle, within the pool.
        report = LoadReport(clients=0, seconds=0)
        stop = threading.Event()
        with Client(nginx_broker.socket) as client:
            sampler = threading.Thread(target=sample_sessions, args=(client, stop, report))
            sampler.start()
            results: list[str] = []
            burst = threading.Thread(target=handshakes, args=(ec_port, ec_cert, 200, results))
            burst.start()
            time.sleep(0.3)
            nginx.reload()
            burst.join()
            results_rsa: list[str] = []
            handshakes(rsa_port, rsa_cert, 200, results_rsa)
            stop.set()
            sampler.join()
        failures = [r for r in results + results_rsa if r != "ok"]
        assert failures == [], f"{len(failures)} failed: {failures[:5]}\n{nginx.log()}"
        assert len(results) == len(results_rsa) == 200
        assert 1 <= report.max_active_sessions <= nginx_broker.sessions
        assert curl(ec_port, ec_cert, "1.3").returncode == 0  # served by the new workers
    finally:
        nginx.stop()


def test_nginx_outlives_its_broker(swtpm: Swtpm, world_dir: Path) -> None:
    """Broker down: handshakes fail and the log names the socket; broker back: served again,
    without restarting nginx. (Keys load without the broker: the public half is in the file.)
    """
    run = world_dir / "run"
    run.mkdir(mode=0o755)
    broker = Broker(swtpm.tcti, run, extra_args=("--allow-uid", "www-data",
                                                 "--socket-group", "www-data"))
    env = dict(os.environ, OPENSSL_CONF=str(openssl_conf(world_dir / "openssl.cnf",
                                                         broker.socket)))
    broker.start()
    try:
        key, cert = make_key_and_cert(broker, world_dir, "ec:P-256", env)
    finally:
        broker.stop()
    port = free_port()
    nginx = Nginx(world_dir, env)
    nginx.write([(port, cert, key)])
    assert nginx.check().returncode == 0
    nginx.start([port])
    try:
        out = curl(port, cert, "1.3")
        assert out.returncode != 0
        assert broker.socket in nginx.log(), nginx.log()
        broker.start()
        try:
            for tls in ("1.2", "1.3"):
                out = curl(port, cert, tls)
                assert out.returncode == 0 and out.stdout.endswith("200 0"), out.stderr
        finally:
            broker.stop()
    finally:
        nginx.stop()


def test_a_broker_restart_fails_no_handshake(nginx_broker: Broker, world_dir: Path) -> None:
    """`systemctl restart tpmbroker` under load: the broker stopped (SIGTERM) and started
    again while nginx serves rounds of 200 concurrent fresh handshakes; the workers' provider
    sends the signatures the stopping broker could not serve to its successor."""
    env = dict(os.environ, OPENSSL_CONF=str(openssl_conf(world_dir / "openssl.cnf",
                                                         nginx_broker.socket)))
    key, cert = make_key_and_cert(nginx_broker, world_dir, "ec:P-256", env)
    port = free_port()
    nginx = Nginx(world_dir, env)
    nginx.write([(port, cert, key)])
    assert nginx.check().returncode == 0
    nginx.start([port])
    results: list[str] = []
    stop = threading.Event()

    def rounds() -> None:
        while not stop.is_set():
            handshakes(port, cert, 200, results)

    load = threading.Thread(target=rounds)
    try:
        load.start()
        time.sleep(0.5)
        restarted_at = len(results)
        nginx_broker.stop()
        nginx_broker.start()
        time.sleep(1.0)
        stop.set()
        load.join(120)
        failures = [r for r in results if r != "ok"]
        print(f"{len(results)} handshakes ({restarted_at} before the restart), "
              f"{len(failures)} failed")
        assert not load.is_alive()
        assert failures == [], f"{len(failures)} failed: {failures[:5]}\n{nginx.log()}"
        assert len(results) > restarted_at + 200  # handshakes went on after the restart
    finally:
        stop.set()
        nginx.stop()
