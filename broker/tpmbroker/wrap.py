"""Wrapping a software key to a TPM's storage parent (TPM 2.0 Part 1, Duplication).

`wrap_key` turns an EC or RSA private key into an importable TSS2 PRIVATE KEY (OID
2.23.133.10.1.4, as openssl_tpm2_engine's `create_tpm2_key --wrap KEY --import PARENT`
writes it): the key's public area, its sensitive area (private scalar or prime, and its
password) encrypted and integrity-protected under a random seed, and that seed encrypted
to the parent's public key. Only the TPM holding the parent's private key recovers the
seed, so the file can travel and be stored anywhere; it needs no TPM to make.

The broker turns such a file into a loadable one (IMPORT, `Client.import_key`), and
LOAD accepts it as it is (TPM2_Import, then TPM2_Load, on first use).

Nothing here writes anything: the private key lives in this process's memory only, and
leaves it encrypted to the parent. This module needs tpm2-pytss (its public `wrap()`
and TPM types), but nothing of the broker's tpm/; importing tpmbroker or its client does
not load it.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import keyfile
from .definitions import STORAGE_PRIMARY, Curve, KeyType, Usage

_MAX_PASSWORD = 32  # the TPM's authValue for a SHA-256 name: at most the digest size

WrappableKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def read_private_key(data: bytes, passphrase: bytes | None = None) -> WrappableKey:
    """An EC or RSA private key from PEM or DER (PKCS#8, PKCS#1, SEC1), decrypted with
    `passphrase` when encrypted. ValueError, in words, when it cannot be read."""
    loader = (serialization.load_pem_private_key if data.lstrip().startswith(b"-----")
              else serialization.load_der_private_key)
    try:
        key = loader(data, password=passphrase or None)
    except TypeError as exc:  # encrypted and no passphrase, or a passphrase not needed
        text = str(exc)
        if "encrypted" in text and not passphrase:
            raise ValueError("the key is encrypted: give its passphrase") from None
        raise ValueError(f"cannot read the key: {text}") from None
    except ValueError as exc:
        if passphrase and "incorrect password" in str(exc).lower():
            raise ValueError("cannot decrypt the key: wrong passphrase") from None
        raise ValueError(f"cannot read the key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"only EC and RSA keys go into a TPM, not {type(key).__name__}")
    return key


def parent_public(data: bytes, rsa_parent: bool = False) -> Any:
    """The TPMT_PUBLIC to wrap to, from what a TPM's owner hands out: the parent's
    TPM2B_PUBLIC (`tpmbroker parent-pubkey --format tpm`, `tpm2_readpublic -o`), or its
    public key alone (PEM or DER SubjectPublicKeyInfo: `tpmbroker parent-pubkey`,
    `tpm2_readpublic -f pem`), which is then taken to be the storage primary made from
    the TCG template (SHA-256 name, AES-128-CFB), as 0x40000001 is."""
    from tpm2_pytss.types import TPM2B_PUBLIC

    from .templates import storage_parent_template

    text = data.lstrip()
    if text.startswith(b"-----") or text[:1] == b"\x30":
        try:
            public = (serialization.load_pem_public_key(data) if text.startswith(b"-----")
                      else serialization.load_der_public_key(data))
        except ValueError as exc:
            raise ValueError(f"cannot read the parent's public key: {exc}") from None
        template = storage_parent_template(isinstance(public, rsa.RSAPublicKey) or rsa_parent)
        if isinstance(public, ec.EllipticCurvePublicKey):
            if template.type != 0x0023 or public.curve.name != "secp256r1":
                raise ValueError("the parent's public key is not the P-256 key of a "
                                 "storage primary")
            size = 32
            numbers = public.public_numbers()
            template.unique.ecc.x = numbers.x.to_bytes(size, "big")
            template.unique.ecc.y = numbers.y.to_bytes(size, "big")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size != 2048 or public.public_numbers().e != 65537:
                raise ValueError("the parent's public key is not the RSA-2048 key of a "
                                 "storage primary")
            template.unique.rsa = public.public_numbers().n.to_bytes(256, "big")
        else:
            raise ValueError("the parent's public key is neither EC nor RSA")
        return template
    try:
        public2b, used = TPM2B_PUBLIC.unmarshal(data)
    except Exception as exc:  # tpm2-pytss raises its own and ValueError
        raise ValueError(f"the parent's public area is neither a public key nor a "
                         f"TPM2B_PUBLIC: {exc}") from None
    if used != len(data):
        raise ValueError(f"{len(data) - used} bytes after the parent's TPM2B_PUBLIC")
    area = public2b.publicArea
    attributes = int(area.objectAttributes)
    if not (attributes & 0x00010000 and attributes & 0x00020000):  # RESTRICTED, DECRYPT
        raise ValueError("the parent is not a storage key (restricted, decrypt)")
    return area


def parent_public_pem(public2b: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a parent's TPM2B_PUBLIC."""
    from tpm2_pytss.types import TPM2B_PUBLIC

    public, _ = TPM2B_PUBLIC.unmarshal(public2b)
    return bytes(public.publicArea.to_pem())


def key_areas(key: WrappableKey, password: bytes = b"",
              usage: Usage = Usage.DEFAULT) -> tuple[Any, Any]:
    """(TPM2B_PUBLIC, TPM2B_SENSITIVE) of a software key as a TPM key: SHA-256 name,
    scheme NULL, the usage's sign/decrypt attributes, userWithAuth, noDA (as the
    broker's own keys: docs/security.md)."""
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE,
        TPMS_ECC_POINT,
        TPMT_PUBLIC,
        TPMT_SENSITIVE,
        TPMU_PUBLIC_ID,
        TPMU_PUBLIC_PARMS,
        TPMU_SENSITIVE_COMPOSITE,
    )

    from .templates import ecc_parms, rsa_parms, usage_attributes

    if len(password) > _MAX_PASSWORD:
        raise ValueError(f"a key password is at most {_MAX_PASSWORD} bytes")
    base = int(TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        try:
            curve = Curve.from_pyca_name(key.curve.name)
        except KeyError:
            raise ValueError(f"a TPM has no curve {key.curve.name}") from None
        size = (key.curve.key_size + 7) // 8
        numbers = key.private_numbers()
        public = TPMT_PUBLIC(
            type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256,
            objectAttributes=base | usage_attributes(KeyType.EC, usage), authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(eccDetail=ecc_parms(curve)),
            unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(
                x=numbers.public_numbers.x.to_bytes(size, "big"),
                y=numbers.public_numbers.y.to_bytes(size, "big"))))
        secret = TPMU_SENSITIVE_COMPOSITE(ecc=numbers.private_value.to_bytes(size, "big"))
        sensitive_type = TPM2_ALG.ECC
    elif isinstance(key, rsa.RSAPrivateKey):
        rsa_numbers = key.private_numbers()
        e = rsa_numbers.public_numbers.e
        if e >= 1 << 32:
            raise ValueError("a TPM's RSA exponent is at most 32 bits")
        parms = rsa_parms(key.key_size)
        parms.exponent = 0 if e == 65537 else e
        n_size = (key.key_size + 7) // 8
        public = TPMT_PUBLIC(
            type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256,
            objectAttributes=base | usage_attributes(KeyType.RSA, usage), authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(rsaDetail=parms),
            unique=TPMU_PUBLIC_ID(rsa=rsa_numbers.public_numbers.n.to_bytes(n_size, "big")))
        secret = TPMU_SENSITIVE_COMPOSITE(rsa=rsa_numbers.p.to_bytes(n_size // 2, "big"))
        sensitive_type = TPM2_ALG.RSA
    else:
        raise ValueError("only EC and RSA keys go into a TPM")
    sensitive = TPMT_SENSITIVE(sensitiveType=sensitive_type, authValue=password,
                               seedValue=b"", sensitive=secret)
    return TPM2B_PUBLIC(publicArea=public), TPM2B_SENSITIVE(sensitiveArea=sensitive)


def wrap_key(key: WrappableKey | bytes, parent: bytes | Any, *,
             password: bytes | str | None = None, usage: Usage = Usage.DEFAULT,
             parent_handle: int = STORAGE_PRIMARY, passphrase: bytes | None = None) -> bytes:
    """An importable TSS2 PRIVATE KEY (DER) of `key` for the TPM whose parent is
    `parent`: a TPMT_PUBLIC, or bytes as `parent_public` reads them. `key` is a
    cryptography private key, or PEM/DER bytes (`passphrase` if encrypted). `password`
    becomes the TPM key's password; `parent_handle` is where that TPM finds the parent
    (0x40000001: its storage primary, or a persistent 0x81xxxxxx)."""
    from tpm2_pytss.utils import wrap

    if isinstance(key, bytes):
        key = read_private_key(key, passphrase)
    auth = password.encode() if isinstance(password, str) else (password or b"")
    parent_area = parent_public(parent) if isinstance(parent, bytes) else parent
    public, sensitive = key_areas(key, auth, usage)
    # Outer wrapper only (no inner symmetric key): the seed, encrypted to the parent,
    # is all the file carries, as importable key files have no place for another key.
    _, duplicate, seed = wrap(parent_area, public, sensitive)
    rsa_parent = parent_handle == STORAGE_PRIMARY and int(parent_area.type) == 0x0001
    return keyfile.encode(public=bytes(public.marshal()), private=bytes(duplicate.marshal()),
                          parent=parent_handle, empty_auth=True if not auth else None,
                          rsa_parent=rsa_parent, secret=bytes(seed.marshal()))
