"""TPM and TSS return codes: what they mean for the worker, and the error each becomes."""

from __future__ import annotations

import enum

from tpm2_pytss.constants import TPM2_RC, TSS2_RC
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from ..errors import AuthFailedError, LockoutError, TpmBrokerError, TpmError, TpmUnavailableError

_LAYER_MASK = int(TSS2_RC.RC_LAYER_MASK)
_TPM_LAYER = int(TSS2_RC.TPM_RC_LAYER)
_TCTI_LAYER = int(TSS2_RC.TCTI_RC_LAYER)
_ESAPI_LAYER = int(TSS2_RC.ESAPI_RC_LAYER)
# A resource manager (tpm2-abrmd) reports TPM-style codes in layers of its own: its own
# per-connection limits (0xB0903 = SESSION_MEMORY) and what the TPM told it.
_RM_LAYERS = (int(TSS2_RC.RESMGR_RC_LAYER), int(TSS2_RC.RESMGR_TPM_RC_LAYER))

_FMT1 = 0x080
_FMT1_ERROR_MASK = 0x0BF  # drops the handle/parameter/session number bits
_SESSION_BIT = 0x800
_PARAMETER_BIT = 0x040

# ESAPI's own failures that mean the link to the TPM broke under it.
_ESAPI_TRANSPORT = {int(TSS2_RC.BASE_RC_BAD_SEQUENCE), int(TSS2_RC.BASE_RC_NO_CONNECTION),
                    int(TSS2_RC.BASE_RC_IO_ERROR), int(TSS2_RC.BASE_RC_TRY_AGAIN),
                    int(TSS2_RC.BASE_RC_MALFORMED_RESPONSE),
                    int(TSS2_RC.BASE_RC_INSUFFICIENT_RESPONSE)}

_SESSION_SLOTS = {int(TPM2_RC.SESSION_HANDLES), int(TPM2_RC.SESSION_MEMORY)}
_REFERENCE = set(range(int(TPM2_RC.REFERENCE_H0), int(TPM2_RC.REFERENCE_S6) + 1))
_AUTH = {int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH)}
_RESPONSE_AUTH_FAILED = int(TSS2_RC.ESYS_RC_RSP_AUTH_FAILED)  # command.ResponseAuthError


class Kind(enum.Enum):
    TRANSPORT = "transport"            # the connection broke: reconnect
    NEEDS_STARTUP = "needs startup"    # TPM_RC_INITIALIZE: power-cycled, send Startup
    LOST = "lost"                      # a session or object we hold is gone from the TPM
    SESSION_SLOTS = "session slots"    # no free session slot (other users hold them)
    OBJECT_MEMORY = "object memory"    # no free transient object slot
    AUTH = "auth"                      # wrong password
    LOCKOUT = "lockout"                # dictionary-attack lockout
    OTHER = "other"


def tpm_code(rc: int) -> int | None:
    """The TPM's code without handle/session/parameter numbers, or None for TSS failures."""
    layer = rc & _LAYER_MASK
    if layer != _TPM_LAYER and layer not in _RM_LAYERS:
        return None
    code = rc & 0xFFFF
    return code & _FMT1_ERROR_MASK if code & _FMT1 else code


def classify(exc: TSS2_Exception) -> Kind:
    rc = int(exc.rc)
    layer = rc & _LAYER_MASK
    if layer == _TCTI_LAYER or (layer == _ESAPI_LAYER and rc & 0xFFFF in _ESAPI_TRANSPORT):
        return Kind.TRANSPORT
    code = tpm_code(rc)
    if code is None:
        return Kind.OTHER
    if code == TPM2_RC.INITIALIZE:
        return Kind.NEEDS_STARTUP
    if code in _SESSION_SLOTS:
        return Kind.SESSION_SLOTS
    if code == TPM2_RC.OBJECT_MEMORY:
        return Kind.OBJECT_MEMORY
    if code in _REFERENCE:
        return Kind.LOST
    raw = rc & 0xFFFF
    # TPM_RC_HANDLE or TPM_RC_VALUE for a session or a handle (not a parameter): the
    # TPM no longer knows something we hold.
    if (code in (TPM2_RC.HANDLE, TPM2_RC.VALUE) and raw & _FMT1
            and not raw & _PARAMETER_BIT and raw & 0xF00):
        return Kind.LOST
    if code in _AUTH:
        return Kind.AUTH
    if code == TPM2_RC.LOCKOUT:
        return Kind.LOCKOUT
    return Kind.OTHER


def to_error(exc: TSS2_Exception, doing: str) -> TpmBrokerError:
    """The tpmbroker error for a failed command; `doing` says what was attempted."""
    rc = int(exc.rc)
    if rc == _RESPONSE_AUTH_FAILED:
        return TpmError(f"the TPM's answer while {doing} failed its HMAC check: it was "
                        "altered on the TPM's bus or did not come from the TPM (an "
                        "interposer?); the answer was dropped and its session replaced",
                        tpm_rc=rc)
    kind = classify(exc)
    if kind is Kind.TRANSPORT:
        return TpmUnavailableError(f"lost the connection to the TPM while {doing}: {exc}",
                                   tpm_rc=rc)
    if kind is Kind.AUTH:
        return AuthFailedError(f"wrong password for the key while {doing}",
                               tpm_rc=tpm_code(rc) or rc)
    if kind is Kind.LOCKOUT:
        return LockoutError("the TPM is in dictionary-attack lockout; wait for it to recover "
                            "or reset it with the lockout authorization",
                            tpm_rc=tpm_code(rc) or rc)
    return TpmError(f"the TPM refused {doing}: {exc}", tpm_rc=rc)


def rc_name(rc: int) -> str:
    """TPM_RC_VALUE and the like, for people, from a TPM's response code."""
    code = tpm_code(rc)
    if code is None:
        return f"0x{rc:x}"
    try:
        return "TPM_RC_" + str(TPM2_RC.to_string(code)).split(".")[-1]
    except ValueError:
        return f"0x{rc:x}"
