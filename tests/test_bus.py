"""What crosses the TPM bus: a recording relay (tests/relay.py) sits between the TPM and
whoever drives it, and records every byte both ways.

Through tpmbroker every secret travels inside a salted session's parameter encryption, so
the recording holds none of them: not the random bytes drawn, not a key's password, not a
plaintext decrypted, not an ECDH shared secret. (A parent's password: tests/test_parent_auth.py;
restricted keys' messages and the other paddings: tests/test_restricted.py and
tests/test_decrypt.py.) The same operations by tpm2-openssl (no
sessions) through the same kind of relay leave every one of them in the recording, which
is the proof that the check can fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpmbroker.paths import provider_path

from .relay import Relay
from .tpmfixtures import Broker, raise_max_tries, running_swtpm

OPENSSL = shutil.which("openssl") or "openssl"
TPMBROKER = ["-provider-path", str(provider_path().parent),
             "-provider", "tpmbroker", "-provider", "default"]
TPM2 = ["-provider", "tpm2", "-provider", "base"]
MODULES = Path(subprocess.run([OPENSSL, "version", "-m"], capture_output=True, text=True,
                              check=True).stdout.split('"')[1])
pytestmark = pytest.mark.skipif(not (MODULES / "tpm2.so").exists(),
                                reason="tpm2-openssl is not installed")


def tpm2_openssl_version(env: dict[str, str]) -> tuple[int, ...]:
    """tpm2-openssl's version as the provider reports it (1.1.1 in Debian 12, 1.3.0 in 13);
    it loads only with a TPM to talk to, hence the environment naming one."""
    out = subprocess.run([OPENSSL, "list", "-providers", *TPM2], capture_output=True,
                         text=True, timeout=60, env=env).stdout
    section = ""
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            section = line.strip()  # a provider's name, its fields indented below
            continue
        name, _, value = line.strip().partition(":")
        if section == "tpm2" and name == "version":
            return tuple(int(part) for part in value.strip().split(".") if part.isdigit())
    return (0,)


@dataclass
class Bus:
    """One swtpm behind a relay, driven by `env`'s provider through openssl."""

    relay: Relay
    dir: Path
    env: dict[str, str]
    provider: list[str]
    decrypt_key: list[str]  # genpkey options for a key that may decrypt

    def openssl(self, *args: str, input: bytes | None = None) -> bytes:
        res = subprocess.run([OPENSSL, *args], env=self.env, input=input,
                             capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res.stdout

    def with_provider(self, command: str, *args: str) -> bytes:
        return self.openssl(command, *self.provider, *args)

    def fails(self, command: str, *args: str) -> bool:
        res = subprocess.run([OPENSSL, command, *self.provider, *args], env=self.env,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        return res.returncode != 0

    def file(self, name: str, data: bytes | None = None) -> str:
        path = self.dir / name
        if data is not None:
            path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def tpm2_openssl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    base = tmp_path_factory.mktemp("bus-tpm2-openssl")
    with running_swtpm(base / "tpm") as tpm:
        raise_max_tries(tpm)  # one wrong password below, to show the key needs its own
        relay = Relay(tpm.port)
        try:
            # tpm2-openssl's keys sign and decrypt, whatever is asked
            yield Bus(relay, base, dict(os.environ, TPM2OPENSSL_TCTI=relay.tcti), TPM2, [])
        finally:
            relay.close()


@pytest.fixture(scope="module")
def tpmbroker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    base = tmp_path_factory.mktemp("bus-tpmbroker")
    with running_swtpm(base / "tpm") as tpm:
        raise_max_tries(tpm)  # one wrong password below, to show the key needs its own
        relay = Relay(tpm.port)
        try:
            with Broker(relay.tcti, base / "broker") as broker:
                env = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
                yield Bus(relay, base, env, TPMBROKER, ["-pkeyopt", "usage:decrypt"])
        finally:
            relay.close()


@pytest.fixture(params=["tpm2_openssl", "tpmbroker"])
def bus(request: pytest.FixtureRequest) -> Bus:
    value = request.getfixturevalue(request.param)
    assert isinstance(value, Bus)
    return value


def in_the_clear(bus: Bus) -> bool:
    """What the recording must show: everything for tpm2-openssl, nothing for tpmbroker."""
    return bus.provider is TPM2


def test_random_bytes(bus: Bus) -> None:
    drawn = bus.with_provider("rand", "64")
    assert len(drawn) == 64
    assert bus.relay.seen(drawn, window=16) is in_the_clear(bus)


def test_a_keys_password(bus: Bus) -> None:
    password = "pw-" + secrets.token_hex(12)
    key = bus.file(f"pw-{password}.pem")
    bus.with_provider("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256",
                      "-pkeyopt", f"user-auth:{password}", "-out", key)
    message = bus.file("pw-message", secrets.token_bytes(32))
    # The key does need its password: without it the TPM refuses.
    assert bus.fails("pkeyutl", "-sign", "-rawin", "-digest", "sha256", "-inkey", key,
                     "-passin", "pass:", "-in", message)
    signature = bus.with_provider("pkeyutl", "-sign", "-rawin", "-digest", "sha256",
                                  "-inkey", key, "-passin", f"pass:{password}",
                                  "-in", message)
    public = bus.file("pw-public.pem", bus.with_provider("pkey", "-in", key, "-pubout",
                                                         "-passin", f"pass:{password}"))
    bus.openssl("pkeyutl", "-verify", "-rawin", "-digest", "sha256", "-pubin",
                "-inkey", public, "-in", message, "-sigfile", bus.file("pw-sig", signature))
    assert bus.relay.sent(password.encode(), window=len(password)) is in_the_clear(bus)


@pytest.mark.parametrize("padding", [[], ["-pkeyopt", "pad-mode:oaep",
                                         "-pkeyopt", "digest:sha256"]])
def test_a_decrypted_plaintext(bus: Bus, padding: list[str]) -> None:
    if padding and in_the_clear(bus) and (version := tpm2_openssl_version(bus.env)) < (1, 3):
        pytest.skip(f"tpm2-openssl {'.'.join(map(str, version))} takes no "
                    "padding parameters (\"Can't set parameter\"); 1.3 does")
    key = bus.file("decrypt.pem")
    if not (bus.dir / "decrypt.pem").exists():
        bus.with_provider("genpkey", "-algorithm", "RSA", "-pkeyopt", "bits:2048",
                          *bus.decrypt_key, "-out", key)
    public = bus.file("decrypt.pub", bus.with_provider("pkey", "-in", key, "-pubout"))
    plaintext = secrets.token_bytes(32)
    ciphertext = bus.file("ciphertext", bus.openssl(
        "pkeyutl", "-encrypt", "-pubin", "-inkey", public, *padding,
        input=plaintext))
    assert bus.with_provider("pkeyutl", "-decrypt", "-inkey", key, *padding,
                             "-in", ciphertext) == plaintext
    assert bus.relay.seen(plaintext, window=16) is in_the_clear(bus)


def test_an_ecdh_shared_secret(bus: Bus) -> None:
    key = bus.file("ecdh.pem")
    bus.with_provider("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256",
                      *bus.decrypt_key, "-out", key)
    public = bus.file("ecdh.pub", bus.with_provider("pkey", "-in", key, "-pubout"))
    peer = bus.file("peer.pem", bus.openssl("genpkey", "-algorithm", "EC",
                                            "-pkeyopt", "ec_paramgen_curve:P-256"))
    peer_public = bus.file("peer.pub", bus.openssl("pkey", "-in", peer, "-pubout"))
    secret = bus.with_provider("pkeyutl", "-derive", "-inkey", key, "-peerkey", peer_public)
    assert secret == bus.openssl("pkeyutl", "-derive", "-inkey", peer, "-peerkey", public)
    assert bus.relay.seen(secret, window=16) is in_the_clear(bus)
