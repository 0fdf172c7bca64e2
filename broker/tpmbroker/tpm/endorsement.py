"""The TPM's endorsement key (EK): its certificates in NV, its templates, the key itself.

The EK is a primary key of the endorsement hierarchy made from a TCG template (TCG EK
Credential Profile for TPM Family 2.0); the TPM maker certifies its public key in a
certificate stored in NV (0x01c00002 for RSA 2048, 0x01c0000a for ECC P-256, and the
high range from 0x01c00012). The same template gives the same key for the life of the
TPM's endorsement seed, so a key made now can be compared with the certificate.

What is trusted is decided in tpmbroker.ek_trust (pure); this module only talks to the
TPM: `establish` (the start of `serve`: the mode, the EK the pool is salted to) and
`enroll` (`tpmbroker enroll`: the EK to pin). The EK is a restricted decryption key, so
it can be the tpmKey of TPM2_StartAuthSession: its authPolicy does not matter for that,
StartAuthSession needs no authorization of the salt key.

The certificates are public and read without sessions; what makes them authentic is the
chain, and what makes the key the TPM answers authentic is its equality with the
certified (or pinned) key. An answer altered on the bus fails that comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from .. import ek_trust
from ..audit import audit
from ..ek_trust import EkPin, EkTrustError, Identity, TrustConfig
from ..errors import TpmUnavailableError
from ..keyfile import pyca_curve
from . import command
from .rc import tpm_code

if TYPE_CHECKING:
    from .objects import Objects

log = logging.getLogger("tpmbroker.tpm")

# The EK templates tried, in order of preference: ECC first (one ECDH per session start
# instead of an RSA decryption), then RSA. tpm2-pytss's names (TCG's L-1, H-3, ...).
KINDS = ("EK-ECC256", "EK-HIGH-ECC256", "EK-HIGH-ECC384", "EK-HIGH-ECC521",
         "EK-RSA2048", "EK-HIGH-RSA2048", "EK-HIGH-RSA3072", "EK-HIGH-RSA4096")
NV_EK_RSA2048 = 0x01C00002
NV_EK_ECC256 = 0x01C0000A
TPM_RS_PW = 0x40000009
CC_NV_READ = 0x0000014E
NV_CHUNK = 512  # bytes per TPM2_NV_Read: within every TPM's MAX_NV_BUFFER_SIZE
RC_HANDLE = 0x08B

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# A password session with the empty password: the EK certificate indices are readable
# with their own (empty) authValue, and nothing secret is in the command.
_EMPTY_PASSWORD = _U32.pack(9) + _U32.pack(TPM_RS_PW) + _U16.pack(0) + b"\0" + _U16.pack(0)


class IdentityError(TpmUnavailableError):
    """The TPM failed the identity check; the broker refuses it. The message says why."""


# --- NV ------------------------------------------------------------------------------------

def nv_read(transport: command.Transport, index: int) -> bytes | None:
    """The whole contents of NV index `index` (authorized by its own empty authValue);
    None if the TPM has no such index."""
    try:
        public, _ = command.nv_read_public(transport, index)
    except TSS2_Exception as exc:
        if tpm_code(int(exc.rc)) == RC_HANDLE:
            return None
        raise
    size = int(public.dataSize)
    data = b""
    while len(data) < size:
        want = min(NV_CHUNK, size - len(data))
        data += _nv_read_chunk(transport, index, want, len(data))
    return data


def _nv_read_chunk(transport: command.Transport, index: int, size: int, offset: int) -> bytes:
    body = _EMPTY_PASSWORD + _U16.pack(size) + _U16.pack(offset)
    response = command.transact(transport, command.command(
        command.ST_SESSIONS, CC_NV_READ, (index, index), body))
    rc = command.response_code(response)
    if rc != command.RC_SUCCESS:
        raise TSS2_Exception(rc)
    # header, parameterSize, TPM2B_MAX_NV_BUFFER, then the password session's answer.
    parameters = response[command.HEADER_SIZE + 4:]
    length = command.first_sized_length(parameters)
    if length != size:
        raise command.malformed()
    return parameters[2:2 + length]


def certificates(transport: command.Transport) -> list[tuple[str, bytes, Any]]:
    """(kind, DER, TPM2B_PUBLIC template) of every EK certificate the TPM holds, in the
    order of KINDS: the template read with the certificate, so neither is read twice."""
    found = []
    for kind in KINDS:
        try:
            der, public_template = create_ek_template(kind, _reader(transport))
        except ValueError:
            continue  # a high-range kind without its certificate
        if der:
            found.append((kind, bytes(der), public_template))
    return found


def template(kind: str, transport: command.Transport) -> Any:
    """The TPM2B_PUBLIC to make the EK of `kind` with: the TCG template, with the
    template and nonce the TPM maker may have stored in NV (tpm2-pytss's
    create_ek_template reads them, and the certificate, through `nv_read`)."""
    try:
        _, public = create_ek_template(kind, _reader(transport))
    except ValueError as exc:
        raise IdentityError(f"{kind}: {exc}; known kinds: {', '.join(KINDS)} (the high "
                            "range only where the TPM holds its certificate)") from None
    return public


def _reader(transport: command.Transport) -> Callable[[Any], bytes]:
    def read(index: Any) -> bytes:
        data = nv_read(transport, int(index))
        if data is None:
            raise NoSuchIndex(index)
        return data
    return read


# --- the key -------------------------------------------------------------------------------

def create(ectx: Any, public_template: Any) -> tuple[Any, Any]:
    """TPM2_CreatePrimary of the EK under the endorsement hierarchy (its authValue is
    empty on every TPM this is for): (ESYS_TR, TPMT_PUBLIC)."""
    handle, public, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), public_template,
                                             ESYS_TR.ENDORSEMENT)
    return handle, public.publicArea


def public_key(public: Any) -> Any:
    """A TPMT_PUBLIC (RSA or ECC) as a cryptography public key."""
    if public.type == TPM2_ALG.RSA:
        exponent = int(public.parameters.rsaDetail.exponent) or 65537
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(bytes(public.unique.rsa),
                                                             "big")).public_key()
    if public.type == TPM2_ALG.ECC:
        curve = pyca_curve(int(public.parameters.eccDetail.curveID))
        if curve is None:
            raise ValueError("the EK is on a curve cryptography does not have")
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(bytes(public.unique.ecc.x), "big"),
            int.from_bytes(bytes(public.unique.ecc.y), "big"), curve).public_key()
    raise ValueError("an EK is RSA or ECC")


def spki(public: Any) -> bytes:
    return ek_trust.spki(public_key(public))


@dataclasses.dataclass
class Endorsement:
    """The EK the broker salts to: its template, its public area as verified, and its
    handle while it is loaded."""

    identity: Identity
    template: Any  # TPM2B_PUBLIC
    public: Any  # TPMT_PUBLIC, the verified one
    handle: Any = None  # ESYS_TR

    def matches(self, public: Any) -> bool:
        """Whether a public area the TPM answered now is the verified EK's."""
        return bytes(public.marshal()) == bytes(self.public.marshal())


