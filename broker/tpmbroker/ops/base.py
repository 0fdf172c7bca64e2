"""What every operation's message half shares: the check that turns a wire number into
its enum.

The message half of an operation (this package) is what clients import: its request and
result messages and the checks of their fields, with no TPM code. The broker's half, the
procedure, lives under the same name in tpmbroker.procedures.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedError


def member(cls: Any, value: int, what: str) -> Any:
    """`cls(value)`, or UNSUPPORTED naming what was not understood."""
    try:
        return cls(value)
    except ValueError:
        raise UnsupportedError(f"unknown {what} {value}") from None
