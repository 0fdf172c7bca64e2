"""Key attestation end to end: CERTIFY against swtpm with EK certificates from a local
CA (tests/tpmfixtures.py CertifiedTpm), the statement checked offline by
tpmbroker.attestation.verify and `tpmbroker attest --verify`, and refused after each of
its fields is tampered with. The broker's TPM traffic crosses a recording relay, which
shows that a certification takes no session of its own and that the credential the
attestation key recovers crosses the bus encrypted."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT, TPMA_SESSION
from tpm2_pytss.internal.templates import ek_template
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from tpmbroker import attestation
from tpmbroker.attestation import AttestationError, verify
from tpmbroker.client import Client
from tpmbroker.ek_trust import load_anchors
from tpmbroker.errors import BadKeyError, UnsupportedError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm import certification, command

from .relay import Relay, TamperingRelay
from .tpmfixtures import Broker, CertifiedTpm, running_swtpm

TPMBROKER = [sys.executable, "-m", "tpmbroker.cli"]
CHALLENGE = b"a fresh challenge from the CA"
CC_START_AUTH_SESSION = 0x176
CC_CERTIFY = 0x148
CC_ACTIVATE_CREDENTIAL = 0x147


class Attesting:
    """A verified broker behind a recording relay, and one genuine statement."""

    def __init__(self, broker: Broker, relay: TamperingRelay, anchors: Path) -> None:
        self.broker, self.relay, self.anchors_path = broker, relay, anchors
        self.anchors = load_anchors(anchors)
        with Client(broker.socket) as client:
            self.key_der, _ = client.generate_key(KeyType.EC, Curve.P256)
            key = client.load_key(der_to_pem(self.key_der))
            self.public_key = key.public_key
            self.statement = client.attest(key, CHALLENGE)
        self.doc = json.loads(self.statement)
        self.ca = x509.load_der_x509_certificate(base64.b64decode(self.doc["attStmt"]["x5c"][1]))

    def client(self) -> Client:
        return Client(self.broker.socket)


@pytest.fixture(scope="module")
def attesting(certified_tpm: CertifiedTpm,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attesting]:
    base = tmp_path_factory.mktemp("attest")
    with running_swtpm(certified_tpm.copy(base / "tpm")) as tpm:
        relay = TamperingRelay(tpm.port)
        try:
            with Broker(relay.tcti, base / "broker",
                        extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker:
                yield Attesting(broker, relay, certified_tpm.anchors)
        finally:
            relay.close()


def statement_with(doc: dict[str, Any], path: str, value: Any) -> bytes:
    changed = json.loads(json.dumps(doc))
    parts = path.replace("]", "").replace("[", ".").split(".")
    target = changed
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    target[int(last) if last.isdigit() else last] = value
    return json.dumps(changed).encode()


def field_bytes(doc: dict[str, Any], path: str) -> bytes:
    value: Any = doc
    for part in path.replace("]", "").replace("[", ".").split("."):
        value = value[int(part)] if part.isdigit() else value[part]
    return base64.b64decode(value)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- made and verified --------------------------------------------------------------------

def test_a_tpm_key_is_attested_and_verified_offline(attesting: Attesting) -> None:
    verified = verify(attesting.statement, attesting.anchors, challenge=CHALLENGE,
                      attestation_anchors=[attesting.ca])
    assert verified.public_key == attesting.public_key
    assert verified.attestation_ca_anchored
    assert "swtpm-localca" in verified.ek_issuer
    assert verified.summary().startswith("verified: key sha256:")
    # The WebAuthn fields, exactly; what a WebAuthn "tpm" verifier checks holds.
    doc = attesting.doc
    assert doc["fmt"] == "tpm"
    assert set(doc["attStmt"]) == {"ver", "alg", "x5c", "sig", "certInfo", "pubArea"}
    assert (doc["attStmt"]["ver"], doc["attStmt"]["alg"]) == ("2.0", -7)
    aik = x509.load_der_x509_certificate(field_bytes(doc, "attStmt.x5c[0]"))
    public = aik.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(field_bytes(doc, "attStmt.sig"), field_bytes(doc, "attStmt.certInfo"),
                  ec.ECDSA(hashes.SHA256()))
    assert aik.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value._usages == [
        attestation.OID_AIK_CERTIFICATE]
    # Unpinned, the same statement is said to be consistent only.
    unpinned = verify(attesting.statement, attesting.anchors)
    assert not unpinned.attestation_ca_anchored
    assert unpinned.summary().startswith("consistent: ")


def test_the_attestation_ca_is_the_same_key_after_a_restart(attesting: Attesting,
                                                          certified_tpm: CertifiedTpm,
                                                          tmp_path: Path) -> None:
    """Its key derives from the endorsement seed: a pin outlives the broker."""
    with running_swtpm(certified_tpm.copy(tmp_path / "tpm")) as tpm, \
            Broker(tpm.tcti, tmp_path / "broker",
                   extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker, \
            Client(broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
        statement = client.attest(client.load_key(der_to_pem(der)), b"again")
    assert verify(statement, attesting.anchors,
                  attestation_anchors=[attesting.ca]).attestation_ca_anchored


# --- refused after tampering ------------------------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _other_ca(doc: dict[str, Any]) -> str:
    """A self-signed CA that claims the same EK, as a forger could make."""
    ek = x509.load_der_x509_certificate(field_bytes(doc, "tpmbroker.ekCertificates[0]"))
    cert = attestation.ca_certificate(ec.generate_private_key(ec.SECP256R1()), ek)
    return b64(cert.public_bytes(serialization.Encoding.DER))


def _other_ek(doc: dict[str, Any]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not a TPM maker")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return b64(cert.public_bytes(serialization.Encoding.DER))


def _ak_without_noda(doc: dict[str, Any]) -> str:
    public, _ = TPMT_PUBLIC.unmarshal(field_bytes(doc, "tpmbroker.akPubArea"))
    public.objectAttributes &= ~TPMA_OBJECT.NODA
    return b64(bytes(public.marshal()))


# (field, what it becomes, the field the refusal names)
TAMPERS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("fmt", lambda d: "packed", "fmt"),
    ("attStmt.ver", lambda d: "1.2", "attStmt.ver"),
    ("attStmt.alg", lambda d: -257, "attStmt.alg"),
    ("attStmt.x5c[0]", lambda d: b64(_flip(field_bytes(d, "attStmt.x5c[0]"), -3)),
     "attStmt.x5c[0]"),
    ("attStmt.x5c[1]", lambda d: b64(_flip(field_bytes(d, "attStmt.x5c[1]"), -3)),
     "attStmt.x5c[1]"),
    ("attStmt.x5c[1]", _other_ca, "attStmt.x5c[1]"),
    ("attStmt.sig", lambda d: b64(_flip(field_bytes(d, "attStmt.sig"), -1)), "attStmt.sig"),
    ("attStmt.certInfo", lambda d: b64(_flip(field_bytes(d, "attStmt.certInfo"), 40)),
     "attStmt.certInfo"),
    ("attStmt.pubArea", lambda d: b64(_flip(field_bytes(d, "attStmt.pubArea"), -1)),
     "attStmt.pubArea"),
    ("attToBeSigned", lambda d: b64(b"another challenge"), "attToBeSigned"),
    ("tpmbroker.akPubArea", _ak_without_noda, "tpmbroker.akPubArea"),
    ("tpmbroker.ekCertificates[0]", _other_ek, "tpmbroker.ekCertificates[0]"),
]


@pytest.mark.parametrize(("field", "tamper", "named"), TAMPERS,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(TAMPERS)])
def test_each_tampered_field_is_refused_naming_it(attesting: Attesting, field: str,
                                                  tamper: Callable[[dict[str, Any]], Any],
                                                  named: str) -> None:
    tampered = statement_with(attesting.doc, field, tamper(attesting.doc))
    with pytest.raises(AttestationError) as refused:
        verify(tampered, attesting.anchors, attestation_anchors=[attesting.ca])
    assert named in str(refused.value), str(refused.value)


BYTE_FIELDS = ["attStmt.x5c[0]", "attStmt.x5c[1]", "attStmt.sig", "attStmt.certInfo",
               "attStmt.pubArea", "attToBeSigned", "tpmbroker.akPubArea",
               "tpmbroker.ekCertificates[0]"]


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(BYTE_FIELDS), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_any_bit_flipped_is_refused(attesting: Attesting, field: str, where: float,
                                    bit: int) -> None:
    data = field_bytes(attesting.doc, field)
    at = int(where * len(data))
    flipped = data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]
    with pytest.raises(AttestationError) as refused:
        verify(statement_with(attesting.doc, field, b64(flipped)), attesting.anchors,
               attestation_anchors=[attesting.ca])
    assert field in str(refused.value), str(refused.value)


def test_every_byte_altered_is_refused(attesting: Attesting) -> None:
    """Every byte of every binary field, its lowest and its highest bit flipped in turn
    (about 5000 statements): each refused, naming the field. Hypothesis above tries the
    other bits. It found the two things a certificate's signature does not cover: the
    BIT STRING's unused-bits octet, and fields cryptography parses only when asked."""
    accepted, misnamed = [], []
    for field in BYTE_FIELDS:
        data = field_bytes(attesting.doc, field)
        for at in range(len(data)):
            for bit in (0, 7):
                flipped = data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]
                try:
                    verify(statement_with(attesting.doc, field, b64(flipped)),
                           attesting.anchors, attestation_anchors=[attesting.ca])
                    accepted.append((field, at, bit))
                except AttestationError as exc:
                    if field not in str(exc):
                        misnamed.append((field, at, bit, str(exc)))
    assert not accepted
    assert not misnamed


