"""A slow TPM for tests: a relay in front of swtpm that holds each answer until a fixed
time per command has passed, one command at a time across all its connections, as a
chip does. swtpm signs in about 0.5 ms; a discrete TPM takes tens of milliseconds.

Only what the tests need: the command port's framing as the broker and tss2's swtpm TCTI
send it (TPM_SEND_COMMAND frames, or bare TPM commands), the control port passed through.
(The benchmark's chip model, with a table of per-command times, lives in benchmarks/.)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from .relay import Relay

TPM_SEND_COMMAND = 8
TPM_CC_SIGN = 0x15D
_SEND_HEADER = struct.Struct(">IBI")  # TPM_SEND_COMMAND, locality, length
_TPM_HEADER = struct.Struct(">HII")  # tag, size, command code


class SlowTpm(Relay):
    """`delays`: seconds per TPM command code; `default` for every other command."""

    def __init__(self, port: int, delays: dict[int, float], default: float = 0.0) -> None:
        self.delays = delays
        self.default = default
        self.commands = 0
        self.busy_seconds = 0.0  # time the chip spent on commands ("TPM busy")
        self._chip = threading.Lock()  # the chip does one command at a time
        super().__init__(port)

    def _accept(self, listener: socket.socket, target: int) -> None:
        if target != self.target:  # the control port: as it is
            super()._accept(listener, target)
            return
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError, ConnectionError), client, upstream:
            while True:
                head = _read(client, 4)
                (first,) = struct.unpack(">I", head)
                if first == TPM_SEND_COMMAND:  # swtpm's framing: answered with a length
                    rest = _read(client, _SEND_HEADER.size - 4)
                    length = struct.unpack(">I", rest[1:])[0]
                    command = _read(client, length)
                    request = head + rest + command
                    framed = True
                else:  # a bare TPM command
                    rest = _read(client, 6)
                    _, size, _ = _TPM_HEADER.unpack(head + rest)
                    command = head + rest + _read(client, size - 10)
                    request = command
                    framed = False
                code = _TPM_HEADER.unpack_from(command)[2] if len(command) >= 10 else 0
                with self._chip:
                    started = time.monotonic()
                    upstream.sendall(request)
                    if framed:
                        (size,) = struct.unpack(">I", _read(upstream, 4))
                        answer = struct.pack(">I", size) + _read(upstream, size + 4)
                    else:
                        head = _read(upstream, 6)
                        size = struct.unpack(">I", head[2:])[0]
                        answer = head + _read(upstream, size - 6)
                    self.commands += 1
                    hold = started + self.delays.get(code, self.default) - time.monotonic()
                    if hold > 0:
                        time.sleep(hold)
                    self.busy_seconds += time.monotonic() - started
                    client.sendall(answer)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
