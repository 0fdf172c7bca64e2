"""What the broker and the C provider share, defined once.

The wire protocol's constants and every numbered set it carries: opcodes, statuses,
key sources, key types, schemes, hashes and curves. The Python side imports this
module; build_provider.py reads it (without importing the package) and writes
provider/definitions.h from it, so the C side cannot drift. Add a member here and both
sides have it; tests/test_definitions.py holds the compiled C to this module.

Numbers are stable: never renumber, only add.
"""

from __future__ import annotations

import enum
import typing

VERSION = 1
MAX_FRAME = 65536
HEADER_SIZE = 16  # length u32, version u8, opcode u8, flags u16, request id u32, timeout u32
RESPONSE_BIT = 0x80
CONNECTION_ERROR = 0x00  # opcode of an error about the whole connection
MAX_FIELD = 0xFFFF
KEY_ID_SIZE = 32  # SHA-256 over key source and key
STORAGE_PRIMARY = 0x40000001  # parent: the storage primary made from the TCG template
MAX_RANDOM = 1024  # bytes one RANDOM request may ask for
MAX_CHALLENGE = 1024  # bytes of a CERTIFY challenge (attToBeSigned; the TPM gets its hash)
# Bytes of message one SIGN_MESSAGE may carry: with the header, the key id, scheme and
# hash it fits a frame (16 + 34 + 3 + 2 + 65280 < MAX_FRAME).
MAX_MESSAGE = 0xFF00


class Opcode(enum.IntEnum):
    """One per wire operation; the response carries the opcode with RESPONSE_BIT set."""

    HELLO = 0x01
    LOAD = 0x02
    SIGN = 0x03
    GENERATE = 0x04
    STATUS = 0x05
    UNLOAD = 0x06
    RANDOM = 0x07
    NV_READ = 0x08
    DECRYPT = 0x09
    DERIVE = 0x0A
    SIGN_MESSAGE = 0x0B  # restricted keys: the TPM hashes the message, then signs
    PERSIST = 0x0C  # a loaded key to a persistent handle (TPM2_EvictControl); admins only
    EVICT = 0x0D  # a persistent handle out of the TPM (TPM2_EvictControl); admins only
    KEYS = 0x0E  # persistent handles and the keys the broker holds, as JSON
    IMPORT = 0x0F  # a key wrapped to the TPM's parent (TPM2_Import) into a loadable key file
    PCR_READ = 0x10  # PCR values (TPM2_PCR_Read, no authorization)
    CERTIFY = 0x11  # a key attestation statement (TPM2_Certify by the attestation key)


# Requests a client may send again, to a restarted broker, when it cannot know whether
# the first was served: doing them twice changes nothing. GENERATE, IMPORT, PERSIST and
# EVICT are never sent twice.
REPEATABLE = frozenset({
    Opcode.HELLO, Opcode.LOAD, Opcode.SIGN, Opcode.STATUS, Opcode.UNLOAD, Opcode.RANDOM,
    Opcode.NV_READ, Opcode.DECRYPT, Opcode.DERIVE, Opcode.SIGN_MESSAGE, Opcode.KEYS,
    Opcode.PCR_READ, Opcode.CERTIFY,
})
REPEATABLE_OPCODES = sum(1 << opcode for opcode in REPEATABLE)  # C: a bit per opcode


class Status(enum.IntEnum):
    """Response status codes (docs/protocol.md)."""

    OK = 0
    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OPCODE = 3
    TOO_LARGE = 4
    UNKNOWN_KEY = 5
    BAD_KEY = 6
    AUTH_FAILED = 7
    BAD_DIGEST = 8
    UNSUPPORTED = 9
    DEADLINE = 10
    NO_SESSIONS = 11
    TPM_ERROR = 12
    TPM_UNAVAILABLE = 13
    PERMISSION_DENIED = 14
    INTERNAL = 15
    OVERLOADED = 16
    LOCKOUT = 17
    SHUTTING_DOWN = 18  # the broker is stopping; another may take its place
    PARENT_AUTH_FAILED = 19  # wrong or missing password for the key's parent
    BUSY = 20  # the deadline cannot be met behind the work queued; the message estimates
    POLICY_FAILED = 21  # the key's policy does not hold (a PCR differs, ...)


