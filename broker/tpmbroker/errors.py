"""Every error tpmbroker raises, with the wire protocol's stable status codes."""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm

from .definitions import Status as Status  # re-exported: errors carry it


class TpmBrokerError(Exception):
    """Base class. `status` is the wire code; `tpm_rc` the TPM's return code, or 0."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, *, tpm_rc: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.tpm_rc = tpm_rc

    def __str__(self) -> str:
        if self.tpm_rc:
            return f"{self.message} (TPM rc 0x{self.tpm_rc:03x})"
        return self.message


class ProtocolError(TpmBrokerError):
    status = Status.MALFORMED


class UnsupportedVersionError(ProtocolError):
    status = Status.UNSUPPORTED_VERSION


class UnknownOpcodeError(ProtocolError):
    status = Status.UNKNOWN_OPCODE


class FrameTooLargeError(ProtocolError):
    status = Status.TOO_LARGE


class UnknownKeyError(TpmBrokerError):
    status = Status.UNKNOWN_KEY


class BadKeyError(TpmBrokerError):
    status = Status.BAD_KEY


class AuthFailedError(TpmBrokerError):
    status = Status.AUTH_FAILED


class BadDigestError(TpmBrokerError):
    status = Status.BAD_DIGEST


class UnsupportedError(TpmBrokerError, UnsupportedAlgorithm):
    """What the key or the TPM cannot do (a sign-only key asked to decrypt, a decrypt-only
    key asked to sign, a scheme the TPM turns down). It is cryptography's
    UnsupportedAlgorithm too, so one `except UnsupportedAlgorithm` catches every such
    refusal, whether the client or the broker found it."""

    status = Status.UNSUPPORTED


class DeadlineError(TpmBrokerError):
    status = Status.DEADLINE


class NoSessionsError(DeadlineError):
    status = Status.NO_SESSIONS


class TpmError(TpmBrokerError):
    status = Status.TPM_ERROR


class TpmUnavailableError(TpmBrokerError):
    status = Status.TPM_UNAVAILABLE


class PermissionDeniedError(TpmBrokerError):
    status = Status.PERMISSION_DENIED


class InternalError(TpmBrokerError):
    status = Status.INTERNAL


class OverloadedError(TpmBrokerError):
    status = Status.OVERLOADED


class LockoutError(TpmBrokerError):
    status = Status.LOCKOUT


class ShuttingDownError(TpmBrokerError):
    """The broker is stopping: the request was received but will not be served."""

    status = Status.SHUTTING_DOWN


class ParentAuthFailedError(TpmBrokerError):
    """The key's parent refused its password (or none was given); the message names the
    parent. With tpm_rc 0 the broker did not ask the TPM: it refused that password for
    that parent before."""

    status = Status.PARENT_AUTH_FAILED


class BusyError(TpmBrokerError):
    """The broker refused the request on arrival: with the work queued ahead of it, the
    TPM could not serve it before its deadline. Nothing was sent to the TPM. The message
    says the expected wait ("expected wait N ms"); `expected_wait_ms` reads it."""

    status = Status.BUSY

    @property
    def expected_wait_ms(self) -> int | None:
        match = re.search(r"expected wait (\d+) ms", self.message)
        return int(match.group(1)) if match else None


class PolicyFailedError(TpmBrokerError):
    """The key's policy does not hold now: the message names what failed (the PCRs that
    differ from the key's policy). A policy failure costs no dictionary-attack count."""

    status = Status.POLICY_FAILED


class BrokerUnavailableError(TpmBrokerError):
    """Client side: the broker's socket cannot be reached (never sent on the wire)."""

    status = Status.INTERNAL


class NotForLane(Exception):
    """Inside the broker: the event loop could not serve a request by itself; the
    worker thread will, with everything (reconnection, recovery) that may take."""


_BY_STATUS: dict[Status, type[TpmBrokerError]] = {
    cls.status: cls
    for cls in (
        ProtocolError, UnsupportedVersionError, UnknownOpcodeError, FrameTooLargeError,
        UnknownKeyError, BadKeyError, AuthFailedError, BadDigestError, UnsupportedError,
        DeadlineError, NoSessionsError, TpmError, TpmUnavailableError, PermissionDeniedError,
        InternalError, OverloadedError, LockoutError, ShuttingDownError,
        ParentAuthFailedError, BusyError, PolicyFailedError,
    )
}


def error_for_status(status: int, message: str, tpm_rc: int = 0) -> TpmBrokerError:
    """The exception a client raises for an error response."""
    try:
        cls = _BY_STATUS[Status(status)]
    except ValueError:
        cls = TpmBrokerError
        message = f"status {status}: {message}"
    return cls(message, tpm_rc=tpm_rc)
