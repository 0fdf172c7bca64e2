"""The TPM worker and its layers: the only part of tpmbroker that talks to the TPM."""

from __future__ import annotations

from .keys import KeyInfo
from .worker import TpmWorker

__all__ = ["KeyInfo", "TpmWorker"]