class KeySource(enum.IntEnum):
    """What a LOAD carries: a TSS2 PRIVATE KEY (DER) or a persistent handle (u32)."""

    TSS2_DER = 1
    PERSISTENT_HANDLE = 2


class KeyType(enum.IntEnum):
    EC = 1
    RSA = 2
    RSA_PSS = 3  # an RSA key whose TPM scheme is bound to RSASSA-PSS (and one hash)


class Scheme(enum.IntEnum):
    """Signature schemes."""

    ECDSA = 1
    PKCS1 = 2
    PSS = 3


class Hash(enum.IntEnum):
    """Hash algorithms, by their TPM2_ALG ids so the broker passes them straight on."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D

    @property
    def digest_size(self) -> int:
        return _DIGEST_SIZES[self]

    @property
    def hashlib_name(self) -> str:
        return self.name.lower()

    @classmethod
    def from_name(cls, name: str) -> Hash:
        """Accepts 'sha256', 'SHA2-256', 'SHA-256' and the like."""
        key = name.upper().replace("-", "").replace("_", "")
        key = {"SHA2256": "SHA256", "SHA2384": "SHA384", "SHA2512": "SHA512"}.get(key, key)
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unsupported hash {name!r}") from None


_DIGEST_SIZES = {Hash.SHA1: 20, Hash.SHA256: 32, Hash.SHA384: 48, Hash.SHA512: 64}


class Padding(enum.IntEnum):
    """RSA decryption paddings (DECRYPT)."""

    NONE = 0  # the raw RSA private operation; the client removes any padding
    PKCS1 = 1  # RSAES-PKCS1-v1_5
    OAEP = 2  # RSAES-OAEP with MGF1


class DecryptFlag(enum.IntEnum):
    """Bits of DECRYPT's `flags`."""

    # PKCS#1 v1.5: a bad padding yields a synthetic message, not an error (implicit
    # rejection, as OpenSSL 3.2 does by default); without it, a bad padding is an error.
    IMPLICIT_REJECTION = 0x01


class Curve(enum.IntEnum):
    """Elliptic curves, by their TPM2_ECC_CURVE ids.

    The curves a key may be on are the NIST curves OpenSSL's default provider signs with;
    `CURVES` says what each is called and how large it is, for every module that needs
    to know. The BN curves (0x0010, 0x0011) have no OpenSSL name, and SM2 (0x0020) is its
    own key type in OpenSSL, with SM2 signatures, not ECDSA: keys on those are refused.
    """

    NONE = 0x0000
    P256 = 0x0003
    P384 = 0x0004
    P192 = 0x0001
    P224 = 0x0002
    P521 = 0x0005

    @property
    def bits(self) -> int:
        return CURVES[self].bits

    @property
    def nist_name(self) -> str:
        """'P-256', as OpenSSL's `group:` and the CLI's `ec:` spell it."""
        return CURVES[self].nist_name

    @property
    def pyca_name(self) -> str:
        """'secp256r1', as cryptography's `ec.EllipticCurve.name` spells it."""
        return CURVES[self].pyca_name

    @property
    def order(self) -> int:
        """The order of the curve's group (what an ECDSA signature's r and s are below)."""
        return CURVES[self].order

    @classmethod
    def from_nist_name(cls, name: str) -> Curve:
        """KeyError unless `name` ('P-256', any case) names a key curve."""
        return _BY_NIST_NAME[name.upper()]

    @classmethod
    def from_pyca_name(cls, name: str) -> Curve:
        """KeyError unless `name` ('secp256r1') names a key curve."""
        return _BY_PYCA_NAME[name]


class CurveFacts(typing.NamedTuple):
    bits: int
    nist_name: str
    pyca_name: str
    order: int


