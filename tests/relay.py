"""A recording TCP relay in front of swtpm, for tests that prove what crosses the TPM bus.

swtpm listens on a command port and the control port right after it; the relay listens on
two consecutive ports too, so a TCTI string pointing at it works like one pointing at
swtpm. Everything the TPM answers is kept in `from_tpm`, everything sent to it in
`to_tpm`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from tpmbroker.simulator import free_port_pair


class Relay:
    """TCP relays in front of swtpm's command and control ports; records both directions."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.from_tpm = bytearray()
        self.to_tpm = bytearray()
        self._lock = threading.Lock()
        self._listeners = self._listen_pair()
        self.port = self._listeners[0].getsockname()[1]
        for listener, target in zip(self._listeners, (port, port + 1), strict=True):
            threading.Thread(target=self._accept, args=(listener, target), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @staticmethod
    def _listen_pair() -> list[socket.socket]:
        for _ in range(20):
            port = free_port_pair()
            pair = [socket.socket(), socket.socket()]
            try:
                for offset, s in enumerate(pair):
                    s.bind(("127.0.0.1", port + offset))
                    s.listen(8)
            except OSError:
                for s in pair:
                    s.close()
                continue
            return pair
        raise RuntimeError("no two consecutive free ports")

    def _accept(self, listener: socket.socket, target: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target))
                threading.Thread(target=self._pump, args=(client, upstream, self.to_tpm),
                                 daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, self.from_tpm),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    record += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def seen(self, data: bytes, window: int = 8) -> bool:
        """Whether any `window` consecutive bytes of `data` crossed from the TPM."""
        return self._found(self.from_tpm, data, window)

    def sent(self, data: bytes, window: int = 8) -> bool:
        """Whether any `window` consecutive bytes of `data` crossed to the TPM."""
        return self._found(self.to_tpm, data, window)

    def _found(self, record: bytearray, data: bytes, window: int) -> bool:
        window = min(window, len(data))
        with self._lock:
            recorded = bytes(record)
        return any(data[i:i + window] in recorded for i in range(len(data) - window + 1))

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()


Tamper = Callable[[bytes, bytes], bytes]


class TamperingRelay(Relay):
    """A Relay that reads the command port's traffic command by command and lets a test
    change each response on its way back: an active interposer on the TPM's bus.

    `tamper(command, response)` returns the response the broker gets (the TPM command
    and response without swtpm's framing); by default the TPM's own. What the TPM sent
    is recorded in `from_tpm` as before, and every change in `tampered`."""

    def __init__(self, port: int) -> None:
        self.tamper: Tamper = lambda command, response: response
        self.tampered: list[tuple[int, bytes, bytes]] = []  # (command code, before, after)
        self.commands: list[int] = []  # the command codes sent to the TPM, in order
        super().__init__(port)

    def _accept(self, listener: socket.socket, target: int) -> None:
        if target != self.target:
            super()._accept(listener, target)  # the control port: as it is
            return
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target))
                threading.Thread(target=self._commands, args=(client, upstream),
                                 daemon=True).start()

    def _commands(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError), client, upstream:
            while True:
                header = _read(client, 9)  # TPM_SEND_COMMAND, locality, length
                _, _, length = _SEND.unpack(header)
                command = _read(client, length)
                with self._lock:
                    self.to_tpm += header + command
                    self.commands.append(_U32.unpack_from(command, 6)[0])
                upstream.sendall(header + command)
                size = _read(upstream, 4)
                response = _read(upstream, _U32.unpack(size)[0])
                trailer = _read(upstream, 4)
                with self._lock:
                    self.from_tpm += size + response + trailer
                changed = self.tamper(command, response)
                if changed != response:
                    self.tampered.append((_U32.unpack_from(command, 6)[0], response, changed))
                client.sendall(_U32.pack(len(changed)) + changed + trailer)


_SEND = struct.Struct(">IBI")
_U32 = struct.Struct(">I")


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
