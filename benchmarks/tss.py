"""tpm2-pytss pieces the ESAPI systems share, built from public types only."""

from __future__ import annotations

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPM2_ST, TPMA_SESSION
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
)

# The owner hierarchy's storage primary, ECC: NIST P-256 with SHA-256 names, AES-128-CFB
# for its children, a restricted decryption key without policy, no KDF or scheme, an
# empty unique field. tpm2-pytss's TSSPrivKey makes its keys' parent from these same
# fields, so TSS2 PRIVATE KEY files from TSSPrivKey.create_ecc/create_rsa load under it.
STORAGE_PRIMARY = ("ecc256:aes128cfb", "sha256",
                   "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda")


def storage_primary(ectx: ESAPI) -> ESYS_TR:
    """Create the owner hierarchy's storage primary; the caller flushes it."""
    alg, name_alg, attributes = STORAGE_PRIMARY
    template = TPM2B_PUBLIC.parse(alg, nameAlg=name_alg, objectAttributes=attributes)
    handle, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.RH_OWNER,
                                     TPM2B_DATA(), TPML_PCR_SELECTION())
    return handle


def salted_session(ectx: ESAPI, salt_key: ESYS_TR) -> ESYS_TR:
    """An HMAC session salted with `salt_key`, parameter encryption of the first argument."""
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    session = ectx.start_auth_session(salt_key, ESYS_TR.NONE, TPM2_SE.HMAC, sym,
                                      TPM2_ALG.SHA256)
    ectx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT)
    return session


def null_ticket() -> TPMT_TK_HASHCHECK:
    """The hash-check ticket for signing a digest the TPM did not compute."""
    return TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