# The curves keys may be on, in size order: the one table of them. Orders from SEC 2
# and FIPS 186-4 D.1.2.
CURVES: dict[Curve, CurveFacts] = {
    Curve.P192: CurveFacts(192, "P-192", "secp192r1",
                           0xFFFFFFFFFFFFFFFFFFFFFFFF99DEF836146BC9B1B4D22831),
    Curve.P224: CurveFacts(224, "P-224", "secp224r1",
                           0xFFFFFFFFFFFFFFFFFFFFFFFFFFFF16A2E0B8F03E13DD29455C5C2A3D),
    Curve.P256: CurveFacts(256, "P-256", "secp256r1",
                           0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551),
    Curve.P384: CurveFacts(384, "P-384", "secp384r1", int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973", 16)),
    Curve.P521: CurveFacts(521, "P-521", "secp521r1", int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16)),
}
_BY_NIST_NAME = {facts.nist_name: curve for curve, facts in CURVES.items()}
_BY_PYCA_NAME = {facts.pyca_name: curve for curve, facts in CURVES.items()}


def curve_name(curve_id: int) -> str:
    """'P-256' and the like; the TPM's id ('0x0010') for a curve keys cannot be on."""
    try:
        return CURVES[Curve(curve_id)].nist_name
    except (ValueError, KeyError):
        return f"0x{curve_id:04x}"


class Usage(enum.IntEnum):
    """What a GENERATEd key may do (docs/security.md, "Key usage"): its TPM attributes."""

    DEFAULT = 0  # the broker's default: SIGN_DECRYPT, as tpm2-openssl; SIGN for RSA-PSS
    SIGN = 1
    DECRYPT = 2  # RSA decryption, ECDH
    SIGN_DECRYPT = 3  # both, as tpm2-openssl makes its keys


# What build_provider.py turns into C: each enum becomes WIRE_<PREFIX>_<MEMBER> constants
# and an X-macro list, in this order.
SHARED_ENUMS: tuple[tuple[str, type[enum.IntEnum]], ...] = (
    ("OPCODE", Opcode),
    ("STATUS", Status),
    ("KEY_SOURCE", KeySource),
    ("KEY_TYPE", KeyType),
    ("SCHEME", Scheme),
    ("HASH", Hash),
    ("CURVE", Curve),
    ("USAGE", Usage),
    ("PADDING", Padding),
    ("DECRYPT_FLAG", DecryptFlag),
)
SHARED_CONSTANTS: tuple[tuple[str, int], ...] = (
    ("VERSION", VERSION),
    ("MAX_FRAME", MAX_FRAME),
    ("HEADER_SIZE", HEADER_SIZE),
    ("RESPONSE_BIT", RESPONSE_BIT),
    ("CONNECTION_ERROR", CONNECTION_ERROR),
    ("MAX_FIELD", MAX_FIELD),
    ("KEY_ID_SIZE", KEY_ID_SIZE),
    ("STORAGE_PRIMARY", STORAGE_PRIMARY),
    ("MAX_RANDOM", MAX_RANDOM),
    ("MAX_MESSAGE", MAX_MESSAGE),
    ("REPEATABLE_OPCODES", REPEATABLE_OPCODES),
)


def c_header() -> str:
    """provider/definitions.h: the C spelling of this module."""
    lines = [
        "/* Generated by build_provider.py from broker/tpmbroker/definitions.py: do not edit. */",
        "#ifndef TPMBROKER_DEFINITIONS_H",
        "#define TPMBROKER_DEFINITIONS_H",
        "",
    ]
    for name, value in SHARED_CONSTANTS:
        lines.append(f"#define WIRE_{name} {value:#x}u")
    lines += ["/* X(NAME) for every constant above. */", "#define WIRE_CONSTANT_LIST(X) \\"]
    lines += [f"    X({name}) \\" for name, _ in SHARED_CONSTANTS]
    lines.append("")
    for prefix, members in SHARED_ENUMS:
        lower = prefix.lower()
        lines += ["", f"enum wire_{lower} {{"]
        lines += [f"    WIRE_{prefix}_{m.name} = {int(m):#06x}," for m in members]
        lines += ["};", f"/* X(NAME, value) for every {lower}, in order. */",
                  f"#define WIRE_{prefix}_LIST(X) \\"]
        lines += [f"    X({m.name}, {int(m):#06x}) \\" for m in members]
        lines.append("")
    lines += ["#endif", ""]
    return "\n".join(lines)
