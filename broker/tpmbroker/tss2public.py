"""The public key written in a TSS2 PRIVATE KEY file, read without the broker.

A client checks the broker's LOAD answer and every signature against the key file's own
public key, not against one the broker says the key has. Only the fields up to the
public key are read (the provider's tss2.c reads the same way):

    TPMKey ::= SEQUENCE { type OID, [0] emptyAuth, [1] policy, [2] secret, ..., parent
                          INTEGER, pubkey OCTET STRING (TPM2B_PUBLIC), privkey ... }
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

_LOADABLE_OID = bytes([0x67, 0x81, 0x05, 0x0A, 0x01, 0x03])
_IMPORTABLE_OID = bytes([0x67, 0x81, 0x05, 0x0A, 0x01, 0x04])  # wrapped to the parent
_ALG_RSA, _ALG_ECC, _ALG_NULL, _ALG_RSAES, _ALG_ECDAA = 0x0001, 0x0023, 0x0010, 0x0015, 0x001A
_CURVES: dict[int, ec.EllipticCurve] = {0x0001: ec.SECP192R1(), 0x0002: ec.SECP224R1(),
                                         0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(),
                                         0x0005: ec.SECP521R1()}


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, position after it) of the DER element at pos."""
    if len(data) - pos < 2:
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 3 or len(data) - pos < n:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if len(data) - pos < length:
        raise ValueError("truncated DER")
    return tag, data[pos:pos + length], pos + length


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


def _public_from_tpmt(area: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    r = _Reader(area)
    key_type = r.u16()
    r.u16()  # nameAlg
    r.u32()  # objectAttributes
    r.tpm2b()  # authPolicy
    if r.u16() != _ALG_NULL:  # symmetric: keyBits, mode
        r.u16()
        r.u16()
    scheme = r.u16()
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
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
        curve = _CURVES.get(r.u16())
        if r.u16() != _ALG_NULL:  # kdf
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
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


RESTRICTED = 0x00010000  # TPMA_OBJECT_RESTRICTED


def object_attributes(tss2_der: bytes) -> int:
    """TPMA_OBJECT of the key in a TSS2 PRIVATE KEY (RESTRICTED: an attestation key);
    ValueError if the file does not say."""
    area = _tpmt_public(tss2_der)
    if len(area) < 8:
        raise ValueError("truncated TPMT_PUBLIC")
    return int.from_bytes(area[4:8], "big")


def public_key_der(tss2_der: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of the key in a TSS2 PRIVATE KEY; ValueError if the file
    does not say."""
    try:
        public = _public_from_tpmt(_tpmt_public(tss2_der))
    except struct.error:
        raise ValueError("truncated TPMT_PUBLIC") from None
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _tpmt_public(tss2_der: bytes) -> bytes:
    """The TPMT_PUBLIC inside the file's TPM2B_PUBLIC."""
    tag, seq, _ = _tlv(tss2_der, 0)
    if tag != 0x30:
        raise ValueError("not a SEQUENCE")
    tag, oid, pos = _tlv(seq, 0)
    if tag != 0x06 or oid not in (_LOADABLE_OID, _IMPORTABLE_OID):
        raise ValueError("neither a loadable nor an importable TSS2 key")
    tag, value, pos = _tlv(seq, pos)
    while tag & 0xE0 == 0xA0:  # the optional [n] fields
        tag, value, pos = _tlv(seq, pos)
    if tag != 0x02:
        raise ValueError("no parent")
    tag, value, pos = _tlv(seq, pos)
    if tag != 0x04 or len(value) < 2 or int.from_bytes(value[:2], "big") != len(value) - 2:
        raise ValueError("no TPM2B_PUBLIC")
    return value[2:]