def test_the_challenge_must_be_the_verifiers(attesting: Attesting) -> None:
    with pytest.raises(AttestationError, match=r"^attToBeSigned: not the challenge given"):
        verify(attesting.statement, attesting.anchors, challenge=b"mine")


def test_a_forgery_with_software_keys_passes_only_unpinned(attesting: Attesting) -> None:
    """What an offline check can and cannot prove: the EK certificate is public, so
    anyone can make a consistent statement with software keys; only the pinned
    attestation CA (which did the credential activation) tells it apart."""
    doc = attesting.doc
    ek = x509.load_der_x509_certificate(field_bytes(doc, "tpmbroker.ekCertificates[0]"))
    ca_key, ak_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = attestation.ca_certificate(ca_key, ek)
    numbers = ak_key.public_key().public_numbers()
    ak_public = attestation.ak_template()
    ak_public.unique.ecc.x, ak_public.unique.ecc.y = (numbers.x.to_bytes(32, "big"),
                                                     numbers.y.to_bytes(32, "big"))
    aik = attestation.ak_certificate(ca_key, ca, ek, ak_public)
    from tpm2_pytss.types import TPMS_ATTEST

    cert_info, _ = TPMS_ATTEST.unmarshal(field_bytes(doc, "attStmt.certInfo"))
    qualified = hashlib.sha256(attestation.RH_ENDORSEMENT.to_bytes(4, "big")
                               + attestation.name_of(ak_public)).digest()
    cert_info.qualifiedSigner = TPM2B_NAME(b"\x00\x0b" + qualified)
    info = bytes(cert_info.marshal())
    forged = dict(doc, attStmt=dict(
        doc["attStmt"], x5c=[b64(aik.public_bytes(serialization.Encoding.DER)),
                             b64(ca.public_bytes(serialization.Encoding.DER))],
        certInfo=b64(info), sig=b64(ak_key.sign(info, ec.ECDSA(hashes.SHA256())))),
        tpmbroker=dict(doc["tpmbroker"], akPubArea=b64(bytes(ak_public.marshal()))))
    data = json.dumps(forged).encode()
    assert not verify(data, attesting.anchors).attestation_ca_anchored
    with pytest.raises(AttestationError, match=r"^attStmt.x5c\[1\]: .*not among"):
        verify(data, attesting.anchors, attestation_anchors=[attesting.ca])


