"""Key attestation statements: what proves a key lives in a TPM, made and checked.

The format, tpmbroker-tpm-attestation-1, is the WebAuthn "tpm" attestation statement
(W3C Web Authentication Level 2, §8.3; what ACME device-attest-01 carries) with its
fields exactly: `ver` "2.0", `alg` (COSE ES256), `x5c` [aikCert, its issuer], `sig` (the
attestation key's ECDSA signature over certInfo, DER, as WebAuthn verifiers check ES256),
`certInfo` (the TPMS_ATTEST of TPM2_Certify) and `pubArea` (the certified key's
TPMT_PUBLIC). It is JSON, byte strings in base64, with two members beside `fmt` and
`attStmt`: `attToBeSigned` (the data whose SHA-256 is certInfo's extraData: WebAuthn's
authenticatorData || clientDataHash, here the verifier's challenge) and `tpmbroker`
(the attestation key's TPMT_PUBLIC and the TPM's EK certificate, what an offline
verifier needs beyond WebAuthn). docs/attestation.md says what each check proves.

Pure: cryptography and tpm2-pytss's marshalling types; no TPM.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC

from . import ek_trust

FORMAT = "tpmbroker-tpm-attestation-1"
COSE_ES256 = -7
TPM_GENERATED_VALUE = 0xFF544347
RH_ENDORSEMENT = 0x4000000B
# The TCG OIDs of WebAuthn's aikCert requirements (§8.3.1).
OID_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")
TPM_IDENTITY_OIDS = (x509.ObjectIdentifier("2.23.133.2.1"),  # tcpaTpmManufacturer
                     x509.ObjectIdentifier("2.23.133.2.2"),  # tcpaTpmModel
                     x509.ObjectIdentifier("2.23.133.2.3"))  # tcpaTpmVersion
# A key the TPM made and that cannot leave it: what "resident in this TPM" means.
RESIDENT = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
_RESIDENT_NAMES = ((TPMA_OBJECT.FIXEDTPM, "fixedTPM"), (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),
                   (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"))
AK_ATTRIBUTES = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | RESIDENT
                 | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
CERT_DAYS = 365
MAX_STATEMENT = 60000  # fits one wire field


# What checking a signature raises when a certificate was altered: a bad signature, or
# one cryptography cannot even compute (an altered curve or algorithm identifier).
_BAD_SIGNATURE = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm)


class AttestationError(ValueError):
    """A statement refused: `field` names the statement's field at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --- keys in TPM terms ------------------------------------------------------------------

def ak_template() -> Any:
    """The attestation key's TPMT_PUBLIC: a restricted ECDSA P-256/SHA-256 signing key
    with an empty authValue and no dictionary-attack counting. Made as a primary of the
    endorsement hierarchy, it is the same key for the life of the endorsement seed."""
    return TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES)


def name_of(public: Any) -> bytes:
    """A TPMT_PUBLIC's Name: nameAlg, then the digest of the marshalled area."""
    return bytes(public.get_name().marshal())[2:]


def resident_missing(attributes: int) -> list[str]:
    """The attributes of a TPM-resident key that `attributes` lacks."""
    return [name for bit, name in _RESIDENT_NAMES if not attributes & bit]


def public_key_of(public: Any) -> Any:
    """A TPMT_PUBLIC (RSA or ECC) as a cryptography public key."""
    return serialization.load_pem_public_key(bytes(public.to_pem()))


def _spki(key: Any) -> bytes:
    return ek_trust.spki(key)


def tpm_identity(ek_cert: x509.Certificate) -> x509.Name:
    """The directory name in the EK certificate's subjectAltName naming the TPM's
    manufacturer, model and firmware version (TCG EK Credential Profile)."""
    try:
        san = ek_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise ValueError("the EK certificate has no subjectAltName naming the TPM") from None
    for name in san.value.get_values_for_type(x509.DirectoryName):
        if all(name.get_attributes_for_oid(oid) for oid in TPM_IDENTITY_OIDS):
            return name
    raise ValueError("the EK certificate's subjectAltName names no TPM manufacturer, "
                     "model and version")


