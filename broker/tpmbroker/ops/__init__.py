"""The wire operations, one module each, and the opcode table the server dispatches by.

Adding an operation: a module here with its request and result messages and `serve`,
its opcode in tpmbroker/definitions.py, a row below; on the C side a builder in
provider/wire.c and a call in provider/client.c. docs/architecture.md has the checklist.
"""

from __future__ import annotations

from ..definitions import Opcode
from . import (
    decrypt,
    derive,
    generate,
    hello,
    import_key,
    lifecycle,
    load,
    nv_read,
    pcr_read,
    random,
    sign,
    sign_message,
    status,
    unload,
)
from .base import Operation, Request, Worker
from .decrypt import Decrypt, DecryptResult
from .derive import Derive, DeriveResult
from .generate import Generate, GenerateResult
from .hello import Hello, HelloResult
from .import_key import Import, ImportResult
from .lifecycle import Evict, EvictResult, KeysRequest, KeysResult, Persist, PersistResult
from .load import Load, LoadResult
from .nv_read import NvRead, NvReadResult
from .pcr_read import PcrRead, PcrReadResult
from .random import Random, RandomResult
from .sign import Sign, SignResult
from .sign_message import SignMessage, SignMessageResult
from .status import StatusRequest, StatusResult
from .unload import Unload, UnloadResult

OPERATIONS: dict[Opcode, Operation] = {
    Opcode.HELLO: Operation(Hello, HelloResult, hello.serve),
    Opcode.LOAD: Operation(Load, LoadResult, load.serve),
    Opcode.SIGN: Operation(Sign, SignResult, sign.serve),
    Opcode.GENERATE: Operation(Generate, GenerateResult, generate.serve),
    Opcode.STATUS: Operation(StatusRequest, StatusResult, status.serve),
    Opcode.UNLOAD: Operation(Unload, UnloadResult, unload.serve),
    Opcode.RANDOM: Operation(Random, RandomResult, random.serve),
    Opcode.NV_READ: Operation(NvRead, NvReadResult, nv_read.serve),
    Opcode.DECRYPT: Operation(Decrypt, DecryptResult, decrypt.serve),
    Opcode.DERIVE: Operation(Derive, DeriveResult, derive.serve),
    Opcode.SIGN_MESSAGE: Operation(SignMessage, SignMessageResult, sign_message.serve),
    Opcode.PERSIST: Operation(Persist, PersistResult, lifecycle.serve_persist),
    Opcode.EVICT: Operation(Evict, EvictResult, lifecycle.serve_evict),
    Opcode.KEYS: Operation(KeysRequest, KeysResult, lifecycle.serve_keys),
    Opcode.IMPORT: Operation(Import, ImportResult, import_key.serve),
    Opcode.PCR_READ: Operation(PcrRead, PcrReadResult, pcr_read.serve),
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
    "Request",
    "Sign",
    "SignMessage",
    "SignMessageResult",
    "SignResult",
    "StatusRequest",
    "StatusResult",
    "Unload",
    "UnloadResult",
    "Worker",
]