# --- what the broker refuses ------------------------------------------------------------------

def test_an_imported_key_is_refused(attesting: Attesting) -> None:
    software = ec.generate_private_key(ec.SECP256R1())
    with attesting.client() as client:
        key = client.load_key(client.wrap_key(software))
        with pytest.raises(BadKeyError, match=r"lacks .*sensitiveDataOrigin .*imported or "
                                              r"wrapped"):
            client.attest(key, CHALLENGE)


def test_an_unverified_broker_refuses_to_attest(certified_swtpm: Swtpm,
                                                tmp_path: Path) -> None:
    with Broker(certified_swtpm.tcti, tmp_path / "broker") as broker, \
            Client(broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
        with pytest.raises(UnsupportedError, match="serve --ek-ca"):
            client.attest(client.load_key(der_to_pem(der)), CHALLENGE)


# --- the bus -------------------------------------------------------------------------------

def test_a_certification_takes_no_session_of_its_own(attesting: Attesting) -> None:
    with attesting.client() as client:
        key = client.load_key(der_to_pem(attesting.key_der))
        status = client.status()
        start = len(attesting.relay.commands)
        statements = [client.attest(key, bytes([n])) for n in range(3)]
        sent = attesting.relay.commands[start:]
        after = client.status()
    assert after["tpm_active_sessions"] == status["tpm_active_sessions"]
    assert after["attestations"] == status["attestations"] + 3  # type: ignore[operator]
    assert sent.count(CC_CERTIFY) == 3
    assert CC_START_AUTH_SESSION not in sent
    assert CC_ACTIVATE_CREDENTIAL not in sent  # once per attestation key, done before
    for n, statement in enumerate(statements):
        verify(statement, attesting.anchors, challenge=bytes([n]),
               attestation_anchors=[attesting.ca])


def test_a_forged_certify_answer_is_dropped(attesting: Attesting) -> None:
    """An interposer flips a bit in TPM2_Certify's answer: the session's HMAC shows it,
    the broker drops the answer and the client gets an error, then attests again."""
    def flip_certify(cmd: bytes, response: bytes) -> bytes:
        if int.from_bytes(cmd[6:10], "big") == CC_CERTIFY and len(response) > 40:
            return _flip(response, 30)
        return response

    with attesting.client() as client:
        key = client.load_key(der_to_pem(attesting.key_der))
        attesting.relay.tamper = flip_certify
        try:
            with pytest.raises(Exception, match=r"HMAC|authentic|forged|altered"):
                client.attest(key, CHALLENGE)
        finally:
            attesting.relay.tamper = lambda cmd, response: response
        verify(client.attest(key, CHALLENGE), attesting.anchors)
    assert "tpm_response_forged" in attesting.broker.log()


def test_the_recovered_credential_crosses_the_bus_encrypted(certified_swtpm: Swtpm) -> None:
    """certification.activate_credential, as the broker binds its attestation key, through a
    recording relay: the secret the TPM recovers never crosses in the clear. Control:
    the same activation without ENCRYPT shows it, so the recording would."""
    relay = Relay(certified_swtpm.port)
    secret, control = b"S" * 16 + bytes(range(16)), b"C" * 16 + bytes(range(16, 32))
    try:
        with ESAPI(relay.tcti) as ectx:
            # The TCG template as it stands: swtpm stores no template of its own in NV.
            template = TPM2B_PUBLIC(
                publicArea=ek_template.lookup("EK-RSA2048").template.publicArea)
            ek, ek_public, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template,
                                                    ESYS_TR.ENDORSEMENT)
            ak, ak_public, *_ = ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=attestation.ak_template()),
                ESYS_TR.ENDORSEMENT)
            name = TPM2B_NAME(attestation.name_of(ak_public.publicArea))
            assert certification.activate_credential(
                ectx, ak, ek, *make_credential(ek_public, secret, name)) == secret
            assert not relay.seen(secret, window=16)
            session = ectx.start_auth_session(ek, ESYS_TR.NONE, TPM2_SE.POLICY,
                                              command.aes128_cfb(), TPM2_ALG.SHA256)
            ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
            ectx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION)
            blob, encrypted = make_credential(ek_public, control, name)
            assert bytes(ectx.activate_credential(ak, ek, blob, encrypted,
                                                  session2=session)) == control
            assert relay.seen(control, window=16)
            for handle in (session, ak, ek):
                ectx.flush_context(handle)
    finally:
        relay.close()


