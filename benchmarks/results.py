"""What a benchmark run produces, and the names of the systems it can contain.

The data types every other module of the harness shares: the runner makes Points, the
report writes them, the targets judge them. This module imports none of those.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SYSTEMS = ("direct-password", "direct-hmac", "provider", "client", "tpm2-openssl-1.1",
           "tpm2-openssl-1.3", "engine-style", "tpm2-pkcs11", "provider-noverify",
           "client-noverify")
# provider and client with the signer's own verification of each signature off, to show
# what it costs (signing only; not in the default run)
VERIFY_OFF = {"provider-noverify": "provider", "client-noverify": "client"}
DEFAULT_SYSTEMS = tuple(x for x in SYSTEMS if x not in VERIFY_OFF)
# tpm2-openssl by release line (benchmarks/tpm2_openssl.py); "tpm2-openssl" in --systems
# means every line
TPM2_OPENSSL = ("tpm2-openssl-1.1", "tpm2-openssl-1.3")
DIRECT = ("direct-password", "direct-hmac")  # straight to the TPM, one signer
# through tpmbroker; each -noverify system right after its own, so the two run close in time
BROKER = ("provider", "provider-noverify", "client", "client-noverify")
JUDGED = ("provider", "client")  # the tpmbroker systems the targets judge
ABRMD = (*TPM2_OPENSSL, "engine-style", "tpm2-pkcs11")  # through tpm2-abrmd

REFERENCE = "direct-password"  # the rate the others are compared with
PEERS = TPM2_OPENSSL  # what a user of tpm2-openssl would compare with

KEYS = ("ec:P-256", "rsa:2048")


@dataclasses.dataclass
class Point:
    """One system, one key, one concurrency level: what was measured."""

    system: str
    key: str
    clients: int
    seconds: float
    signatures: int
    rate: float
    p50_ms: float
    p99_ms: float
    failures: int
    bad_signatures: int
    max_active_sessions: int | None
    tpm_utilization: float | None
    errors: dict[str, int]
    note: str = ""
    broker_cpu_us: float | None = None  # broker process CPU per signature
    fairness: float | None = None  # slowest signer's count over the fastest's
    # tpmbroker systems: the broker's turn-around for this point's TPM command
    # (benchmarks.turnaround.summary); None for the others
    turnaround: dict[str, Any] | None = None
    signer_cpu_us: float | None = None  # the signing process's CPU per operation


@dataclasses.dataclass
class Results:
    meta: dict[str, Any]
    points: list[Point]
