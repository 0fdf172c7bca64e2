"""The package's public names, and that importing it starts no OpenSSL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tpmbroker

ROOT = Path(__file__).resolve().parents[1]


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


def test_build_script_compiles_both_modules(tmp_path: Path) -> None:
    """`python build_provider.py`, as the README names it, with this environment's tools."""
    out = subprocess.run([sys.executable, str(ROOT / "build_provider.py"), "-o",
                          str(tmp_path / "tpmbroker.so")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    built = [Path(line) for line in out.stdout.split()]
    assert built[0] == tmp_path / "tpmbroker.so" and built[0].stat().st_size > 0
    assert built[1].name.startswith("_authorize.") and built[1].parent.name == "tpm"
