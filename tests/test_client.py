"""Client error paths that need a peer misbehaving on purpose (a fake broker socket)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import PermissionDeniedError, Status


def refusing_broker(path: str, count: int) -> threading.Thread:
    """Accepts `count` connections; answers each with a connection-level PERMISSION_DENIED
    and closes it at once, before reading anything (as the broker does)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    frame = p.encode_response(0, p.CONNECTION_ERROR, p.ErrorResult(
        Status.PERMISSION_DENIED, "uid 33 is not allowed to use this broker"))

    def serve() -> None:
        with server:
            for _ in range(count):
                conn, _ = server.accept()
                conn.sendall(frame)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_refused_client_hears_why(tmp_path: Path) -> None:
    path = str(tmp_path / "refusing.sock")
    thread = refusing_broker(path, 10)
    with Client(path, timeout=5) as client:
        for _ in range(10):  # whether our request went out before the close or not
            with pytest.raises(PermissionDeniedError, match="not allowed"):
                client.hello()
    thread.join(timeout=5)
