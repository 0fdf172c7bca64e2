"""Certificates in NV indexes: NV_READ through the pool, `handle:0x01xxxxxx` in the
provider's store, Client.nv_read; and indexes the broker must not try."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

from tpmbroker.client import Client
from tpmbroker.errors import BadKeyError, UnsupportedError
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker

OPENSSL = shutil.which("openssl") or "openssl"
PROV = ["-provider-path", str(provider_path().parent), "-provider", "default",
        "-provider", "tpmbroker"]
CERT_INDEX = 0x01000010
PASSWORD_INDEX = 0x01000011  # readable only with its password, DA-protected
pytestmark = pytest.mark.skipif(shutil.which("tpm2_nvdefine") is None,
                                reason="tpm2-tools not installed")


def certificate_der() -> bytes:
    """A self-signed certificate larger than one NV_Read chunk of swtpm, within the
    largest index it defines (2048 bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpm nv certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    for i in range(5):  # bulk, so the broker reads it in two chunks
        builder = builder.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier(f"1.3.6.1.4.1.55555.{i}"), bytes(range(256)) * 1),
            critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def define_indexes(swtpm: Swtpm, tmp_path: Path, der: bytes) -> None:
    env = dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti)
    (tmp_path / "cert.der").write_bytes(der)

    def tools(*args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, env=env, cwd=tmp_path,
                       timeout=60)

    tools("tpm2_nvdefine", hex(CERT_INDEX), "-C", "o", "-s", str(len(der)),
          "-a", "ownerread|ownerwrite|authread|authwrite")
    tools("tpm2_nvwrite", hex(CERT_INDEX), "-C", "o", "-i", "cert.der")
    tools("tpm2_nvdefine", hex(PASSWORD_INDEX), "-C", "o", "-s", "32", "-p", "secret",
          "-a", "authread|authwrite")
    (tmp_path / "small").write_bytes(bytes(32))
    tools("tpm2_nvwrite", hex(PASSWORD_INDEX), "-P", "secret", "-i", "small")


def lockout_counter(tcti: str) -> int:
    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)


def test_nv_certificate_through_client_and_openssl(swtpm: Swtpm, tmp_path: Path) -> None:
    der = certificate_der()
    assert 1024 < len(der) <= 2048  # two chunks (swtpm's NV buffer is 1024 bytes)
    define_indexes(swtpm, tmp_path, der)
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        with Client(broker.socket) as client:
            assert client.nv_read(CERT_INDEX) == der
            with pytest.raises(BadKeyError, match="no NV index at 0x01000099"):
                client.nv_read(0x01000099)
            with pytest.raises(BadKeyError, match="not an NV index"):
                client.nv_read(0x81000001)
        env = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
        res = subprocess.run([OPENSSL, "x509", *PROV, "-in", hex(CERT_INDEX).join(
            ["handle:", ""]), "-outform", "DER"], capture_output=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout == der
        res = subprocess.run([OPENSSL, "x509", *PROV, "-in", "handle:0x01000099", "-noout"],
                             capture_output=True, env=env, timeout=60)
        assert res.returncode != 0
        assert b"no NV index at 0x01000099" in res.stderr, res.stderr
    finally:
        broker.stop()


def test_nv_index_that_needs_a_password_is_not_tried(swtpm: Swtpm, tmp_path: Path) -> None:
    define_indexes(swtpm, tmp_path, certificate_der())
    before = lockout_counter(swtpm.tcti)
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        with Client(broker.socket) as client:
            for _ in range(5):
                with pytest.raises(UnsupportedError, match="readable only with its password"):
                    client.nv_read(PASSWORD_INDEX)
            status = client.status()
    finally:
        broker.stop()
    time.sleep(0.1)
    assert status["tpm_lockout_counter"] == before == lockout_counter(swtpm.tcti)


def test_nv_read_crosses_the_bus_encrypted(swtpm: Swtpm, tmp_path: Path) -> None:
    """The certificate is public, but what NV_Read returns is encrypted all the same: a
    relay between broker and swtpm never sees the bytes. tpm2_nvread, which uses no
    session, through the same relay shows they would be seen."""
    from .relay import Relay  # the relay the RANDOM bus test records with

    der = certificate_der()
    define_indexes(swtpm, tmp_path, der)
    relay = Relay(swtpm.port)
    try:
        tcti = f"swtpm:host=127.0.0.1,port={relay.port}"
        broker = Broker(tcti, tmp_path / "broker").start()
        try:
            with Client(broker.socket) as client:
                assert client.nv_read(CERT_INDEX) == der
        finally:
            broker.stop()
        assert not relay.seen(der, window=16)
        subprocess.run(["tpm2_nvread", hex(CERT_INDEX), "-C", "o", "-o", "read.der"],
                       check=True, capture_output=True, cwd=tmp_path, timeout=60,
                       env=dict(os.environ, TPM2TOOLS_TCTI=tcti))
        assert (tmp_path / "read.der").read_bytes() == der
        assert relay.seen(der, window=16)
    finally:
        relay.close()
