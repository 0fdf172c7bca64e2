"""The broker's half of each wire operation, one module each under the name of its
message half in tpmbroker.ops, and the table the server dispatches by.

A module's `serve` checks a request on the event loop (turning wire numbers into typed
values, once) and submits its TPM procedure, the functions beside it, which run on the
worker thread against the worker's core (tpmbroker.tpm.worker). Clients never import
this package: it needs tpm2-pytss and libtss2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..definitions import Opcode
from . import (
    decrypt,
    derive,
    generate,
    hello,
    import_key,
    load,
    nv_read,
    pcr_read,
    persistence,
    random,
    sign,
    sign_message,
    status,
    unload,
)
from .base import Request

SERVE: dict[Opcode, Callable[[Request, Any], None]] = {
    Opcode.HELLO: hello.serve,
    Opcode.LOAD: load.serve,
    Opcode.SIGN: sign.serve,
    Opcode.GENERATE: generate.serve,
    Opcode.STATUS: status.serve,
    Opcode.UNLOAD: unload.serve,
    Opcode.RANDOM: random.serve,
    Opcode.NV_READ: nv_read.serve,
    Opcode.DECRYPT: decrypt.serve,
    Opcode.DERIVE: derive.serve,
    Opcode.SIGN_MESSAGE: sign_message.serve,
    Opcode.PERSIST: persistence.serve_persist,
    Opcode.EVICT: persistence.serve_evict,
    Opcode.KEYS: persistence.serve_keys,
    Opcode.IMPORT: import_key.serve,
    Opcode.PCR_READ: pcr_read.serve,
}

__all__ = ["SERVE", "Request"]
