"""The package's public names, and that importing it starts no OpenSSL."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tpmbroker


def test_every_public_name_resolves() -> None:
    for name in tpmbroker.__all__:
        assert getattr(tpmbroker, name) is not None
    with pytest.raises(AttributeError):
        _ = tpmbroker.NoSuchThing


def test_importing_the_package_and_cli_loads_no_openssl() -> None:
    """`tpmbroker serve` sets OPENSSL_CONF aside before the first OpenSSL starts."""
    code = ("import sys, tpmbroker, tpmbroker.cli; "
            "print(sorted(m for m in ('_hashlib', '_ssl', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
