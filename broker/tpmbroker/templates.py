"""Templates of TPM objects as tpm2-pytss types, without TPM I/O: the storage parent
keys are made under, and the attributes and parameters of keys.

The broker makes keys from these (tpm/keys.py's generation_template, procedures/); a
client wrapping a key to a TPM's parent (wrap.py) describes it with the same ones.
Importing this loads tpm2-pytss, but nothing of tpm/.
"""

from __future__ import annotations

from typing import Any

from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPMS_ECC_PARMS,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from .definitions import Hash, KeyType, Usage
from .errors import UnsupportedError


def storage_parent_template(rsa: bool) -> Any:
    """TPMT_PUBLIC of the storage primary that parents keys under 0x40000001.

    The TCG EK/SRK-style templates tpm2-pytss (TSSPrivKey) creates that parent from,
    so a key either library made loads under the other's primary: H-2 (ECC P-256), or
    H-1 (RSA-2048) for a TPM without ECC or a key file asking for the RSA parent.
    AES-128-CFB for the children's protection, SHA-256 name, no policy, and an empty
    unique, as tpm2-pytss leaves it. tests/test_keys.py holds them to tpm2-pytss's.
    """
    attributes = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
                  | TPMA_OBJECT.NODA | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                  | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    symmetric = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    if rsa:
        parameters = TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
            symmetric=symmetric, scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
            keyBits=2048, exponent=0))
        return TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256,
                           objectAttributes=attributes, authPolicy=b"",
                           parameters=parameters)
    parameters = TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
        symmetric=symmetric, scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
        curveID=TPM2_ECC.NIST_P256, kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL)))
    return TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256,
                       objectAttributes=attributes, authPolicy=b"", parameters=parameters)


def usage_attributes(key_type: KeyType, usage: Usage) -> int:
    """TPMA_OBJECT bits SIGN_ENCRYPT and DECRYPT for a usage (docs/security.md, "Key
    usage"). The default is both, as tpm2-openssl and tpm2_create make keys: what a
    client may do with a key it may use is the key policy's to say (tpmbroker.access,
    operations); SIGN or DECRYPT alone narrows the key for good. RSA-PSS keys only sign:
    their scheme is bound to PSS."""
    if usage is Usage.DEFAULT:
        usage = Usage.SIGN if key_type is KeyType.RSA_PSS else Usage.SIGN_DECRYPT
    if key_type is KeyType.RSA_PSS and usage is not Usage.SIGN:
        raise UnsupportedError("an RSA-PSS key only signs: its scheme is bound to PSS; "
                               "make an RSA key for decryption")
    bits = 0
    if usage in (Usage.SIGN, Usage.SIGN_DECRYPT):
        bits |= int(TPMA_OBJECT.SIGN_ENCRYPT)
    if usage in (Usage.DECRYPT, Usage.SIGN_DECRYPT):
        bits |= int(TPMA_OBJECT.DECRYPT)
    return bits


def ecc_parms(curve: int) -> Any:
    """TPMS_ECC_PARMS of an unrestricted key on `curve`, scheme NULL (TestParms, Create)."""
    return TPMS_ECC_PARMS(symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                          scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), curveID=curve,
                          kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))


def rsa_parms(bits: int, pss_hash: Hash | None = None) -> Any:
    """TPMS_RSA_PARMS of an unrestricted key: scheme NULL, or RSAPSS bound to a hash."""
    scheme = TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL)
    if pss_hash is not None:
        scheme = TPMT_RSA_SCHEME(scheme=TPM2_ALG.RSAPSS)
        scheme.details.anySig.hashAlg = int(pss_hash)
    return TPMS_RSA_PARMS(symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                          scheme=scheme, keyBits=bits, exponent=0)