# --- the command ----------------------------------------------------------------------------

def test_the_command_attests_pins_and_verifies(attesting: Attesting, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(der_to_pem(attesting.key_der))
    env = {"TPMBROKER_SOCKET": attesting.broker.socket, "PATH": "/usr/bin:/bin"}

    def tpmbroker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TPMBROKER, *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)

    made = tpmbroker("attest", str(key), "--challenge-hex", "c0ffee", "-o", "statement.json",
                     "--attestation-ca-out", "attestation-ca.pem")
    assert made.returncode == 0, made.stderr
    ok = tpmbroker("attest", "--verify", "statement.json", "--ek-ca",
                   str(attesting.anchors_path), "--attestation-ca", "attestation-ca.pem",
                   "--challenge-hex", "c0ffee")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("verified: key sha256:")
    doc = json.loads((tmp_path / "statement.json").read_text())
    doc["attStmt"]["sig"] = b64(_flip(field_bytes(doc, "attStmt.sig"), -1))
    (tmp_path / "tampered.json").write_text(json.dumps(doc))
    refused = tpmbroker("attest", "--verify", "tampered.json", "--ek-ca",
                        str(attesting.anchors_path))
    assert refused.returncode == 1
    assert refused.stderr.startswith("tpmbroker attest: refused: attStmt.sig: ")