Create = Callable[[Any], tuple[Any, Any]]


def establish(transport: command.Transport, create_ek: Create, trust: TrustConfig,
              unverified_reason: str = "") -> Endorsement | Identity:
    """The TPM's identity by `trust`: the Endorsement to salt to once verified, or the
    unverified Identity. IdentityError (with the reason) if the TPM fails."""
    mode = trust.mode
    if mode == ek_trust.UNVERIFIED:
        reason = unverified_reason or ("--tpm-unverified" if trust.unverified else
                                       "no --ek-ca and no EK pin (tpmbroker enroll)")
        return Identity(ek_trust.UNVERIFIED, reason=reason)
    try:
        if mode == ek_trust.VERIFIED_BY_CERTIFICATE:
            return _by_certificate(transport, create_ek, trust)
        assert trust.pin is not None
        return _by_pin(transport, create_ek, trust.pin)
    except IdentityError:
        raise
    except EkTrustError as exc:
        raise IdentityError(str(exc)) from None


def verify(objects: Objects, trust: TrustConfig, unverified_reason: str = "") -> Identity:
    """The TPM's identity checked at the first connection, before any session is
    salted. Verified, the EK becomes what `objects` salts to; IdentityError, logged and
    audited, if the TPM fails the check."""
    link = objects.link

    def create_ek(public_template: Any) -> tuple[Any, Any]:
        return objects.with_room(None, lambda: create(link.ectx, public_template))

    try:
        found = establish(link.require(), create_ek, trust, unverified_reason)
    except IdentityError as exc:
        log.error("TPM identity: refused: %s", exc.message)
        audit("tpm_identity_refused", reason=exc.message, tcti=link.tcti)
        raise
    if isinstance(found, Endorsement):
        objects.endorsement = found
        log.info("%s", found.identity.log_line())
        return found.identity
    log.warning("%s", found.log_line())
    return found


def _by_certificate(transport: command.Transport, create_ek: Create,
                    trust: TrustConfig) -> Endorsement:
    found = certificates(transport)
    if not found:
        raise IdentityError(
            f"the TPM holds no EK certificate (NV 0x{NV_EK_RSA2048:08x}, "
            f"0x{NV_EK_ECC256:08x} and the high range): pin its EK with `tpmbroker "
            "enroll` instead of --ek-ca")
    refusals = []
    for kind, der, public_template in found:
        try:
            cert = ek_trust.verify_ek_certificate(der, trust.anchors)
        except EkTrustError as exc:
            refusals.append(f"{kind}: {exc}")
            continue
        handle, public = create_ek(public_template)
        try:
            ek_trust.check_certified_key(cert, spki(public))
        except EkTrustError as exc:
            raise IdentityError(f"{kind}: {exc}") from None
        identity = Identity(ek_trust.VERIFIED_BY_CERTIFICATE, kind,
                            ek_trust.fingerprint(spki(public)), ek_trust.describe(cert))
        return Endorsement(identity, public_template, public, handle)
    raise IdentityError("no EK certificate of this TPM chains to the trust anchors"
                        + (f" ({trust.anchors_source})" if trust.anchors_source else "")
                        + "; give the CA that issued it with its intermediates: "
                        + "; ".join(refusals))


def _by_pin(transport: command.Transport, create_ek: Create, pin: EkPin) -> Endorsement:
    public_template = template(pin.kind, transport)
    handle, public = create_ek(public_template)
    pin.check(spki(public))
    identity = Identity(ek_trust.VERIFIED_BY_PIN, pin.kind, pin.fingerprint)
    return Endorsement(identity, public_template, public, handle)


def enroll(transport: command.Transport, create_ek: Create, flush: Callable[[Any], None],
           kind: str | None = None, has_ecc: bool = True) -> EkPin:
    """The pin of this TPM's EK (`tpmbroker enroll`): of `kind`, else of the first
    kind the TPM has a certificate for, else EK-ECC256 (EK-RSA2048 without ECC)."""
    if kind is None:
        found = certificates(transport)
        kind = found[0][0] if found else ("EK-ECC256" if has_ecc else "EK-RSA2048")
    handle, public = create_ek(template(kind, transport))
    with contextlib.suppress(TSS2_Exception):
        flush(handle)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return EkPin(kind, spki(public), now.isoformat())
