"""STATUS, the broker's half: the worker's pools, sessions, keys and lockout, what this
TPM makes keys of, and the server's own figures."""

from __future__ import annotations

import json

from ..definitions import Opcode
from ..ops.status import StatusRequest, StatusResult
from ..tpm.worker import TpmWorker
from . import generate
from .base import Request, serves

# Counters procedures keep in the worker (TpmWorker.counters), shown from zero.
PROCEDURE_COUNTERS = ("tpm_hashed_messages",)


@serves(Opcode.STATUS)
def serve(request: Request, msg: StatusRequest) -> None:
    worker = request.worker
    request.submit(lambda: status(worker),
                   lambda tpm: StatusResult(json.dumps(request.broker_status(tpm),
                                                       sort_keys=True)))


def status(tpm: TpmWorker) -> dict[str, object]:
    return {**generate.algorithms(tpm), **dict.fromkeys(PROCEDURE_COUNTERS, 0),
            **tpm.status()}
