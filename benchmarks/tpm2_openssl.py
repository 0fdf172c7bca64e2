"""Which tpm2-openssl modules are installed, and their versions.

Two release lines behave differently under load: up to 1.2 the provider is not
thread-safe; 1.3.0 (Debian 13) takes one global lock per process. Each line found is a
system of its own, named after it ("tpm2-openssl-1.1", "tpm2-openssl-1.3"), so both run
side by side where both are installed.

The version is what the module says of itself (`openssl list -providers`). Loading it
opens a TPM connection (TPM2OPENSSL_TCTI) and fails without one, so the check runs
against the benchmark's own TPM.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

SYSTEMS = ("tpm2-openssl-1.1", "tpm2-openssl-1.3")
# Where a tpm2-openssl other than the distribution's may live; more directories in
# TPMBROKER_BENCH_TPM2_OPENSSL (colon-separated).
EXTRA_DIRS = ("/usr/local/lib/ossl-modules", "/usr/local/lib/x86_64-linux-gnu/ossl-modules",
              "/usr/local/lib64/ossl-modules")


@dataclasses.dataclass(frozen=True)
class Module:
    version: str  # "1.1.1"
    directory: str  # holds tpm2.so


def system_for(version: str) -> str:
    """"tpm2-openssl-1.3" for 1.3.0 and later, "tpm2-openssl-1.1" for anything older."""
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return "tpm2-openssl-1.3" if numbers >= (1, 3) else "tpm2-openssl-1.1"


def default_directory() -> str | None:
    """OpenSSL's MODULESDIR, where the distribution's tpm2-openssl goes."""
    try:
        out = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'MODULESDIR: "([^"]+)"', out)
    return match.group(1) if match else None


def candidate_directories() -> list[str]:
    extra = [d for d in os.environ.get("TPMBROKER_BENCH_TPM2_OPENSSL", "").split(":") if d]
    found = [default_directory(), *extra, *EXTRA_DIRS]
    return list(dict.fromkeys(d for d in found if d and (Path(d) / "tpm2.so").exists()))


def version_of(directory: str, tcti: str,
               env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(version, "") of the tpm2.so in `directory`, or (None, why not). `env`: the
    environment the TCTI needs (tpm2-abrmd's bus), os.environ by default."""
    env = dict(os.environ if env is None else env, TPM2OPENSSL_TCTI=tcti,
               TSS2_LOG="all+none")
    env.pop("OPENSSL_CONF", None)
    try:
        out = subprocess.run(["openssl", "list", "-providers", "-provider-path", directory,
                              "-provider", "tpm2"], env=env, capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    match = re.search(r"^\s*version:\s*(\S+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        said = out.stderr.strip().splitlines()[-1:] or ["no version printed"]
        return None, f"{directory}/tpm2.so does not load: {said[0][:200]}"
    return match.group(1), ""


def find(tcti: str, env: dict[str, str] | None = None,
         ) -> tuple[dict[str, Module], dict[str, str]]:
    """({system: module}, {system: why it cannot run}) for both release lines."""
    modules: dict[str, Module] = {}
    problems: list[str] = []
    for directory in candidate_directories():
        version, why = version_of(directory, tcti, env)
        if version is None:
            problems.append(why)
            continue
        modules.setdefault(system_for(version), Module(version, directory))
    missing: dict[str, str] = {}
    for system in SYSTEMS:
        if system in modules:
            continue
        line = system.rsplit("-", 1)[1]
        others = ", ".join(f"{m.version} in {m.directory}" for m in modules.values())
        missing[system] = ((f"no tpm2-openssl {line} that loads: " + "; ".join(problems))
                           if problems else f"no tpm2-openssl {line} installed"
                           + (f" (found {others})" if others else "")
                           + (" (Debian 13: tpm2-openssl 1.3.0; elsewhere put its tpm2.so "
                              "in a directory named by TPMBROKER_BENCH_TPM2_OPENSSL)"
                              if line == "1.3" else " (Debian 12: tpm2-openssl)"))
    return modules, missing
