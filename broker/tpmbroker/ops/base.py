"""What an operation's server half sees of the broker: one request, and the TPM worker.

Each module in tpmbroker.ops defines its wire messages, checks them, and says which TPM
work answers them. The server gives every request a `Request` and dispatches it to the
operation's `serve` through the table in tpmbroker.ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from ..definitions import Hash, KeySource, KeyType, Padding, Scheme, Usage
from ..errors import UnsupportedError
from ..protocol import Message


class Worker(Protocol):
    """The TPM worker as operations use it (tpmbroker.tpm.TpmWorker). Its methods run on
    the worker thread, one at a time; `deadline` is a time.monotonic() value."""

    def load_key(self, source: KeySource, key: bytes, deadline: float, *,
                 parent_auth: bytes = b"", peer: int = -1) -> Any: ...
    def sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash, digest: bytes,
             deadline: float, peer: int = -1) -> bytes: ...
    def check_password(self, key_id: bytes, auth: bytes, peer: int) -> None:
        """On the event loop, no TPM: raise if the dictionary-attack shield refuses."""
    def generate_key(self, key_type: KeyType, param: int, auth: bytes, parent: int,
                     deadline: float, usage: Usage = Usage.DEFAULT,
                     hash_alg: Hash | None = None, *, parent_auth: bytes = b"",
                     peer: int = -1, policy: bytes = b"") -> tuple[bytes, bytes]: ...
    def status(self) -> dict[str, object]: ...
    def sign_message(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
                     message: bytes, deadline: float, peer: int = -1) -> bytes: ...
    def restricted(self, key_id: bytes) -> bool | None:
        """On the event loop, no TPM: is the key a restricted signing key (None: the
        worker does not know the key now)."""
    def random(self, count: int, deadline: float) -> bytes: ...
    def nv_read(self, index: int, deadline: float) -> bytes: ...
    def pcr_read(self, selection: bytes, deadline: float) -> tuple[bytes, bytes]:
        """TPM2_PCR_Read: (the TPML_PCR_SELECTION answered, the values concatenated)."""
    def decrypt(self, key_id: bytes, auth: bytes, padding: Padding, hash: Hash, mgf1: Hash,
                label: bytes, ciphertext: bytes, implicit_rejection: bool, deadline: float,
                peer: int = -1) -> bytes: ...
    def derive(self, key_id: bytes, auth: bytes, point: bytes, deadline: float,
               peer: int = -1) -> bytes: ...
    def parent_public(self, parent: int, deadline: float) -> bytes:
        """The TPM2B_PUBLIC of a parent (0 = the storage primary), for wrapping to it."""
    def import_key(self, key: bytes, deadline: float, *, parent: int = 0,
                   parent_auth: bytes = b"", peer: int = -1) -> tuple[bytes, bytes]:
        """TPM2_Import of an importable key file: (parent's TPM2B_PUBLIC, loadable DER)."""
    def persist(self, key_id: bytes, handle: int, deadline: float, *,
                owner_auth: bytes = b"", peer: int = -1) -> bytes:
        """EvictControl of a loaded key to `handle`; the key's Name."""
    def evict(self, handle: int, deadline: float, *, owner_auth: bytes = b"") -> None: ...
    def keys(self, deadline: float) -> dict[str, Any]:
        """{"persistent": [...], "loaded": [...]}: the TPM's persistent handles and the
        keys the worker knows (ops/lifecycle.py)."""
    def lane_sign(self, key_id: bytes, auth: bytes, scheme: Scheme, hash: Hash,
                  digest: bytes, peer: int = -1) -> Any:
        """The TPM2_Sign for the lane, ready to send, or None: the worker thread serves it."""


class Request(Protocol):
    """One request on one connection, as the server hands it to an operation."""

    @property
    def worker(self) -> Worker: ...

    @property
    def deadline(self) -> float: ...

    @property
    def peer_uid(self) -> int:
        """The client's uid (SO_PEERCRED)."""

    def reply(self, result: Message) -> None:
        """Answer now, on the event loop."""

    def submit(self, run: Callable[[], Any], finish: Callable[[Any], Message],
               lane: Callable[[], Any] | None = None) -> None:
        """Queue `run` for the TPM (worker thread, fair queue, deadline); `finish` turns
        its result into the answer on the event loop. `lane`, if given, prepares the
        same TPM command for the event loop to send itself (tpmbroker.server)."""

    def key_auth(self, key_id: bytes) -> bytes:
        """The password this connection loaded `key_id` with; UnknownKeyError if none."""

    def check_key(self, key_id: bytes, public_key: bytes) -> None:
        """PermissionDeniedError unless the key policy lets this peer use the key."""

    def remember_key(self, key_id: bytes, auth: bytes) -> None: ...
    def forget_key(self, key_id: bytes) -> None: ...
    def broker_status(self, tpm: dict[str, object]) -> dict[str, object]: ...
    def count(self, what: str, n: int = 1) -> None:
        """Add to one of the broker's counters (status)."""

    @property
    def peer_is_admin(self) -> bool:
        """May this peer change persistent handles (PERSIST, EVICT)?"""

    def key_holders(self) -> dict[str, list[int]]:
        """Key id (hex) -> the uid of each connection that has it LOADed."""

    def audit(self, event: str, **fields: object) -> None:
        """A security event, with this peer's pid, uid and executable."""


def member(cls: Any, value: int, what: str) -> Any:
    """`cls(value)`, or UNSUPPORTED naming what was not understood."""
    try:
        return cls(value)
    except ValueError:
        raise UnsupportedError(f"unknown {what} {value}") from None


@dataclasses.dataclass(frozen=True)
class Operation:
    """One row of the opcode table."""

    request: type[Message]
    result: type[Message]
    serve: Callable[[Request, Any], None]
