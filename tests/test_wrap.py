"""Wrapping software keys into the TPM, end to end: `tpmbroker keygen --wrap` against the
real broker on swtpm (TPM2_Import through the pool), signatures by the openssl CLI through
the provider and by the Python client, verified with the original public key; key files
bound to their TPM; importable files made for a second TPM with no access to it (only
its parent's public key); passwords; encrypted input; and proof that neither the TPM's
bus nor the broker's socket carries the private scalar or primes."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

import tpmbroker
from tpmbroker.errors import AuthFailedError, BadKeyError
from tpmbroker.keyfile import TPMKeyAsn1, pem_to_der
from tpmbroker.ops.import_key import Import
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm
from tpmbroker.wrap import WrappableKey

from .relay import Relay
from .tpmfixtures import Broker, BrokerEnv, running_swtpm

MODULE = provider_path()
PROV = ["-provider-path", str(MODULE.parent), "-provider", "default", "-provider", "tpmbroker"]

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


class SocketRelay:
    """A recording relay in front of the broker's Unix socket: what clients send."""

    def __init__(self, target: str, path: str) -> None:
        self.target, self.path = target, path
        self.to_broker = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(self.target)
                threading.Thread(target=self._pump, args=(client, upstream, True),
                                 daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.to_broker += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def sent(self, data: bytes, window: int = 8) -> bool:
        with self._lock:
            recorded = bytes(self.to_broker)
        return any(data[i:i + window] in recorded for i in range(len(data) - window + 1))

    def close(self) -> None:
        self._listener.close()


class Side(BrokerEnv):
    """One TPM with its broker; openssl signs through it."""

    def __init__(self, tpm: Swtpm, broker: Broker, base: Path) -> None:
        super().__init__(broker, base)
        self.tpm = tpm

    @property
    def socket(self) -> str:
        return self.broker.socket

    def openssl_sign(self, key: str, data: str) -> bytes:
        return self.ok("dgst", "-sha256", *PROV, "-sign", key, data)


@dataclass
class Env:
    here: Side  # behind the bus relay and the socket relay
    there: Side  # the "TPM elsewhere"
    relay: Relay
    sock: SocketRelay
    dir: Path

    def cli(self, *args: str, socket_path: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(
            [sys.executable, "-m", "tpmbroker.cli", *args, "--socket",
             socket_path or self.sock.path], capture_output=True, cwd=self.dir, timeout=120,
            stdin=subprocess.DEVNULL)
        if check:
            assert res.returncode == 0, res.stderr.decode()
        return res


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("wrap")
    with running_swtpm(base / "tpm-here") as here, running_swtpm(base / "tpm-there") as there:
        relay = Relay(here.port)
        try:
            with Broker(relay.tcti, base / "broker-here") as bh, \
                    Broker(there.tcti, base / "broker-there") as bt:
                sock = SocketRelay(bh.socket, str(base / "relayed.sock"))
                try:
                    yield Env(Side(here, bh, base), Side(there, bt, base), relay, sock, base)
                finally:
                    sock.close()
        finally:
            relay.close()


def software_key(kind: str) -> WrappableKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(65537, 2048)


def write_key(env: Env, name: str, key: WrappableKey, passphrase: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    (env.dir / name).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return name


def verify(key: WrappableKey, signature: bytes, data: bytes) -> None:
    """Raises InvalidSignature unless the original key's public half verifies it."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        key.public_key().verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def secrets_of(key: WrappableKey) -> list[bytes]:
    """The private scalar, or both primes, as the bytes a TPM structure would carry."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return [key.private_numbers().private_value.to_bytes(32, "big")]
    numbers = key.private_numbers()
    return [numbers.p.to_bytes(128, "big"), numbers.q.to_bytes(128, "big"),
            numbers.d.to_bytes(256, "big")]


def public_bytes_of(key: WrappableKey) -> bytes:
    """Bytes of the public key that do cross the bus (in Import's objectPublic)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.public_key().public_numbers().x.to_bytes(32, "big")
    return key.public_key().public_numbers().n.to_bytes(256, "big")


# --- this TPM ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_wrapped_key_signs_and_verifies_with_the_original_public_key(env: Env,
                                                                     kind: str) -> None:
    key = software_key(kind)
    original = write_key(env, f"{kind}.soft.pem", key)
    res = env.cli("keygen", "--wrap", original, "-o", f"{kind}.tpm.pem")
    assert b"destroy it" in res.stderr
    tpm_file = (env.dir / f"{kind}.tpm.pem").read_bytes()
    assert tpm_file.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert oct((env.dir / f"{kind}.tpm.pem").stat().st_mode & 0o777) == "0o600"
    (env.dir / "data").write_bytes(b"wrapped, then signed by the TPM")
    # the openssl CLI through the provider
    signature = env.here.openssl_sign(f"{kind}.tpm.pem", "data")
    verify(key, signature, b"wrapped, then signed by the TPM")
    # the Python client
    with env.here.client() as client:
        loaded = client.load_key(pem_to_der(tpm_file))
        digest = hashlib.sha256(b"and by Python").digest()
        verify(key, client.sign(loaded, digest), b"and by Python")
    # the key file holds the public key, not the private one
    for secret in secrets_of(key):
        assert secret not in pem_to_der(tpm_file)
    # nothing private crossed the TPM's bus or the broker's socket; the relays did see
    # the traffic (the public key crosses both)
    assert env.relay.sent(public_bytes_of(key), window=32)
    assert env.sock.sent(public_bytes_of(key), window=32)
    for secret in secrets_of(key):
        assert not env.relay.sent(secret) and not env.relay.seen(secret)
        assert not env.sock.sent(secret)


def test_key_file_loads_only_on_the_tpm_it_was_made_for(env: Env) -> None:
    key = software_key("p256")
    with env.here.client() as client:
        der = client.wrap_key(key)
        client.load_key(der)  # loads here
    with env.there.client() as client, pytest.raises(BadKeyError, match="another TPM"):
        client.load_key(der)
    with env.there.client() as client:  # the broker there still serves
        assert len(client.random(8)) == 8


def test_password_on_a_wrapped_key(env: Env) -> None:
    key = software_key("p256")
    write_key(env, "pw.soft.pem", key)
    (env.dir / "pw.txt").write_text("wrapped-secret\n")
    env.cli("keygen", "--wrap", "pw.soft.pem", "--password-file", "pw.txt", "-o", "pw.tpm.pem")
    der = pem_to_der((env.dir / "pw.tpm.pem").read_bytes())
    digest = hashlib.sha256(b"with a password").digest()
    with env.here.client() as client:
        right = client.load_key(der, password="wrapped-secret")
        verify(key, client.sign(right, digest), b"with a password")
    with env.here.client() as client:
        wrong = client.load_key(der, password="not-it")
        with pytest.raises(AuthFailedError):
            client.sign(wrong, digest)
    # wrapping sent the password only inside the encrypted duplicate (keygen went through
    # the socket relay), and no command put it on the bus (sessions prove it by HMAC)
    assert not env.sock.sent(b"wrapped-secret")
    assert not env.relay.sent(b"wrapped-secret")


def test_encrypted_input_with_its_passphrase(env: Env) -> None:
    key = software_key("rsa2048")
    write_key(env, "enc.soft.pem", key, passphrase=b"input-pass")
    missing = env.cli("keygen", "--wrap", "enc.soft.pem", "-o", "enc.tpm.pem", check=False)
    assert missing.returncode != 0 and b"encrypted" in missing.stderr
    wrong = env.cli("keygen", "--wrap", "enc.soft.pem", "--passin", "pass:nope",
                    "-o", "enc.tpm.pem", check=False)
    assert wrong.returncode != 0 and b"wrong passphrase" in wrong.stderr
    assert not (env.dir / "enc.tpm.pem").exists()
    env.cli("keygen", "--wrap", "enc.soft.pem", "--passin", "pass:input-pass",
            "-o", "enc.tpm.pem")
    (env.dir / "enc-data").write_bytes(b"from an encrypted PEM")
    verify(key, env.here.openssl_sign("enc.tpm.pem", "enc-data"),
           b"from an encrypted PEM")


def test_bad_input_gets_a_clear_error_and_the_broker_serves_on(env: Env) -> None:
    with env.here.client() as client:
        with pytest.raises(BadKeyError, match="DER TSS2"):
            client.import_key(b"\x30\x03\x02\x01\x01")
        loadable = client.wrap_key(software_key("p256"))
        with pytest.raises(BadKeyError, match="loadable already"):
            client.import_key(loadable)
        # a duplicate altered in one byte fails the TPM's integrity check
        importable = bytearray(tpmbroker.wrap_key(software_key("p256"),
                                                  client.parent_public()))
        importable[-5] ^= 0x01
        with pytest.raises(BadKeyError, match="refused to import"):
            client.import_key(bytes(importable))
        assert len(client.random(8)) == 8
    (env.dir / "not-a-key.pem").write_bytes(b"hello")
    res = env.cli("keygen", "--wrap", "not-a-key.pem", "-o", "x.pem", check=False)
    assert res.returncode != 0 and b"cannot read the key" in res.stderr


# --- a TPM elsewhere ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_wrapping_for_a_tpm_elsewhere(env: Env, kind: str) -> None:
    # its owner hands out the parent's public key ...
    env.cli("parent-pubkey", "-o", "there-parent.pem", socket_path=env.there.socket)
    key = software_key(kind)
    write_key(env, f"far-{kind}.soft.pem", key)
    # ... and the file is made with no broker and no TPM at all
    env.cli("keygen", "--wrap", f"far-{kind}.soft.pem", "--import", "there-parent.pem",
            "-o", f"far-{kind}.tpm.pem", socket_path=str(env.dir / "no-broker.sock"))
    der = pem_to_der((env.dir / f"far-{kind}.tpm.pem").read_bytes())
    assert bytes.fromhex("06066781050a0104") in der  # the importable OID
    # openssl_tpm2_engine reads secret [2] as a marshalled TPM2B_ENCRYPTED_SECRET
    secret = asn1.decode_der(TPMKeyAsn1, der).secret
    assert secret is not None and int.from_bytes(secret[:2], "big") == len(secret) - 2
    # that TPM loads it and signs, through the provider and through Python
    (env.dir / "far-data").write_bytes(b"provisioned from afar")
    verify(key, env.there.openssl_sign(f"far-{kind}.tpm.pem", "far-data"),
           b"provisioned from afar")
    with env.there.client() as client:
        loaded = client.load_key(der)
        verify(key, client.sign(loaded, hashlib.sha256(b"far").digest()), b"far")
        # and IMPORT turns it into a loadable file for that TPM
        loadable = client.import_key(der)
        verify(key, client.sign(client.load_key(loadable),
                                hashlib.sha256(b"far2").digest()), b"far2")
    # this TPM cannot recover the seed
    with env.here.client() as client, pytest.raises(BadKeyError, match="another TPM"):
        client.load_key(der)


def test_parent_public_matches_the_tpm2b_form(env: Env) -> None:
    with env.there.client() as client:
        public = client.parent_public()
    env.cli("parent-pubkey", "--format", "tpm", "-o", "there-parent.tpm",
            socket_path=env.there.socket)
    assert (env.dir / "there-parent.tpm").read_bytes() == public
    with env.there.client() as client:
        key = software_key("p256")
        der = tpmbroker.wrap_key(key, public)
        verify(key, client.sign(client.load_key(der), hashlib.sha256(b"2b").digest()), b"2b")


@pytest.mark.parametrize("form", ["sec1-der", "pkcs1-pem", "pkcs8-der"])
def test_other_encodings_of_the_software_key(env: Env, form: str) -> None:
    key = software_key("rsa2048" if form == "pkcs1-pem" else "p256")
    encoding = serialization.Encoding.PEM if form.endswith("pem") else serialization.Encoding.DER
    fmt = (serialization.PrivateFormat.PKCS8 if form.startswith("pkcs8")
           else serialization.PrivateFormat.TraditionalOpenSSL)
    data = key.private_bytes(encoding, fmt, serialization.NoEncryption())
    with env.here.client() as client:
        der = client.wrap_key(data)
        loaded = client.load_key(der)
        verify(key, client.sign(loaded, hashlib.sha256(form.encode()).digest()), form.encode())


def test_import_message_hides_passwords() -> None:
    assert "parentpass" not in repr(Import(0, b"k", b"parentpass"))
