"""Certification, for key attestation (CERTIFY): TPM2_Certify of a key by the
attestation key, and TPM2_ActivateCredential, which binds that attestation key to the
EK once."""

from __future__ import annotations

import contextlib
from typing import Any

from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from . import session_crypto as sc
from .command import (
    U16,
    PendingCommand,
    aes128_cfb,
    first_sized_length,
    prepare,
    sign_result,
    with_empty_password,
)

CC_CERTIFY = 0x00000148
# qualifyingData and certifyInfo are not secret; the session proves the key's password
# and makes the answer authentic.
CERTIFY_ATTRIBUTES = sc.CONTINUE_SESSION
_SCHEME_NULL = U16.pack(int(TPM2_ALG.NULL))  # the signing key's own scheme


def prepare_certify(session: sc.SessionState, key_handle: int, key_name: bytes, auth: bytes,
                    signer_handle: int, signer_name: bytes, qualifying_data: bytes,
                    ) -> PendingCommand:
    """TPM2_Certify(objectHandle=key, signHandle=signer, qualifyingData): the key's
    authorization through `session`, the signer's by the empty password."""
    pending = prepare(session, CC_CERTIFY, (key_handle, signer_handle),
                      (key_name, signer_name), auth, qualifying_data, _SCHEME_NULL,
                      CERTIFY_ATTRIBUTES)
    return with_empty_password(pending, handles=2)


def certify_result(parameters: bytes) -> tuple[bytes, bytes]:
    """(certifyInfo, the marshalled TPMT_SIGNATURE) of a TPM2_Certify response."""
    size = first_sized_length(parameters)
    signature = parameters[2 + size:]
    sign_result(signature)  # well-formed, nothing after it
    return parameters[2:2 + size], signature


# --- TPM2_ActivateCredential, once per attestation key --------------------------------------

def activate_credential(ectx: Any, ak: Any, ek: Any, credential_blob: Any,
                        secret: Any) -> bytes:
    """TPM2_ActivateCredential(activateHandle=AK, keyHandle=EK) through ESAPI: the AK
    by its empty password, the EK by a policy session that satisfies its policy
    (TPM2_PolicySecret of the endorsement hierarchy), salted to the EK and with ENCRYPT,
    so the recovered credential crosses the bus encrypted. The session is flushed after.
    Once per attestation key, not per certification (tpmbroker.procedures.certify)."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_SE, TPMA_SESSION

    session = ectx.start_auth_session(ek, ESYS_TR.NONE, TPM2_SE.POLICY, aes128_cfb(),
                                      TPM2_ALG.SHA256)
    try:
        ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
        ectx.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
        certinfo = ectx.activate_credential(ak, ek, credential_blob, secret,
                                            session1=ESYS_TR.PASSWORD, session2=session)
    finally:
        with contextlib.suppress(TSS2_Exception):
            ectx.flush_context(session)
    return bytes(certinfo)
