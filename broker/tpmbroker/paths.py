"""Where things live: the broker socket, the provider module, the simulator state."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def provider_path() -> Path:
    """Absolute path of the compiled OpenSSL provider module."""
    return PACKAGE_DIR / "tpmbroker.so"


SYSTEM_SOCKET = "/run/tpmbroker/tpmbroker.sock"  # the system service's (tpmbroker.conf)


def default_socket(serving: bool = False) -> str:
    """Where --socket is not given: $TPMBROKER_SOCKET, else $XDG_RUNTIME_DIR/tpmbroker.sock
    (for a client, only where a broker of this user's session is listening, so that a
    user logged in on a machine with the system service reaches that), else the system
    service's socket."""
    env = os.environ.get("TPMBROKER_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        session = Path(runtime) / "tpmbroker.sock"
        if serving or session.exists():
            return str(session)
    return SYSTEM_SOCKET


# In the broker's state directory: the TPM's EK, pinned by `tpmbroker enroll`.
EK_PIN_FILE = "ek-pin.json"


def default_state_dir() -> Path:
    """Where the embedded simulator keeps its TPM state."""
    env = os.environ.get("TPMBROKER_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/tpmbroker")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tpmbroker"
