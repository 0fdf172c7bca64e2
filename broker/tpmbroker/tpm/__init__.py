"""The TPM worker: the only part of tpmbroker that talks to the TPM (through tpm2-pytss)."""

from __future__ import annotations

from .keys import KeyInfo
from .worker import TpmWorker

__all__ = ["KeyInfo", "TpmWorker"]
