"""tpmbroker.ek_trust, with no TPM: EK certificate chains against anchors, and pins.

The certificates are made here as TPM makers make them: a root, an intermediate, and an
EK certificate with an empty subject, a critical subjectAltName holding a directory name
(the TPM's maker, model and version) and the EK certificate's extended key usage. The
same module checks swtpm_localca's certificates in tests/test_tpm_identity.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from tpmbroker.ek_trust import (
    UNVERIFIED,
    VERIFIED_BY_CERTIFICATE,
    VERIFIED_BY_PIN,
    EkPin,
    EkTrustError,
    TrustConfig,
    check_certified_key,
    fingerprint,
    load_anchors,
    read_pin,
    spki,
    verify_ek_certificate,
    write_pin,
)

NOW = datetime.datetime.now(datetime.timezone.utc)
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def ca(name: str, issuer: Issuer | None = None) -> Issuer:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(NOW + datetime.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False)
    return builder.sign(signer, hashes.SHA384()), key


def ek_certificate(ek_public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                   issuer: Issuer,
                   not_after: datetime.datetime | None = None) -> bytes:
    tpm = x509.Name([x509.NameAttribute(TPM_MANUFACTURER, "id:54504D00")])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(issuer[0].subject).public_key(ek_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(not_after or NOW + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, True, False, False, False, False,
                                         False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer[1].public_key()), critical=False)
            .sign(issuer[1], hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def maker() -> tuple[Issuer, Issuer]:
    root = ca("TPM maker root")
    return root, ca("TPM maker EK CA", root)


def test_an_ek_certificate_chains_through_its_intermediate(maker: tuple[Issuer, Issuer]) -> None:
    root, intermediate = maker
    ek = rsa.generate_private_key(65537, 2048).public_key()
    der = ek_certificate(ek, intermediate)
    cert = verify_ek_certificate(der, [root[0], intermediate[0]])
    check_certified_key(cert, spki(ek))
    # The root alone is not enough: the TPM holds only the EK certificate.
    with pytest.raises(EkTrustError, match="does not chain to the trust anchors"):
        verify_ek_certificate(der, [root[0]])
    # The intermediate alone is, as an anchor of its own.
    verify_ek_certificate(der, [intermediate[0]])


def test_refusals(maker: tuple[Issuer, Issuer]) -> None:
    root, intermediate = maker
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_root = ca("another maker")
    with pytest.raises(EkTrustError, match="does not chain"):
        verify_ek_certificate(ek_certificate(ek, other_root), [root[0], intermediate[0]])
    expired = ek_certificate(ek, intermediate, not_after=NOW - datetime.timedelta(seconds=1))
    with pytest.raises(EkTrustError, match="does not chain"):
        verify_ek_certificate(expired, [root[0], intermediate[0]])
    with pytest.raises(EkTrustError, match=r"not DER X\.509"):
        verify_ek_certificate(b"\x30\x03\x02\x01\x00", [root[0]])
    with pytest.raises(EkTrustError, match="no trust anchors"):
        verify_ek_certificate(ek_certificate(ek, intermediate), [])
    cert = verify_ek_certificate(ek_certificate(ek, intermediate), [intermediate[0]])
    substituted = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(EkTrustError, match="is not the key its certificate certifies"):
        check_certified_key(cert, spki(substituted))


def test_anchors_from_a_file_or_a_directory(maker: tuple[Issuer, Issuer], tmp_path: Path) -> None:
    root, intermediate = maker
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM)
                   for c in (intermediate[0], root[0]))
    (tmp_path / "bundle.pem").write_bytes(pem)
    assert len(load_anchors(tmp_path / "bundle.pem")) == 2
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "root.der").write_bytes(root[0].public_bytes(serialization.Encoding.DER))
    (directory / "intermediate.crt").write_bytes(
        intermediate[0].public_bytes(serialization.Encoding.PEM))
    (directory / "signkey.pem").write_bytes(root[1].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # a CA's key beside its certificates: skipped
    (directory / "notes.txt").write_text("not read")
    assert {c.subject for c in load_anchors(directory)} == {root[0].subject,
                                                            intermediate[0].subject}
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n")
    for bad, reason in ((tmp_path / "garbage.pem", "not a certificate"),
                        (tmp_path / "missing.pem", "no such file or directory"),
                        (tmp_path / "bundle.pem.d", "no such file")):
        with pytest.raises(EkTrustError, match=reason):
            load_anchors(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EkTrustError, match="no certificate files"):
        load_anchors(empty)


def test_a_pin_round_trips_and_compares(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pin = EkPin("EK-ECC256", spki(key), "2026-01-01T00:00:00+00:00")
    path = tmp_path / "state" / "ek-pin.json"
    assert read_pin(path) is None
    write_pin(path, pin)
    assert read_pin(path) == pin
    assert pin.fingerprint == fingerprint(spki(key)) and pin.fingerprint in path.read_text()
    assert "on first use" in path.read_text()
    pin.check(spki(key))
    with pytest.raises(EkTrustError, match="is not the pinned one"):
        pin.check(spki(ec.generate_private_key(ec.SECP256R1()).public_key()))
    tampered = path.read_text().replace(pin.fingerprint[-8:], "00000000")
    path.write_text(tampered)
    with pytest.raises(EkTrustError, match="fingerprint does not match"):
        read_pin(path)
    path.write_text("{}")
    with pytest.raises(EkTrustError, match="not a tpmbroker EK pin"):
        read_pin(path)


def test_the_mode_follows_what_is_given(maker: tuple[Issuer, Issuer]) -> None:
    root, _ = maker
    pin = EkPin("EK-ECC256", spki(ec.generate_private_key(ec.SECP256R1()).public_key()))
    assert TrustConfig().mode == UNVERIFIED
    assert TrustConfig(pin=pin).mode == VERIFIED_BY_PIN
    assert TrustConfig(anchors=[root[0]], pin=pin).mode == VERIFIED_BY_CERTIFICATE
    assert TrustConfig(anchors=[root[0]], unverified=True).mode == UNVERIFIED
