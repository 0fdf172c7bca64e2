"""What an operation's procedure sees of the broker: one request, and the TPM worker.

Each module here is the broker's half of the wire operation of the same name in
tpmbroker.ops: `serve` checks the request on the event loop and says which TPM work
answers it; the functions beside it are that work, written against the worker's core
(tpmbroker.tpm.worker: an authorized command on a pool session, with the key's password
or a policy session, the key made resident, recovery).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..definitions import Opcode
from ..protocol import Message

if TYPE_CHECKING:
    from ..tpm.worker import TpmWorker

Serve = Callable[["Request", Any], None]
_S = TypeVar("_S", bound=Callable[..., None])

# The server's dispatch table: opcode -> the `serve` of its operation. Each module fills
# in its own row (@serves), so adding an operation edits no list.
SERVE: dict[Opcode, Serve] = {}


def serves(opcode: Opcode) -> Callable[[_S], _S]:
    """Make the decorated function the one that serves `opcode`'s requests."""
    def register(serve: _S) -> _S:
        if opcode in SERVE:
            raise TypeError(f"two procedures serve {opcode!r}")
        SERVE[opcode] = serve
        return serve
    return register


class Request(Protocol):
    """One request on one connection, as the server hands it to an operation."""

    @property
    def worker(self) -> TpmWorker: ...

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

    def key_auth(self, key_id: bytes, operations: tuple[str, ...] = ()) -> bytes:
        """The password this connection loaded `key_id` with; UnknownKeyError if none,
        PermissionDeniedError if the key policy refuses the key or one of `operations`
        (tpmbroker.access.OPERATIONS) to this peer."""

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
