"""Whether a TPM is the one it claims to be: its endorsement key (EK) certificate checked
against the operator's trust anchors, or its EK public key compared with a pin.

Pure: no TPM, no tpm2-pytss. tpm/endorsement.py reads the certificates from the TPM and
makes the EK; this module decides whether to trust what it read. Needing no TPM, it
can check EK certificates that come from elsewhere too.

Chains are checked with cryptography's x509 verification API (a ClientVerifier): the CA
certificates are held to its Web PKI profile for CAs (basic constraints, key usage,
signature algorithms), the EK certificate itself to no extension profile at all, since
EK certificates carry a critical subjectAltName with a directory name, an empty or
placeholder subject and TCG extensions that no Web PKI profile admits. Every
certificate the operator gives is a trust anchor, and also offered as an intermediate.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .paths import EK_PIN_FILE

# The modes the broker runs in, as STATUS and the log name them.
VERIFIED_BY_CERTIFICATE = "verified-by-certificate"
VERIFIED_BY_PIN = "verified-by-pin"
UNVERIFIED = "unverified"

PIN_FILE = EK_PIN_FILE
_PIN_FORMAT = "tpmbroker EK pin 1"
_CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")


class EkTrustError(Exception):
    """The TPM's identity cannot be trusted; the message says why."""


# --- anchors ----------------------------------------------------------------------------

def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """The certificates in `data`: a PEM bundle or one DER certificate."""
    try:
        if b"-----BEGIN" in data:
            return list(x509.load_pem_x509_certificates(data))
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise EkTrustError(f"{source}: not a certificate (PEM or DER): {exc}") from None


