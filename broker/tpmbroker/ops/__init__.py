"""The wire operations' message halves, one module each, and the opcode table.

Clients import this package: messages and their checks, no TPM code. The broker's half
of each operation (its `serve` and TPM procedure) is the module of the same name in
tpmbroker.procedures. docs/architecture.md has the checklist for a new operation.
"""

from __future__ import annotations

from ..definitions import Opcode
from .base import Operation
from .decrypt import Decrypt, DecryptResult
from .derive import Derive, DeriveResult
from .generate import Generate, GenerateResult
from .hello import Hello, HelloResult
from .import_key import Import, ImportResult
from .load import Load, LoadResult
from .nv_read import NvRead, NvReadResult
from .pcr_read import PcrRead, PcrReadResult
from .persistence import Evict, EvictResult, KeysRequest, KeysResult, Persist, PersistResult
from .random import Random, RandomResult
from .sign import Sign, SignResult
from .sign_message import SignMessage, SignMessageResult
from .status import StatusRequest, StatusResult
from .unload import Unload, UnloadResult

OPERATIONS: dict[Opcode, Operation] = {
    Opcode.HELLO: Operation(Hello, HelloResult),
    Opcode.LOAD: Operation(Load, LoadResult),
    Opcode.SIGN: Operation(Sign, SignResult),
    Opcode.GENERATE: Operation(Generate, GenerateResult),
    Opcode.STATUS: Operation(StatusRequest, StatusResult),
    Opcode.UNLOAD: Operation(Unload, UnloadResult),
    Opcode.RANDOM: Operation(Random, RandomResult),
    Opcode.NV_READ: Operation(NvRead, NvReadResult),
    Opcode.DECRYPT: Operation(Decrypt, DecryptResult),
    Opcode.DERIVE: Operation(Derive, DeriveResult),
    Opcode.SIGN_MESSAGE: Operation(SignMessage, SignMessageResult),
    Opcode.PERSIST: Operation(Persist, PersistResult),
    Opcode.EVICT: Operation(Evict, EvictResult),
    Opcode.KEYS: Operation(KeysRequest, KeysResult),
    Opcode.IMPORT: Operation(Import, ImportResult),
    Opcode.PCR_READ: Operation(PcrRead, PcrReadResult),
}

# What operations count (Request.count), shown by STATUS from zero; STATUS also shows
# the successful answers to SIGN as "signatures".
COUNTERS = ("random_bytes", "derivations", "decryptions")

__all__ = [
    "COUNTERS",
    "OPERATIONS",
    "Decrypt",
    "DecryptResult",
    "Derive",
    "DeriveResult",
    "Evict",
    "EvictResult",
    "Generate",
    "GenerateResult",
    "Hello",
    "HelloResult",
    "Import",
    "ImportResult",
    "KeysRequest",
    "KeysResult",
    "Load",
    "LoadResult",
    "NvRead",
    "NvReadResult",
    "Operation",
    "PcrRead",
    "PcrReadResult",
    "Persist",
    "PersistResult",
    "Random",
    "RandomResult",
    "Sign",
    "SignMessage",
    "SignMessageResult",
    "SignResult",
    "StatusRequest",
    "StatusResult",
    "Unload",
    "UnloadResult",
]
