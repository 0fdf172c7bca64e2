"""The broker's half of each wire operation, one module each under the name of its
message half in tpmbroker.ops, and the table the server dispatches by.

A module's `serve` checks a request on the event loop (turning wire numbers into typed
values, once) and submits its TPM procedure, the functions beside it, which run on the
worker thread against the worker's core (tpmbroker.tpm.worker). `@serves(opcode)` puts
a `serve` in the table, so importing this package fills it: nothing here lists the
operations. Clients never import this package: it needs tpm2-pytss and libtss2.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SERVE, Request, Serve, serves

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SERVE", "Request", "Serve", "serves"]
