"""tpmbroker: TPM 2.0 keys for OpenSSL and Python through one session broker."""

from __future__ import annotations

__version__ = "0.1.0"
