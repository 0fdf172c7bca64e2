"""TPM keys as `cryptography` private keys: x509 builders, PSS rules, threads, fork."""

from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import UnsupportedError
from tpmbroker.keyfile import der_to_pem

from .tpmfixtures import Broker


def _key_file(broker: Broker, tmp_path: Path, key_type: p.KeyType, param: int,
              password: str | None = None) -> Path:
    with Client(broker.socket) as client:
        der, _ = client.generate_key(key_type, param, password)
    path = tmp_path / f"{key_type.name}-{param}.pem"
    path.write_bytes(der_to_pem(der))
    return path


@pytest.fixture
def ec_key(broker: Broker, tmp_path: Path) -> tpmbroker.TpmEllipticCurvePrivateKey:
    key = tpmbroker.load_private_key(_key_file(broker, tmp_path, p.KeyType.EC, p.Curve.P256),
                                     socket=broker.socket)
    assert isinstance(key, tpmbroker.TpmEllipticCurvePrivateKey)
    return key


@pytest.fixture
def rsa_key(broker: Broker, tmp_path: Path) -> tpmbroker.TpmRSAPrivateKey:
    key = tpmbroker.load_private_key(_key_file(broker, tmp_path, p.KeyType.RSA, 2048),
                                     socket=broker.socket)
    assert isinstance(key, tpmbroker.TpmRSAPrivateKey)
    return key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str,
                 **sign_kwargs: object) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256(), **sign_kwargs))  # type: ignore[arg-type]


def test_key_classes_are_cryptography_keys(ec_key: ec.EllipticCurvePrivateKey,
                                           rsa_key: rsa.RSAPrivateKey) -> None:
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ec_key.curve, ec.SECP256R1) and ec_key.key_size == 256
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    for key in (ec_key, rsa_key):
        with pytest.raises(UnsupportedError, match="TPM"):
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        with pytest.raises(UnsupportedError):
            key.private_numbers()
    with pytest.raises(UnsupportedError):
        rsa_key.decrypt(b"x", padding.PKCS1v15())
    with pytest.raises(UnsupportedError):
        ec_key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())


def test_csr_and_self_signed_certificates_verify(ec_key: ec.EllipticCurvePrivateKey,
                                                 rsa_key: rsa.RSAPrivateKey) -> None:
    for key in (ec_key, rsa_key):
        csr = (x509.CertificateSigningRequestBuilder().subject_name(_name("tpm"))
               .sign(key, hashes.SHA256()))
        assert csr.is_signature_valid
        cert = _self_signed(key, "self")
        cert.verify_directly_issued_by(cert)
    pss = _self_signed(rsa_key, "pss", rsa_padding=padding.PSS(
        padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH))
    pss.verify_directly_issued_by(pss)


def test_a_tpm_ca_signs_a_leaf(ec_key: ec.EllipticCurvePrivateKey) -> None:
    ca = _self_signed(ec_key, "TPM CA")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(_name("leaf")).issuer_name(ca.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ec_key, hashes.SHA384()))
    leaf.verify_directly_issued_by(ca)
    with pytest.raises(Exception):  # noqa: B017 - a leaf is no issuer of the CA: must fail
        ca.verify_directly_issued_by(leaf)


def test_rsa_padding_rules(rsa_key: rsa.RSAPrivateKey) -> None:
    data = b"padding rules"
    public = rsa_key.public_key()
    for salt in (padding.PSS.DIGEST_LENGTH, padding.PSS.AUTO, 32):
        pad = padding.PSS(padding.MGF1(hashes.SHA256()), salt)
        sig = rsa_key.sign(data, pad, hashes.SHA256())
        public.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                      hashes.SHA256())
    with pytest.raises(UnsupportedError, match="MAX_LENGTH"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                     hashes.SHA256())
    with pytest.raises(UnsupportedError, match="salt"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 20), hashes.SHA256())
    with pytest.raises(UnsupportedError, match="MGF1"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA1()), 32), hashes.SHA256())
    sig = rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA512())
    public.verify(sig, data, padding.PKCS1v15(), hashes.SHA512())


def test_prehashed_digests(ec_key: ec.EllipticCurvePrivateKey,
                           rsa_key: rsa.RSAPrivateKey) -> None:
    digest = hashes.Hash(hashes.SHA384())
    digest.update(b"prehashed")
    value = digest.finalize()
    sig = ec_key.sign(value, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    ec_key.public_key().verify(sig, b"prehashed", ec.ECDSA(hashes.SHA384()))
    sig = rsa_key.sign(value, padding.PKCS1v15(), utils.Prehashed(hashes.SHA384()))
    rsa_key.public_key().verify(sig, b"prehashed", padding.PKCS1v15(), hashes.SHA384())
    with pytest.raises(ValueError):
        ec_key.sign(value[:-1], ec.ECDSA(utils.Prehashed(hashes.SHA384())))


def test_32_threads_share_one_key_object(ec_key: ec.EllipticCurvePrivateKey) -> None:
    failures: list[BaseException] = []
    public = ec_key.public_key()

    def sign_many(index: int) -> None:
        try:
            for i in range(10):
                data = f"{index}-{i}".encode()
                public.verify(ec_key.sign(data, ec.ECDSA(hashes.SHA256())), data,
                              ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=sign_many, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_key_object_works_in_a_forked_child(ec_key: ec.EllipticCurvePrivateKey) -> None:
    ec_key.sign(b"parent first", ec.ECDSA(hashes.SHA256()))  # the parent holds a connection
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            data = b"child"
            ec_key.public_key().verify(ec_key.sign(data, ec.ECDSA(hashes.SHA256())), data,
                                       ec.ECDSA(hashes.SHA256()))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    data = b"parent after"
    ec_key.public_key().verify(ec_key.sign(data, ec.ECDSA(hashes.SHA256())), data,
                               ec.ECDSA(hashes.SHA256()))


def test_password_protected_key(broker: Broker, tmp_path: Path) -> None:
    path = _key_file(broker, tmp_path, p.KeyType.EC, p.Curve.P384, "pw")
    key = tpmbroker.load_private_key(path, password="pw", socket=broker.socket)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.key_size == 384
    data = b"with password"
    key.public_key().verify(key.sign(data, ec.ECDSA(hashes.SHA384())), data,
                            ec.ECDSA(hashes.SHA384()))
