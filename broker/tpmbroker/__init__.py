"""tpmbroker: TPM 2.0 keys for OpenSSL and Python through one session broker.

The names below are imported on first use, not with the package: `tpmbroker serve` must
neutralise OPENSSL_CONF before anything loads an OpenSSL (cryptography's reads it at
import), or a configuration that activates the tpmbroker provider would load it into
the broker itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "Client": "client",
    "LoadedKey": "client",
    "TpmBrokerError": "errors",
    "TpmEllipticCurvePrivateKey": "cryptography_keys",
    "TpmRSAPrivateKey": "cryptography_keys",
    "load_private_key": "cryptography_keys",
    "wrap_key": "wrap",
}

__all__ = [
    "Client",
    "LoadedKey",
    "TpmBrokerError",
    "TpmEllipticCurvePrivateKey",
    "TpmRSAPrivateKey",
    "__version__",
    "load_private_key",
    "wrap_key",
]

if TYPE_CHECKING:
    from .client import Client as Client
    from .client import LoadedKey as LoadedKey
    from .cryptography_keys import TpmEllipticCurvePrivateKey as TpmEllipticCurvePrivateKey
    from .cryptography_keys import TpmRSAPrivateKey as TpmRSAPrivateKey
    from .cryptography_keys import load_private_key as load_private_key
    from .errors import TpmBrokerError as TpmBrokerError
    from .wrap import wrap_key as wrap_key


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tpmbroker' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