def load_anchors(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The trust anchors in FILE (PEM, several allowed, or DER) or in every .pem, .crt,
    .cer and .der file of DIR."""
    where = Path(path)
    if where.is_dir():
        files = sorted(p for p in where.iterdir()
                       if p.suffix.lower() in _CERT_SUFFIXES and p.is_file())
        if not files:
            raise EkTrustError(f"{where}: no certificate files (.pem, .crt, .cer, .der) in "
                               "the directory")
    elif where.is_file():
        files = [where]
    else:
        raise EkTrustError(f"{where}: no such file or directory")
    anchors: list[x509.Certificate] = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise EkTrustError(f"{file}: {exc.strerror}") from None
        if len(files) > 1 and b"-----BEGIN" in data and b"CERTIFICATE-----" not in data:
            continue  # a key or a CSR beside the certificates in a CA's directory
        anchors += load_certificates(data, str(file))
    if not anchors:
        raise EkTrustError(f"{where}: no certificates in the directory")
    return anchors


# --- public keys ------------------------------------------------------------------------

def spki(key: Any) -> bytes:
    """A public key (cryptography's, or a certificate's) as DER SubjectPublicKeyInfo."""
    if isinstance(key, x509.Certificate):
        key = key.public_key()
    data: bytes = key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def fingerprint(spki_der: bytes) -> str:
    """sha256:HEX of a SubjectPublicKeyInfo, as the log, STATUS and the pin file show it."""
    return "sha256:" + hashlib.sha256(spki_der).hexdigest()


def describe(cert: x509.Certificate) -> str:
    """Who issued an EK certificate and its serial, for the log."""
    return (f"issuer {cert.issuer.rfc4514_string() or '(empty)'}, serial "
            f"{cert.serial_number:x}")


# --- chains -----------------------------------------------------------------------------

def verify_ek_certificate(cert_der: bytes, anchors: Sequence[x509.Certificate],
                          intermediates: Iterable[x509.Certificate] = (),
                          when: datetime.datetime | None = None) -> x509.Certificate:
    """The EK certificate, once it chains to one of `anchors`; EkTrustError why not."""
    if not anchors:
        raise EkTrustError("no trust anchors to check the EK certificate against")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise EkTrustError(f"the EK certificate in the TPM is not DER X.509: {exc}") from None
    builder = PolicyBuilder().store(Store(list(anchors))).extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(),
        ee_policy=ExtensionPolicy.permit_all())
    builder = builder.time(when or datetime.datetime.now(datetime.timezone.utc))
    try:
        builder.build_client_verifier().verify(cert, [*intermediates, *anchors])
    except VerificationError as exc:
        reason = str(exc)
        if "with no interior errors" in reason:  # no issuer found among the certificates
            reason = "none of them issued it, or an intermediate up to one"
        raise EkTrustError(f"the EK certificate ({describe(cert)}) does not chain to the "
                           f"trust anchors: {reason}") from None
    return cert


def check_certified_key(cert: x509.Certificate, tpm_spki: bytes) -> None:
    """EkTrustError unless the key the TPM made is the one the certificate certifies."""
    certified = spki(cert)
    if certified != tpm_spki:
        raise EkTrustError(
            f"the EK the TPM answered ({fingerprint(tpm_spki)}) is not the key its "
            f"certificate certifies ({fingerprint(certified)}): another key was put in "
            "the TPM's answer on its way (an interposer on the TPM's bus?), or the "
            "certificate is another TPM's")


# --- pins (trust on first use) ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EkPin:
    """An EK public key recorded once by `tpmbroker enroll`: trusted because it was the
    key the TPM answered at that time, not because anyone vouches for it."""

    kind: str  # the EK template, as tpm2-pytss names it: EK-ECC256, EK-RSA2048, ...
    public_key: bytes  # DER SubjectPublicKeyInfo
    pinned_at: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def dumps(self) -> str:
        pem = serialization.load_der_public_key(self.public_key).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return json.dumps({"format": _PIN_FORMAT, "kind": self.kind,
                           "fingerprint": self.fingerprint, "pinned_at": self.pinned_at,
                           "trust": "on first use: the key the TPM answered when pinned",
                           "public_key": pem.decode()}, indent=2) + "\n"

    @classmethod
    def loads(cls, text: str, source: str) -> EkPin:
        try:
            data = json.loads(text)
            if data.get("format") != _PIN_FORMAT:
                raise ValueError(f"format is not {_PIN_FORMAT!r}")
            key = serialization.load_pem_public_key(data["public_key"].encode())
            pin = cls(str(data["kind"]), spki(key), str(data.get("pinned_at", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EkTrustError(f"{source}: not a tpmbroker EK pin: {exc}") from None
        if data.get("fingerprint") not in (None, pin.fingerprint):
            raise EkTrustError(f"{source}: the fingerprint does not match the public key")
        return pin

    def check(self, tpm_spki: bytes) -> None:
        """EkTrustError unless the TPM's EK now is the pinned one."""
        if tpm_spki != self.public_key:
            raise EkTrustError(
                f"the TPM's EK ({fingerprint(tpm_spki)}) is not the pinned one "
                f"({self.fingerprint}, pinned {self.pinned_at or 'earlier'}): another TPM, "
                "or another key put in the TPM's answer (an interposer on the TPM's bus?); "
                "if the TPM was replaced on purpose, run `tpmbroker enroll --force`")


def read_pin(path: str | os.PathLike[str]) -> EkPin | None:
    """The pin in `path`; None if there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EkTrustError(f"{path}: {exc.strerror}") from None
    return EkPin.loads(text, str(path))


def write_pin(path: str | os.PathLike[str], pin: EkPin) -> None:
    """Write the pin (readable by all: it holds a public key), replacing any atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = target.with_name(target.name + ".new")
    temporary.write_text(pin.dumps())
    temporary.chmod(0o644)
    temporary.replace(target)


# --- what the broker is asked to trust ------------------------------------------------------

@dataclasses.dataclass
class TrustConfig:
    """What `serve` was given: anchors (--ek-ca), a pin file (from `enroll`), and
    whether the operator chose to run unverified (--tpm-unverified)."""

    anchors: list[x509.Certificate] = dataclasses.field(default_factory=list)
    anchors_source: str = ""
    pin: EkPin | None = None
    pin_path: str = ""
    unverified: bool = False

    @property
    def mode(self) -> str:
        """The mode the broker will run in if the TPM passes."""
        if self.unverified:
            return UNVERIFIED
        if self.anchors:
            return VERIFIED_BY_CERTIFICATE
        if self.pin is not None:
            return VERIFIED_BY_PIN
        return UNVERIFIED


@dataclasses.dataclass(frozen=True)
class Identity:
    """The TPM's identity as the broker established it at start."""

    mode: str
    kind: str = ""  # the EK template salted to, when verified
    fingerprint: str = ""  # of that EK's public key
    certificate: str = ""  # the certificate's issuer and serial, when by certificate
    reason: str = ""  # why unverified

    def status(self) -> dict[str, object]:
        return {"tpm_identity": self.mode, "tpm_ek": self.fingerprint or None,
                "tpm_ek_kind": self.kind or None,
                "tpm_ek_certificate": self.certificate or None}

    def log_line(self) -> str:
        if self.mode == UNVERIFIED:
            return f"TPM identity: unverified ({self.reason})"
        by = self.certificate if self.mode == VERIFIED_BY_CERTIFICATE else "the pin"
        return (f"TPM identity: {self.mode}, EK {self.kind} {self.fingerprint} ({by}); "
                "sessions are salted to it")
