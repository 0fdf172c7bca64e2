"""TPM keys as `cryptography` private keys: x509 builders, PSS rules, threads, fork."""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.cryptography_keys import _references, _rsa_scheme
from tpmbroker.errors import TpmBrokerError
from tpmbroker.keyfile import der_to_pem

from .tpmfixtures import Broker


def _key_file(broker: Broker, tmp_path: Path, key_type: p.KeyType, param: int,
              password: str | None = None, usage: p.Usage = p.Usage.DEFAULT) -> Path:
    with Client(broker.socket) as client:
        der, _ = client.generate_key(key_type, param, password, usage=usage)
    path = tmp_path / f"{key_type.name}-{param}-{usage.name}.pem"
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
                                           rsa_key: rsa.RSAPrivateKey, broker: Broker,
                                           tmp_path: Path) -> None:
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ec_key.curve, ec.SECP256R1) and ec_key.key_size == 256
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    for key in (ec_key, rsa_key):
        with pytest.raises(UnsupportedAlgorithm, match="TPM"):
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        with pytest.raises(UnsupportedAlgorithm):
            key.private_numbers()
    with pytest.raises(UnsupportedAlgorithm):
        rsa_key.decrypt(b"x", padding.PSS(padding.MGF1(hashes.SHA256()), 32))  # no cipher
    # Keys made with the default usage decrypt and derive (as tpm2-openssl's do) ...
    ciphertext = rsa_key.public_key().encrypt(b"x", padding.PKCS1v15())
    assert rsa_key.decrypt(ciphertext, padding.PKCS1v15()) == b"x"
    peer = ec.generate_private_key(ec.SECP256R1())
    assert ec_key.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(
        ec.ECDH(), ec_key.public_key())
    # ... and sign-only keys (usage SIGN) refuse with the reason.
    rsa_signer = tpmbroker.load_private_key(
        _key_file(broker, tmp_path, p.KeyType.RSA, 2048, usage=p.Usage.SIGN),
        socket=broker.socket)
    ec_signer = tpmbroker.load_private_key(
        _key_file(broker, tmp_path, p.KeyType.EC, p.Curve.P256, usage=p.Usage.SIGN),
        socket=broker.socket)
    assert isinstance(rsa_signer, rsa.RSAPrivateKey)
    assert isinstance(ec_signer, ec.EllipticCurvePrivateKey)
    with pytest.raises(UnsupportedAlgorithm, match="decrypt attribute"):
        rsa_signer.decrypt(ciphertext, padding.PKCS1v15())
    with pytest.raises(UnsupportedAlgorithm, match="sign-only"):
        ec_signer.exchange(ec.ECDH(), peer.public_key())


def test_refusals_are_cryptography_exceptions(ec_key: ec.EllipticCurvePrivateKey,
                                              rsa_key: rsa.RSAPrivateKey) -> None:
    """What the TPM cannot do raises UnsupportedAlgorithm, not a broker error."""
    refusals: list[Callable[[], object]] = [
        lambda: ec_key.sign(b"x", ec.ECDSA(hashes.SHA3_256())),
        lambda: ec_key.sign(bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA3_256()))),
        lambda: rsa_key.sign(b"x", padding.PKCS1v15(), hashes.SHA512_256()),
        lambda: rsa_key.sign(bytes(32), padding.PKCS1v15(), utils.Prehashed(hashes.SM3())),
        lambda: rsa_key.sign(b"x", padding.PKCS1v15(), utils.NoDigestInfo()),
        lambda: rsa_key.sign(b"x", padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                hashes.SHA256(), None), hashes.SHA256()),
    ]
    for refuse in refusals:
        with pytest.raises(UnsupportedAlgorithm) as info:
            refuse()
        assert not isinstance(info.value, TpmBrokerError)


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
    with pytest.raises(UnsupportedAlgorithm, match="MAX_LENGTH"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                     hashes.SHA256())
    with pytest.raises(UnsupportedAlgorithm, match="salt"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 20), hashes.SHA256())
    with pytest.raises(UnsupportedAlgorithm, match="MGF1"):
        rsa_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA1()), 32), hashes.SHA256())
    sig = rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA512())
    public.verify(sig, data, padding.PKCS1v15(), hashes.SHA512())
    digest = hashes.Hash(hashes.SHA384())
    digest.update(data)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH)
    sig = rsa_key.sign(digest.finalize(), pss, utils.Prehashed(hashes.SHA384()))
    public.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())


_TPM_HASHES = {p.Hash.SHA1: hashes.SHA1(), p.Hash.SHA256: hashes.SHA256(),
               p.Hash.SHA384: hashes.SHA384(), p.Hash.SHA512: hashes.SHA512()}


@pytest.mark.parametrize("hash_alg", list(p.Hash))
def test_pss_paddings_and_prehashed_read_through_public_api(hash_alg: p.Hash) -> None:
    """No TPM: which PSS paddings and Prehashed objects map to what the TPM signs.

    cryptography exposes neither the salt length nor the MGF1 hash of a padding nor the
    hash in a Prehashed; crypto.py finds them by signing and verifying with a software key.
    """
    algorithm = _TPM_HASHES[hash_alg]
    assert _references.prehashed_alg(utils.Prehashed(algorithm)) is hash_alg
    mgf = padding.MGF1(algorithm)
    for salt in (padding.PSS.DIGEST_LENGTH, padding.PSS.AUTO, hash_alg.digest_size):
        assert _rsa_scheme(padding.PSS(mgf, salt), hash_alg) is p.Scheme.PSS
    assert _rsa_scheme(padding.PKCS1v15(), hash_alg) is p.Scheme.PKCS1
    for wrong_salt in (padding.PSS.MAX_LENGTH, 0, hash_alg.digest_size + 1, 10_000):
        with pytest.raises(UnsupportedAlgorithm, match="salt"):
            _rsa_scheme(padding.PSS(mgf, wrong_salt), hash_alg)
    other = hashes.SHA3_256() if hash_alg is not p.Hash.SHA256 else hashes.SHA384()
    for any_salt in (padding.PSS.DIGEST_LENGTH, padding.PSS.AUTO):
        with pytest.raises(UnsupportedAlgorithm, match="MGF1"):
            _rsa_scheme(padding.PSS(padding.MGF1(other), any_salt), hash_alg)


@pytest.mark.parametrize("algorithm", [hashes.SHA3_256(), hashes.SHA512_256(), hashes.SM3(),
                                       hashes.SHA3_384(), hashes.SHA3_512(),
                                       hashes.BLAKE2b(64), hashes.SHA224()])
def test_prehashed_of_other_hashes_is_refused(algorithm: hashes.HashAlgorithm) -> None:
    """Same digest size as a TPM hash is not enough: the PKCS#1 DigestInfo names the hash."""
    with pytest.raises(UnsupportedAlgorithm):
        _references.prehashed_alg(utils.Prehashed(algorithm))


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
