"""RANDOM end to end: bytes from the TPM's generator through the real broker on swtpm, read
by the Python client, the `tpmbroker random` command and the provider's RAND (the openssl
CLI); and proof that they cross the TPM link encrypted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TCTILdr

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import BrokerUnavailableError, UnsupportedError
from tpmbroker.ops.random import Random, RandomResult
from tpmbroker.paths import provider_path

from .relay import Relay
from .tpmfixtures import Broker, BrokerEnv, running_swtpm

MODULE = provider_path()
MODDIR = str(MODULE.parent)
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")


class Env(BrokerEnv):
    def served(self) -> int:
        return self.counter("random_bytes")

    def openssl_rand(self, *args: str, env: dict[str, str] | None = None,
                     ) -> subprocess.CompletedProcess[bytes]:
        return self.openssl("rand", *args, check=False, env=env, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("random")
    with running_swtpm(base / "tpm") as tpm, Broker(tpm.tcti, base / "broker") as broker:
        yield Env(broker, base)


# --- the Python client and the broker ---------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 64, 100, p.MAX_RANDOM,
                                   p.MAX_RANDOM + 1, 5000])
def test_client_gets_exactly_the_bytes_asked_for(env: Env, count: int) -> None:
    before = env.served()
    with env.client() as client:
        first, second = client.random(count), client.random(count)
    assert len(first) == len(second) == count
    if count >= 16:
        assert first != second
    assert env.served() - before == 2 * count


def test_more_than_the_maximum_per_request_is_refused_clearly(env: Env) -> None:
    with env.client() as client, pytest.raises(UnsupportedError, match="at most 1024"):
        client._call(Random(p.MAX_RANDOM + 1))
    with env.client() as client:  # the connection stays usable
        assert len(client.random(8)) == 8


def test_the_broker_answers_count_zero_with_nothing(env: Env) -> None:
    with env.client() as client:
        result = client._call(Random(0))
    assert result == RandomResult(b"")


def test_bytes_look_random(env: Env) -> None:
    with env.client() as client:
        data = client.random(4096)
    ones = sum(bin(b).count("1") for b in data)
    assert abs(ones - 4 * len(data)) < 600  # about 10 standard deviations
    assert len(set(data)) > 240


# --- the command --------------------------------------------------------------------------

def test_cli_prints_hex_and_writes_files(env: Env, tmp_path: Path) -> None:
    res = subprocess.run([TPMBROKER, "random", "48", "--hex", "--socket", env.broker.socket],
                         capture_output=True, text=True, timeout=60, check=True)
    assert len(bytes.fromhex(res.stdout.strip())) == 48
    out = tmp_path / "r.bin"
    before = env.served()
    subprocess.run([TPMBROKER, "random", "3000", "-o", str(out), "--socket",
                    env.broker.socket], capture_output=True, timeout=60, check=True)
    assert len(out.read_bytes()) == 3000
    assert env.served() - before == 3000


def test_cli_names_the_socket_when_the_broker_is_down(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    res = subprocess.run([TPMBROKER, "random", "8", "--socket", sock], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and sock in res.stderr


def test_client_names_the_socket_when_the_broker_is_down(tmp_path: Path) -> None:
    with Client(str(tmp_path / "none.sock"), timeout=2) as client, \
            pytest.raises(BrokerUnavailableError, match=r"none\.sock"):
        client.random(8)


# --- the provider's RAND through the openssl CLI ----------------------------------------------

needs_provider = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


def _providers(*names: str) -> list[str]:
    args = ["-provider-path", MODDIR]
    for name in names:
        args += ["-provider", name]
    return args


@needs_provider
@pytest.mark.parametrize("order", [["tpmbroker"], ["tpmbroker", "default"],
                                   ["tpmbroker", "base"], ["base", "tpmbroker"]])
@pytest.mark.parametrize("count", [32, 33, 1024, 3000])
def test_openssl_rand_reads_the_tpm(env: Env, order: list[str], count: int) -> None:
    before = env.served()
    res = env.openssl_rand(*_providers(*order), "-hex", str(count))
    assert res.returncode == 0, res.stderr.decode() + env.broker.log()
    assert len(bytes.fromhex(res.stdout.decode().strip())) == count
    # Every byte openssl printed was served by the broker (openssl may draw a few more).
    assert env.served() - before >= count


@needs_provider
def test_default_provider_first_keeps_its_own_drbg(env: Env) -> None:
    # OpenSSL 3.0 fetches "CTR-DRBG" without a property query and takes the first
    # implementation registered, in provider activation order: the default provider's
    # here. `openssl rand -propquery` does not reach the DRBG fetch either.
    # docs/provider.md says how to pick tpmbroker's anyway ([random] in openssl.cnf).
    before = env.served()
    for extra in ([], ["-propquery", "?provider=tpmbroker"]):
        res = env.openssl_rand(*_providers("default", "tpmbroker"), *extra, "-hex", "32")
        assert res.returncode == 0, res.stderr
    assert env.served() == before


@needs_provider
def test_random_section_of_openssl_cnf_picks_tpmbroker_in_any_order(env: Env,
                                                                     tmp_path: Path) -> None:
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(textwrap.dedent(f"""\
        openssl_conf = init
        [init]
        providers = providers
        random = random
        [providers]
        default = default_sect
        tpmbroker = tpmbroker_sect
        [default_sect]
        activate = 1
        [tpmbroker_sect]
        module = {MODULE}
        activate = 1
        [random]
        random = CTR-DRBG
        properties = provider=tpmbroker
        """))
    before = env.served()
    res = env.openssl_rand("-hex", "64", env=dict(env.environ, OPENSSL_CONF=str(cnf)))
    assert res.returncode == 0, res.stderr
    assert len(bytes.fromhex(res.stdout.decode().strip())) == 64
    assert env.served() - before >= 64


@needs_provider
def test_openssl_rand_without_a_broker_fails_clearly(env: Env, tmp_path: Path) -> None:
    sock = str(tmp_path / "missing.sock")
    t0 = time.monotonic()
    res = env.openssl_rand(*_providers("tpmbroker", "default"), "-hex", "16",
                           env=dict(os.environ, TPMBROKER_SOCKET=sock))
    assert time.monotonic() - t0 < 10
    assert res.returncode == 1, res  # an error exit, not a crash
    assert sock.encode() in res.stderr and b"tpmbroker serve" in res.stderr
    assert res.stdout == b""


@needs_provider
def test_provider_rand_from_threads_and_a_forked_child(env: Env) -> None:
    # The system libcrypto through ctypes (calls release the GIL): RAND_bytes of the
    # default library context, with tpmbroker loaded first, from 8 threads and a child.
    script = textwrap.dedent(f"""\
        import ctypes, os, sys, threading
        lib = ctypes.CDLL("libcrypto.so.3")
        lib.OSSL_PROVIDER_set_default_search_path(None, {MODDIR!r}.encode())
        lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
        assert lib.OSSL_PROVIDER_load(None, b"tpmbroker")
        assert lib.OSSL_PROVIDER_load(None, b"default")
        failures = []
        def draw():
            buf = ctypes.create_string_buffer(100)
            for _ in range(20):
                if lib.RAND_bytes(buf, 100) != 1:
                    failures.append(1)
        threads = [threading.Thread(target=draw) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        pid = os.fork()
        if pid == 0:
            buf = ctypes.create_string_buffer(100)
            os._exit(0 if lib.RAND_bytes(buf, 100) == 1 else 1)
        _, status = os.waitpid(pid, 0)
        print(len(failures), os.waitstatus_to_exitcode(status))
        """)
    before = env.served()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env.environ)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "0"]
    assert env.served() - before >= 8 * 20 * 100 + 100


# --- encrypted on the TPM link -----------------------------------------------------------------

def test_random_bytes_cross_the_tpm_link_encrypted(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tpm:
        relay = Relay(tpm.port)
        try:
            tcti = relay.tcti
            # Control: GetRandom without a session through the same relay shows up in the
            # recording in the clear, so the check below can fail.
            loaded = TCTILdr.parse(tcti)
            with ESAPI(loaded) as ectx:
                clear = bytes(ectx.get_random(32))
            loaded.close()
            assert relay.seen(clear, window=32)
            with Broker(tcti, tmp_path / "broker") as broker, \
                    Client(broker.socket) as client:
                served = client.random(4000)
                served += client.random(48)
            assert len(served) == 4048
            assert not relay.seen(served)
            assert relay.seen(clear, window=32)  # the recording was kept throughout
        finally:
            relay.close()
