"""Compile provider/*.c into tpmbroker.so, and act as the package's build backend.

Run as a script, it compiles the provider into broker/tpmbroker/tpmbroker.so (or
the path given with -o) and the broker's C session arithmetic into
broker/tpmbroker/tpm/_authorize*.so. Used as a PEP 517 backend (pyproject.toml
names it), it compiles first and then hands over to setuptools, so every wheel and
every editable install carries both.

The module is plain C: cffi's build machinery (ffiplatform over setuptools'
build_ext) does the compiling and linking, but nothing Python is linked in. A
linker version script exports only OSSL_provider_init; the result is checked for
Python C-API symbols because OpenSSL dlopens providers with RTLD_NOW and without
RTLD_GLOBAL, so one such symbol would make the module unloadable in nginx.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
PROVIDER_DIR = ROOT / "provider"
DEFAULT_OUTPUT = ROOT / "broker" / "tpmbroker" / "tpmbroker.so"
TPM_DIR = ROOT / "broker" / "tpmbroker" / "tpm"
DEFINITIONS = ROOT / "broker" / "tpmbroker" / "definitions.py"
DEFINITIONS_HEADER = PROVIDER_DIR / "definitions.h"
AUTHORIZE_MODULE = "tpmbroker.tpm._authorize"
WARNINGS = ["-Wall", "-Wextra", "-Werror"]


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libcrypto"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


def write_definitions_header() -> Path:
    """provider/definitions.h from broker/tpmbroker/definitions.py, the one place the
    shared numbers are written. The module is loaded by path: a build backend cannot
    import the package it is building."""
    spec = importlib.util.spec_from_file_location("_tpmbroker_definitions", DEFINITIONS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass and enum machinery look the module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    text = module.c_header()
    if not DEFINITIONS_HEADER.exists() or DEFINITIONS_HEADER.read_text() != text:
        DEFINITIONS_HEADER.write_text(text)  # unchanged: keep the mtime, no rebuild
    return DEFINITIONS_HEADER


def build(output: Path = DEFAULT_OUTPUT, verbose: bool = False) -> Path:
    """Compile the provider and return the path of the .so written."""
    from cffi import ffiplatform
    from setuptools import Extension

    write_definitions_header()

    sources = sorted(str(p.relative_to(ROOT)) for p in PROVIDER_DIR.glob("*.c"))
    if not sources:
        raise SystemExit("build_provider: no C sources in provider/")
    cflags = _pkg_config("--cflags")
    libs = _pkg_config("--libs") or ["-lcrypto"]
    ext = Extension(
        name="tpmbroker",
        sources=sources,
        include_dirs=[str(PROVIDER_DIR)],
        depends=[str(p) for p in PROVIDER_DIR.glob("*.h")],
        extra_compile_args=[*cflags, *WARNINGS, "-fvisibility=hidden", "-std=gnu11"],
        extra_link_args=[
            *libs,
            "-lpthread",
            f"-Wl,--version-script={PROVIDER_DIR / 'tpmbroker.map'}",
            "-Wl,-z,defs",
            "-Wl,-z,now",
        ],
    )
    cwd = os.getcwd()
    os.chdir(ROOT)  # build_ext resolves relative source paths against the cwd
    try:
        with tempfile.TemporaryDirectory(prefix="tpmbroker-build-") as tmp:
            built = Path(ffiplatform.compile(tmp, ext, compiler_verbose=int(verbose)))
            _check_symbols(built)
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = output.with_suffix(".so.tmp")
            shutil.copyfile(built, tmp_out)
            os.replace(tmp_out, output)  # atomic: a running openssl never sees half a file
    finally:
        os.chdir(cwd)
    return output


def build_authorize(verbose: bool = False) -> Path:
    """Compile tpm/authorize.c and tpm/depad.c into the Python extension
    tpmbroker.tpm._authorize.

    Unlike the provider this one is for the broker process only, so it is an ordinary
    cffi API-mode extension; its cdef is authorize.h without preprocessor lines.
    """
    from cffi import FFI

    units = ("authorize", "depad")  # depad.c: RSA decryption paddings, constant time
    headers = [TPM_DIR / f"{unit}.h" for unit in units]
    cdef = "\n".join(line for header in headers for line in header.read_text().splitlines()
                     if not line.startswith(("#ifndef", "#endif", "#include"))
                     and not (line.startswith("#define TPMBROKER_") and line.endswith("_H")))
    ffi = FFI()
    ffi.cdef(cdef)
    ffi.set_source(
        AUTHORIZE_MODULE,
        "".join(f'#include "{unit}.h"\n' for unit in units),
        sources=[str(TPM_DIR / f"{unit}.c") for unit in units],
        include_dirs=[str(TPM_DIR)],
        depends=[str(header) for header in headers],
        extra_compile_args=[*_pkg_config("--cflags"), *WARNINGS, "-std=gnu11"],
        extra_link_args=_pkg_config("--libs") or ["-lcrypto"],
    )
    with tempfile.TemporaryDirectory(prefix="tpmbroker-build-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=verbose))
        output = TPM_DIR / built.name
        tmp_out = output.with_suffix(".so.tmp")
        shutil.copyfile(built, tmp_out)
        os.replace(tmp_out, output)
    return output


def _check_symbols(path: Path) -> None:
    try:
        undefined = subprocess.run(
            ["nm", "-D", "--undefined-only", str(path)], check=True, capture_output=True, text=True
        ).stdout
        defined = subprocess.run(
            ["nm", "-D", "--defined-only", str(path)], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # no binutils: the test suite checks the same thing
    py = [line for line in undefined.splitlines() if line.split()[-1].startswith("Py")]
    if py:
        raise SystemExit(f"build_provider: {path} needs Python symbols: {py}")
    exported = {line.split()[-1] for line in defined.splitlines() if " T " in line}
    if exported != {"OSSL_provider_init"}:
        raise SystemExit(f"build_provider: unexpected exports {sorted(exported)}")


# --- PEP 517 backend: compile, then let setuptools do the packaging -----------------

def _setuptools() -> Any:
    from setuptools import build_meta

    return build_meta


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build()
    build_authorize()
    return str(_setuptools().build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build()
    build_authorize()
    return str(_setuptools().build_editable(wheel_directory, config_settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    return str(_setuptools().build_sdist(sdist_directory, config_settings))


def __getattr__(name: str) -> Any:
    # get_requires_for_build_*, prepare_metadata_for_build_*: setuptools' own.
    return getattr(_setuptools(), name)


def _require_build_tools() -> None:
    missing = [name for name in ("setuptools", "cffi") if importlib.util.find_spec(name) is None]
    if missing:
        # Python 3.12+ venvs have no setuptools; the dev extra brings both.
        raise SystemExit(f"build_provider: {' and '.join(missing)} missing in {sys.prefix}: "
                         f"{sys.executable} -m pip install {' '.join(missing)}  "
                         "(or pip install -e '.[dev]')")


def main(argv: list[str] | None = None) -> int:
    _require_build_tools()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.output, args.verbose))
    print(build_authorize(args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
