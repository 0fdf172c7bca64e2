"""tpmbroker: TPM 2.0 keys for OpenSSL and Python through one session broker."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, LoadedKey
from .crypto import (
    TpmEllipticCurvePrivateKey,
    TpmRSAPrivateKey,
    load_private_key,
)
from .errors import TpmBrokerError

__all__ = [
    "Client",
    "LoadedKey",
    "TpmBrokerError",
    "TpmEllipticCurvePrivateKey",
    "TpmRSAPrivateKey",
    "__version__",
    "load_private_key",
]
