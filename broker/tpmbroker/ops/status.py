"""STATUS: the broker's and the TPM's state as JSON (pool, sessions, counters)."""

from __future__ import annotations

import dataclasses
import json

from ..definitions import Opcode
from ..protocol import Message, Result
from .base import Request


@dataclasses.dataclass(frozen=True)
class StatusRequest(Message):
    OPCODE = Opcode.STATUS


@dataclasses.dataclass(frozen=True)
class StatusResult(Result):
    OPCODE = Opcode.STATUS
    FIELDS = (("json", "str"),)
    json: str


def serve(request: Request, msg: StatusRequest) -> None:
    request.submit(request.worker.status,
                   lambda tpm: StatusResult(json.dumps(request.broker_status(tpm),
                                                       sort_keys=True)))
