"""The TSS2 PRIVATE KEY file format, read and written here only.

The format (TPM 2.0 Key File, draft-bottomley-tpm2-keys, as tpm2-openssl,
openssl_tpm2_engine and tpm2-pytss write it):

    TPMKey ::= SEQUENCE {
        type        OBJECT IDENTIFIER,   -- 2.23.133.10.1.3 loadable, .4 importable
        emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,   -- absent: the key has a password
        policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
        secret      [2] EXPLICIT OCTET STRING OPTIONAL,  -- importable: encrypted seed
        authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL,
        description [4] EXPLICIT UTF8String OPTIONAL,
        rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
        parent      INTEGER,
        pubkey      OCTET STRING,        -- TPM2B_PUBLIC
        privkey     OCTET STRING }       -- TPM2B_PRIVATE (importable: the duplicate)

in PEM under the label TSS2 PRIVATE KEY. What the policies mean is keypolicy.py's; what
the TPM makes of the blobs is tpm/keys.py's (the broker's side). This module needs
neither tpm2-pytss nor libtss2, so clients import it; provider/tss2.c reads the same
format in C.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import TYPE_CHECKING, Annotated

from cryptography.hazmat import asn1
from cryptography.x509 import ObjectIdentifier

from .definitions import CURVES, Curve
from .errors import BadKeyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import (
        EllipticCurve,
        EllipticCurvePublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

PEM_LABEL = "TSS2 PRIVATE KEY"
LOADABLE_OID = ObjectIdentifier("2.23.133.10.1.3")
# An importable key (as openssl_tpm2_engine's create_tpm2_key --import writes it):
# privkey is a duplicate (TPM2B_PRIVATE) whose outer wrapper's seed, encrypted to the
# parent's public key, is the `secret` [2]: a marshalled TPM2B_ENCRYPTED_SECRET, size
# first, as create_tpm2_key writes and its loader reads it.
IMPORTABLE_OID = ObjectIdentifier("2.23.133.10.1.4")
_LOADABLE_OID_DER = bytes.fromhex("06066781050a0103")
_PEM_RE = re.compile(
    rb"-----BEGIN TSS2 PRIVATE KEY-----\s*(.+?)\s*-----END TSS2 PRIVATE KEY-----", re.S)
RESTRICTED = 0x00010000  # TPMA_OBJECT_RESTRICTED: an attestation key


# --- the ASN.1 ------------------------------------------------------------------------------

@asn1.sequence
class PolicyAsn1:
    """TPMPolicy ::= SEQUENCE { commandCode [0] EXPLICIT INTEGER,
    commandPolicy [1] EXPLICIT OCTET STRING }"""

    command_code: Annotated[int, asn1.Explicit(0)]
    command_policy: Annotated[bytes, asn1.Explicit(1)]


@asn1.sequence
class AuthPolicyAsn1:
    """TPMAuthPolicy ::= SEQUENCE { name [0] EXPLICIT UTF8String OPTIONAL,
    policy [1] EXPLICIT SEQUENCE OF TPMPolicy }"""

    name: Annotated[str | None, asn1.Explicit(0)]
    policy: Annotated[list[PolicyAsn1], asn1.Explicit(1)]


@asn1.sequence
class TPMKeyAsn1:
    """TSS2 PRIVATE KEY, field by field (the module's docstring)."""

    object_type: ObjectIdentifier
    empty_auth: Annotated[bool | None, asn1.Explicit(0)]
    policy: Annotated[list[PolicyAsn1] | None, asn1.Explicit(1)]
    secret: Annotated[bytes | None, asn1.Explicit(2)]
    auth_policy: Annotated[list[AuthPolicyAsn1] | None, asn1.Explicit(3)]
    description: Annotated[str | None, asn1.Explicit(4)]
    rsa_parent: Annotated[bool | None, asn1.Explicit(5)]
    parent: int
    public: bytes
    private: bytes


def decode(der: bytes) -> TPMKeyAsn1:
    """A DER TSS2 PRIVATE KEY, loadable or importable; BadKeyError if it is not one.

    Strict: DER only (no BER lengths, booleans or trailing bytes), but for the one BER
    form tpm2-openssl writes (emptyAuth TRUE as 0x01). An importable key must carry its
    encrypted seed. The TPM2B blobs are the broker's to check (tpm/keys.py)."""
    try:
        seq = asn1.decode_der(TPMKeyAsn1, _tolerate_true_01(der))
    except (ValueError, TypeError) as exc:
        raise BadKeyError(f"not a DER TSS2 PRIVATE KEY: {exc}") from None
    if seq.object_type not in (LOADABLE_OID, IMPORTABLE_OID):
        raise BadKeyError("neither a loadable nor an importable TSS2 key (OID "
                          f"{seq.object_type.dotted_string})")
    if seq.object_type == IMPORTABLE_OID and not seq.secret:
        raise BadKeyError("an importable TSS2 key without its encrypted seed (secret [2])")
    if not 0 <= seq.parent <= 0xFFFFFFFF:
        raise BadKeyError(f"key parent {seq.parent} is not a TPM handle")
    return seq


def encode(*, public: bytes, private: bytes, parent: int, empty_auth: bool | None,
           rsa_parent: bool = False, secret: bytes | None = None,
           policy: list[PolicyAsn1] | None = None) -> bytes:
    """DER TSS2 PRIVATE KEY of marshalled TPM2B_PUBLIC and TPM2B_PRIVATE: loadable, or
    importable when `secret` (the marshalled TPM2B_ENCRYPTED_SECRET) is given.
    emptyAuth None leaves the field out (the key has a password); False writes FALSE, as
    tpm2-pytss does."""
    seq = TPMKeyAsn1(
        object_type=LOADABLE_OID if secret is None else IMPORTABLE_OID,
        empty_auth=empty_auth, policy=policy or None, secret=secret, auth_policy=None,
        description=None, rsa_parent=True if rsa_parent else None, parent=parent,
        public=public, private=private)
    return to_der(seq)


def to_der(seq: TPMKeyAsn1) -> bytes:
    return bytes(asn1.encode_der(seq))


def _tolerate_true_01(der: bytes) -> bytes:
    """The one BER form accepted: tpm2-openssl writes emptyAuth TRUE as 0x01, not DER's
    0xff. Only that byte, only there, only 0x01; everything else stays strict."""
    if len(der) < 2 or der[0] != 0x30:
        return der
    header = 2 + (der[1] - 0x80 if der[1] & 0x80 else 0)
    at = header + len(_LOADABLE_OID_DER)
    if (der[header:at] == _LOADABLE_OID_DER and der[at:at + 4] == b"\xa0\x03\x01\x01"
            and der[at + 4:at + 5] == b"\x01"):
        return der[:at + 4] + b"\xff" + der[at + 5:]
    return der


# --- the PEM armour -------------------------------------------------------------------------

def pem_to_der(data: bytes) -> bytes:
    match = _PEM_RE.search(data)
    if match is None:
        raise BadKeyError(f"no '-----BEGIN {PEM_LABEL}-----' block found")
    try:
        return base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error as exc:
        raise BadKeyError(f"bad base64 in {PEM_LABEL} PEM: {exc}") from None


def der_to_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {PEM_LABEL}-----\n".encode() + b"\n".join(lines)
            + f"\n-----END {PEM_LABEL}-----\n".encode())


