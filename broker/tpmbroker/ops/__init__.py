"""The wire operations' message halves, one module each.

Clients import these modules: messages and their checks, no TPM code. Defining a
message registers it with the codec (tpmbroker.protocol.Message), so importing this
package registers every operation: nothing here lists them. The broker's half of each
operation (its `serve` and TPM procedure) is the module of the same name in
tpmbroker.procedures. docs/architecture.md has the checklist for a new operation.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# What operations count (Request.count), shown by STATUS from zero; STATUS also shows
# the successful answers to SIGN as "signatures".
COUNTERS = ("random_bytes", "derivations", "decryptions")
