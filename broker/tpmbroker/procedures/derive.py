"""DERIVE, the broker's half: ECDH with a key LOADed on this connection
(TPM2_ECDH_ZGen), the peer's point and the shared point encrypted on the TPM's bus."""

from __future__ import annotations

from ..definitions import Opcode
from ..errors import BadDigestError, TpmBrokerError, TpmError
from ..ops.derive import MAX_POINT, Derive, DeriveResult
from ..tpm import command
from ..tpm import keys as keymod
from ..tpm.keys import CachedKey
from ..tpm.worker import LaneCommand, TpmWorker
from .base import Request, serves


@serves(Opcode.DERIVE)
def serve(request: Request, msg: Derive) -> None:
    auth = request.key_auth(msg.key_id, ("derive",))
    point = msg.point
    if not (3 <= len(point) <= MAX_POINT and len(point) % 2 == 1 and point[0] == 0x04):
        raise BadDigestError("the peer's public key must be an uncompressed EC point "
                             f"(0x04, x, y), not {len(point)} bytes starting "
                             f"{point[:1].hex() or 'with nothing'}")
    key_id, worker, deadline, peer = msg.key_id, request.worker, request.deadline, \
        request.peer_uid
    # Password attempts the dictionary-attack shield refuses are answered now, unqueued.
    known = worker.check_password(key_id, auth, peer)

    def served(secret: bytes) -> DeriveResult:
        request.count("derivations")
        return DeriveResult(secret)

    request.submit(lambda: derive(worker, key_id, auth, point, deadline, peer), served,
                   lane=lambda: lane(worker, key_id, auth, point, peer, known))


def derive(tpm: TpmWorker, key_id: bytes, auth: bytes, point: bytes, deadline: float,
           peer: int = -1) -> bytes:
    """ECDH: Z, the x-coordinate of the key's private scalar times the peer's public
    `point` (uncompressed SEC1), as long as the curve's field (TPM2_ECDH_ZGen).

    The key and the point are checked first, without the TPM: a key that may not do
    ECDH or a point that is not on the key's curve costs no TPM command.
    """
    entry = tpm.loaded(key_id)
    keymod.check_ecdh_key(entry.public)
    x, y = keymod.check_peer_point(entry.info.curve, point)
    z = tpm.with_password(entry, auth, peer, deadline, lambda: tpm.run(
        deadline, "deriving the shared secret", lambda: tpm.authorized(
            entry, auth, deadline, lambda session, handle, name: command.prepare_ecdh_zgen(
                session, handle, name, auth, x, y), command.ecdh_zgen_result)))
    tpm.objects.keys.touch(key_id)
    return _field_long(z, len(x))


def lane(tpm: TpmWorker, key_id: bytes, auth: bytes, point: bytes,
         peer: int = -1, password_known: CachedKey | None = None) -> LaneCommand | None:
    """The TPM2_ECDH_ZGen for the lane, or None: the worker thread serves it (and says
    what is wrong with the key or the point, if anything)."""
    entry = tpm.known(key_id)
    if entry is None or not entry.does_ecdh:
        return None
    try:
        x, y = keymod.check_peer_point(entry.info.curve, point)
    except TpmBrokerError:
        return None
    return tpm.lane_command(
        entry, auth, peer, "deriving the shared secret", lambda session, handle, name:
        command.prepare_ecdh_zgen(session, handle, name, auth, x, y),
        lambda parameters: _field_long(command.ecdh_zgen_result(parameters), len(x)),
        password_known)


def _field_long(z: bytes, field: int) -> bytes:
    """Z as long as the curve's field (the TPM may drop leading zero bytes)."""
    if len(z) > field:
        raise TpmError(f"the TPM returned a {len(z)}-byte x-coordinate for a "
                       f"{field}-byte curve")
    return z.rjust(field, b"\0")