def to_der_if_pem(data: bytes) -> bytes:
    """A key file's DER, whether it was given as PEM or as DER."""
    return pem_to_der(data) if b"-----BEGIN" in data else data


# --- what a client reads from a file: parent, attributes, public key ------------------------

def tss2_parent(der: bytes) -> int | None:
    """The parent of a DER TSS2 PRIVATE KEY, or None where it does not read. The broker
    checks the whole key; this only decides whose password a client sends with it."""
    try:
        return int(decode(der).parent)
    except BadKeyError:
        return None


def object_attributes(der: bytes) -> int:
    """TPMA_OBJECT of the key in a TSS2 PRIVATE KEY (RESTRICTED: an attestation key);
    ValueError if the file does not say."""
    area = _tpmt_public(der)
    if len(area) < 8:
        raise ValueError("truncated TPMT_PUBLIC")
    return int.from_bytes(area[4:8], "big")


def public_key_der(der: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of the key in a TSS2 PRIVATE KEY; ValueError if the file
    does not say. A client checks the broker's LOAD answer and every signature against
    this, not against a public key the broker says the key has."""
    from cryptography.hazmat.primitives import serialization

    try:
        public = _public_from_tpmt(_tpmt_public(der))
    except struct.error:
        raise ValueError("truncated TPMT_PUBLIC") from None
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _tpmt_public(der: bytes) -> bytes:
    """The TPMT_PUBLIC inside the file's TPM2B_PUBLIC."""
    try:
        value = bytes(decode(der).public)
    except BadKeyError as exc:
        raise ValueError(str(exc)) from None
    if len(value) < 2 or int.from_bytes(value[:2], "big") != len(value) - 2:
        raise ValueError("no TPM2B_PUBLIC")
    return value[2:]


_ALG_RSA, _ALG_ECC, _ALG_NULL, _ALG_RSAES, _ALG_ECDAA = 0x0001, 0x0023, 0x0010, 0x0015, 0x001A


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u16(self) -> int:
        (v,) = struct.unpack_from(">H", self.data, self.pos)
        self.pos += 2
        return int(v)

    def u32(self) -> int:
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(v)

    def tpm2b(self) -> bytes:
        n = self.u16()
        if len(self.data) - self.pos < n:
            raise ValueError("truncated TPM2B")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v


def _public_from_tpmt(area: bytes) -> RSAPublicKey | EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    r = _Reader(area)
    key_type = r.u16()
    r.u16()  # nameAlg
    r.u32()  # objectAttributes
    r.tpm2b()  # authPolicy
    if r.u16() != _ALG_NULL:  # symmetric: keyBits, mode
        r.u16()
        r.u16()
    scheme = r.u16()
    public: RSAPublicKey | EllipticCurvePublicKey
    if key_type == _ALG_RSA:
        if scheme not in (_ALG_NULL, _ALG_RSAES):
            r.u16()
        r.u16()  # keyBits
        exponent = r.u32() or 65537
        n = int.from_bytes(r.tpm2b(), "big")
        public = rsa.RSAPublicNumbers(exponent, n).public_key()
    elif key_type == _ALG_ECC:
        if scheme != _ALG_NULL:
            r.u16()
            if scheme == _ALG_ECDAA:
                r.u16()
        curve_id = r.u16()
        if r.u16() != _ALG_NULL:  # kdf
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
        curve = pyca_curve(curve_id)
        if curve is None:
            raise ValueError("unsupported curve")
        size = (curve.key_size + 7) // 8
        point = b"\x04" + x.rjust(size, b"\0") + y.rjust(size, b"\0")
        public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    else:
        raise ValueError(f"TPM key type 0x{key_type:04x}")
    if r.pos != len(area):
        raise ValueError("trailing bytes after TPMT_PUBLIC")
    return public


def pyca_curve(curve_id: int) -> EllipticCurve | None:
    """cryptography's curve for a TPM2_ECC_CURVE id, or None for one keys cannot be on."""
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        curve = Curve(curve_id)
    except ValueError:
        return None
    if curve not in CURVES:
        return None
    curve_class: type[EllipticCurve] = getattr(ec, curve.pyca_name.upper())
    return curve_class()