# --- the attestation CA ------------------------------------------------------------------

CA_UNIQUE = b"tpmbroker attestation CA"


def ca_template() -> Any:
    """The attestation CA's key: an ECDSA P-256/SHA-256 signing primary of the
    endorsement hierarchy, told apart from other such primaries by its unique field. The
    same key for the life of the endorsement seed: verifiers pin its public key."""
    public = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null",
                               objectAttributes=AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED)
    public.unique.ecc.x = CA_UNIQUE
    return public


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS)))


def ca_certificate(signer: ec.EllipticCurvePrivateKey,
                   ek_cert: x509.Certificate) -> x509.Certificate:
    """The attestation CA's self-signed certificate, naming the EK it vouches for in its
    subject serialNumber (SHA-256 of the EK's SubjectPublicKeyInfo)."""
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "tpmbroker attestation CA"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, ek_binding(ek_cert))])
    public = signer.public_key()
    return (_validity(x509.CertificateBuilder()).subject_name(subject).issuer_name(subject)
            .public_key(public)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, False,
                                         False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(signer, hashes.SHA256()))


def ak_certificate(signer: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                   ek_cert: x509.Certificate, ak_public: Any) -> x509.Certificate:
    """The aikCert of the AK whose TPMT_PUBLIC is `ak_public`, issued once credential
    activation proved it is in the TPM of `ek_cert`: WebAuthn's profile (version 3,
    empty subject, the TPM named in a critical subjectAltName, extended key usage
    tcg-kp-AIKCertificate, not a CA), its subjectKeyIdentifier the AK's Name so that the
    exact public area, attributes and all, is certified."""
    return (_validity(x509.CertificateBuilder()).subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject).public_key(public_key_of(ak_public))
            .add_extension(x509.SubjectAlternativeName([
                x509.DirectoryName(tpm_identity(ek_cert))]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([OID_AIK_CERTIFICATE]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier(name_of(ak_public)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))


def ek_binding(ek_cert: x509.Certificate) -> str:
    """What the attestation CA's subject serialNumber says: the EK it vouches for."""
    return "ek-sha256:" + hashlib.sha256(_spki(ek_cert)).hexdigest()


# --- the statement ------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_statement(*, cert_info: bytes, signature: bytes, pub_area: bytes,
                   ak_pub_area: bytes, ak_cert: bytes, ca_cert: bytes,
                   ek_certs: Sequence[bytes], att_to_be_signed: bytes) -> bytes:
    """The statement as JSON (UTF-8)."""
    statement = {
        "fmt": "tpm",
        "attStmt": {"ver": "2.0", "alg": COSE_ES256, "x5c": [_b64(ak_cert), _b64(ca_cert)],
                    "sig": _b64(signature), "certInfo": _b64(cert_info),
                    "pubArea": _b64(pub_area)},
        "attToBeSigned": _b64(att_to_be_signed),
        "tpmbroker": {"format": FORMAT, "akPubArea": _b64(ak_pub_area),
                      "ekCertificates": [_b64(c) for c in ek_certs]},
    }
    return json.dumps(statement, indent=1).encode() + b"\n"


@dataclasses.dataclass(frozen=True)
class Verified:
    """What a statement proved."""

    public_key: bytes  # the attested key, DER SubjectPublicKeyInfo
    key_name: bytes  # its TPM Name
    ek: str  # the EK's fingerprint (ek_trust.fingerprint)
    ek_issuer: str
    attestation_ca: str  # fingerprint of the CA that certified the AK
    attestation_ca_anchored: bool  # among the verifier's attestation anchors

    def summary(self) -> str:
        head = (f"key {ek_trust.fingerprint(self.public_key)} (TPM Name "
                f"{self.key_name.hex()}) resident in the TPM of EK {self.ek} "
                f"({self.ek_issuer}); attestation CA {self.attestation_ca}")
        if self.attestation_ca_anchored:
            return "verified: " + head + " (pinned)"
        return ("consistent: " + head + " (NOT pinned: without --attestation-ca, anyone "
                "holding this TPM's public EK certificate could have made this statement)")


class _Fields:
    """The statement's members, each read and decoded naming its field on failure."""

    def __init__(self, data: bytes) -> None:
        try:
            self.doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AttestationError("statement", f"not JSON: {exc}") from None
        if not isinstance(self.doc, dict):
            raise AttestationError("statement", "not a JSON object")

    def get(self, path: str) -> Any:
        value: Any = self.doc
        for part in path.replace("]", "").replace("[", ".").split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise AttestationError(path, "missing")
        return value

    def bytes(self, path: str) -> bytes:
        value = self.get(path)
        if not isinstance(value, str):
            raise AttestationError(path, "not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise AttestationError(path, "not base64") from None

    def certificate(self, path: str) -> x509.Certificate:
        data = self.bytes(path)
        try:
            cert = x509.load_der_x509_certificate(data)
            cert.version  # noqa: B018 - raises InvalidVersion for an unknown one
        except (ValueError, TypeError, x509.InvalidVersion) as exc:
            raise AttestationError(path, f"not a DER X.509 certificate: {exc}") from None
        # The signature BIT STRING's unused-bits octet is not signed and cryptography
        # ignores it; DER says 0. Anything else is an altered certificate.
        if not data.endswith(b"\x00" + cert.signature):
            raise AttestationError(path, "not DER: its signature is not a whole-octet "
                                         "BIT STRING")
        return cert

    def tpm(self, path: str, kind: Any) -> Any:
        data = self.bytes(path)
        try:
            value, used = kind.unmarshal(data)
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise AttestationError(path, f"not a {kind.__name__}: {exc}") from None
        if used != len(data):
            raise AttestationError(path, f"{len(data) - used} bytes after the "
                                         f"{kind.__name__}")
        return value


def verify(statement: bytes, ek_anchors: Sequence[x509.Certificate], *,
           challenge: bytes | None = None,
           attestation_anchors: Sequence[x509.Certificate] = (),
           when: datetime.datetime | None = None) -> Verified:
    """Check a statement from itself and the EK trust anchors alone, no TPM: the
    Verified facts, or AttestationError naming the field at fault.

    From the anchors outward: the EK certificate chains to `ek_anchors`; the
    attestation CA names that EK and signed the aikCert; the aikCert follows WebAuthn's
    profile, names the EK certificate's TPM and certifies the AK's exact public area, a
    restricted signing key fixed to the TPM; the AK signed certInfo, a TPM2_Certify of
    the key's Name over SHA-256(attToBeSigned); the key's public area is that Name and
    says the TPM made the key and it cannot leave (fixedTPM, fixedParent,
    sensitiveDataOrigin). `challenge`, if given, must be attToBeSigned.
    `attestation_anchors`, if given, must hold the attestation CA.
    """
    if len(statement) > MAX_STATEMENT:
        raise AttestationError("statement", f"{len(statement)} bytes, more than any "
                                            "statement ({MAX_STATEMENT})")
    when = when or datetime.datetime.now(datetime.timezone.utc)
    f = _Fields(statement)
    if f.get("fmt") != "tpm":
        raise AttestationError("fmt", f"{f.get('fmt')!r}, not 'tpm'")
    if f.get("tpmbroker.format") != FORMAT:
        raise AttestationError("tpmbroker.format", f"not {FORMAT!r}")
    if f.get("attStmt.ver") != "2.0":
        raise AttestationError("attStmt.ver", f"{f.get('attStmt.ver')!r}, not '2.0'")
    if f.get("attStmt.alg") != COSE_ES256:
        raise AttestationError("attStmt.alg", f"{f.get('attStmt.alg')!r}: only ES256 (-7), "
                                              "the attestation key's algorithm, is made")

    # The EK, from its certificate and the anchors.
    ek_list = f.get("tpmbroker.ekCertificates")
    if not isinstance(ek_list, list) or not ek_list:
        raise AttestationError("tpmbroker.ekCertificates", "not a list of certificates")
    ek_cert = f.certificate("tpmbroker.ekCertificates[0]")
    intermediates = [f.certificate(f"tpmbroker.ekCertificates[{i}]")
                     for i in range(1, len(ek_list))]
    try:
        ek_trust.verify_ek_certificate(ek_cert.public_bytes(serialization.Encoding.DER),
                                       ek_anchors, intermediates, when)
    except ek_trust.EkTrustError as exc:
        raise AttestationError("tpmbroker.ekCertificates[0]", str(exc)) from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AttestationError("tpmbroker.ekCertificates[0]", str(exc)) from None
    try:
        identity = tpm_identity(ek_cert)
    except ValueError as exc:
        raise AttestationError("tpmbroker.ekCertificates[0]", str(exc)) from None

    # The attestation CA, for that EK.
    x5c = f.get("attStmt.x5c")
    if not isinstance(x5c, list) or len(x5c) != 2:
        raise AttestationError("attStmt.x5c", "not [aikCert, its issuer]")
    ca = f.certificate("attStmt.x5c[1]")
    _check_issued_by("attStmt.x5c[1]", ca, ca,
                     "the attestation CA's certificate is not self-signed by its key")
    _check_validity("attStmt.x5c[1]", ca, when)
    if [a.value for a in ca.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)] != [
            ek_binding(ek_cert)]:
        raise AttestationError("attStmt.x5c[1]", "the attestation CA vouches for another "
                                                 "EK than tpmbroker.ekCertificates[0] (its "
                                                 "subject serialNumber)")
    anchored = _spki(ca) in {_spki(anchor) for anchor in attestation_anchors}
    if attestation_anchors and not anchored:
        raise AttestationError("attStmt.x5c[1]", "the attestation CA's key is not among "
                                                 "the attestation anchors")

    # The aikCert and the AK.
    aik = f.certificate("attStmt.x5c[0]")
    _check_issued_by("attStmt.x5c[0]", aik, ca,
                     "the aikCert is not signed by the attestation CA (attStmt.x5c[1])")
    _check_validity("attStmt.x5c[0]", aik, when)
    _check_aik_profile(aik, identity)
    ak_public = f.tpm("tpmbroker.akPubArea", TPMT_PUBLIC)
    ak_name = _name("tpmbroker.akPubArea", ak_public)
    if aik.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest != ak_name:
        raise AttestationError("tpmbroker.akPubArea", "its Name is not the one the aikCert "
                                                      "certifies (subjectKeyIdentifier)")
    missing = resident_missing(int(ak_public.objectAttributes))
    if missing or not (ak_public.objectAttributes & TPMA_OBJECT.RESTRICTED
                       and ak_public.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT):
        raise AttestationError("tpmbroker.akPubArea", "not a restricted signing key fixed "
                                                      "to its TPM")
    try:
        ak_key = aik.public_key()
    except _BAD_SIGNATURE as exc:
        raise AttestationError("attStmt.x5c[0]", f"no public key: {exc}") from None
    if not isinstance(ak_key, ec.EllipticCurvePublicKey) or _spki(ak_key) != _public_spki(
            "tpmbroker.akPubArea", ak_public):
        raise AttestationError("tpmbroker.akPubArea", "not the aikCert's public key")

    # certInfo, signed by the AK.
    cert_info_bytes = f.bytes("attStmt.certInfo")
    cert_info = f.tpm("attStmt.certInfo", TPMS_ATTEST)
    if int(cert_info.magic) != TPM_GENERATED_VALUE:
        raise AttestationError("attStmt.certInfo", "magic is not TPM_GENERATED_VALUE")
    if int(cert_info.type) != int(TPM2_ST.ATTEST_CERTIFY):
        raise AttestationError("attStmt.certInfo", "not a TPM2_Certify (TPM_ST_ATTEST_CERTIFY)")
    att_to_be_signed = f.bytes("attToBeSigned")
    if bytes(cert_info.extraData) != hashlib.sha256(att_to_be_signed).digest():
        raise AttestationError("attToBeSigned", "its SHA-256 is not attStmt.certInfo's "
                                                "extraData")
    qualified = hashlib.sha256(RH_ENDORSEMENT.to_bytes(4, "big") + ak_name)
    if bytes(cert_info.qualifiedSigner.marshal())[2:] != b"\x00\x0b" + qualified.digest():
        raise AttestationError("attStmt.certInfo", "its qualifiedSigner is not the AK as a "
                                                   "primary of the endorsement hierarchy")
    try:
        ak_key.verify(f.bytes("attStmt.sig"), cert_info_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError("attStmt.sig", "the AK's signature over attStmt.certInfo "
                                              "does not verify") from None

    # The key.
    public = f.tpm("attStmt.pubArea", TPMT_PUBLIC)
    key_name = _name("attStmt.pubArea", public)
    if bytes(cert_info.attested.certify.name.marshal())[2:] != key_name:
        raise AttestationError("attStmt.pubArea", "its Name is not the one certInfo "
                                                  "certifies")
    missing = resident_missing(int(public.objectAttributes))
    if missing:
        raise AttestationError("attStmt.pubArea", "the key lacks " + ", ".join(missing)
                               + ": the TPM did not make it, or it may leave the TPM")
    if challenge is not None and challenge != att_to_be_signed:
        raise AttestationError("attToBeSigned", "not the challenge given")
    key_spki = _public_spki("attStmt.pubArea", public)
    return Verified(key_spki, key_name, ek_trust.fingerprint(_spki(ek_cert)),
                    ek_trust.describe(ek_cert), ek_trust.fingerprint(_spki(ca)), anchored)


def _name(field: str, public: Any) -> bytes:
    try:
        return name_of(public)
    except (ValueError, TypeError, TSS2_Exception) as exc:
        raise AttestationError(field, f"no Name: {exc}") from None


def _public_spki(field: str, public: Any) -> bytes:
    try:
        return _spki(public_key_of(public))
    except (ValueError, TypeError, TSS2_Exception) as exc:
        raise AttestationError(field, f"no public key: {exc}") from None


def _check_issued_by(field: str, cert: x509.Certificate, issuer: x509.Certificate,
                     refusal: str) -> None:
    """AttestationError(field, refusal) unless `issuer`'s key signed `cert`."""
    try:
        cert.verify_directly_issued_by(issuer)
    except _BAD_SIGNATURE:
        raise AttestationError(field, refusal) from None


def _check_validity(field: str, cert: x509.Certificate, when: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise AttestationError(field, f"not valid at {when.isoformat()} (valid "
                                      f"{cert.not_valid_before_utc.isoformat()} to "
                                      f"{cert.not_valid_after_utc.isoformat()})")


def _check_aik_profile(aik: x509.Certificate, identity: x509.Name) -> None:
    """WebAuthn §8.3.1's aikCert requirements, and the TPM it names is the EK's."""
    field = "attStmt.x5c[0]"
    if aik.version != x509.Version.v3:
        raise AttestationError(field, "not an X.509 version 3 certificate")
    if len(aik.subject) != 0:
        raise AttestationError(field, "its subject is not empty")
    try:
        eku = aik.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = aik.extensions.get_extension_for_class(x509.BasicConstraints).value
        san = aik.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        aik.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise AttestationError(field, f"lacks an extension: {exc}") from None
    if OID_AIK_CERTIFICATE not in list(eku):
        raise AttestationError(field, "its extended key usage lacks tcg-kp-AIKCertificate")
    if constraints.ca:
        raise AttestationError(field, "it is a CA certificate")
    if not san.critical or san.value.get_values_for_type(x509.DirectoryName) != [identity]:
        raise AttestationError(field, "its subjectAltName does not name the EK "
                                      "certificate's TPM (manufacturer, model, version)")
