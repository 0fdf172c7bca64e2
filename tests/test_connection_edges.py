"""Connection edges against the real broker on swtpm: slowloris, a lone length prefix,
half-closed connections, descriptor exhaustion. Each gets its documented answer and the
log stays small."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import Status
from tpmbroker.ops.hello import Hello
from tpmbroker.ops.random import Random
from tpmbroker.simulator import Swtpm

from .test_key_blobs import read_frame
from .tpmfixtures import Broker

FRAME_TIMEOUT = 1.0


@pytest.fixture
def edge_broker(swtpm: Swtpm, tmp_path: Path) -> Iterator[Broker]:
    with Broker(swtpm.tcti, tmp_path / "broker",
                extra_args=("--frame-timeout", str(FRAME_TIMEOUT))) as b:
        yield b


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def connection_error(sock: socket.socket) -> tuple[float, p.ErrorResult]:
    """Wait for the broker's connection-error frame and the close after it."""
    start = time.monotonic()
    header, body = read_frame(sock)
    answer = p.decode_response(header, body)
    assert header.opcode == p.CONNECTION_ERROR | p.RESPONSE_BIT and header.request_id == 0
    assert isinstance(answer, p.ErrorResult)
    # Then closed: a reset rather than a FIN when bytes of ours were still unread there.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return time.monotonic() - start, answer


def still_serves(broker: Broker) -> None:
    with Client(broker.socket, timeout=5) as client:
        assert client.random(8)


def test_slowloris_is_closed_with_a_reason(edge_broker: Broker) -> None:
    frame = p.encode_request(1, Hello(p.VERSION, "slow"))
    sock = connect(edge_broker.socket)
    sent = 0
    start = time.monotonic()
    try:
        # A byte every 0.2 s: never a whole frame, always some traffic.
        while sent < len(frame) - 1 and time.monotonic() - start < 3 * FRAME_TIMEOUT:
            sock.send(frame[sent:sent + 1])
            sent += 1
            time.sleep(0.2)
    except BrokenPipeError:
        pass
    _, answer = connection_error(sock)
    assert time.monotonic() - start < FRAME_TIMEOUT + 2
    assert answer.status == Status.DEADLINE and "incomplete frame" in answer.message
    still_serves(edge_broker)
    assert "incomplete frame" in edge_broker.log()


def test_lone_length_prefix_is_closed(edge_broker: Broker) -> None:
    sock = connect(edge_broker.socket)
    sock.sendall(struct.pack(">I", 20))
    waited, answer = connection_error(sock)
    assert FRAME_TIMEOUT * 0.8 < waited < FRAME_TIMEOUT + 2
    assert answer.status == Status.DEADLINE and "4 bytes" in answer.message


def test_whole_frames_slowly_are_not_slowloris(edge_broker: Broker) -> None:
    """The clock times one incomplete frame, not the connection: an idle client between
    whole frames, or frames that each arrive in time, are served."""
    sock = connect(edge_broker.socket)
    for request_id in range(1, 3):
        frame = p.encode_request(request_id, Hello(p.VERSION, "patient"))
        sock.sendall(frame[:10])
        time.sleep(FRAME_TIMEOUT * 0.6)
        sock.sendall(frame[10:])
        header, _ = read_frame(sock)
        assert header.request_id == request_id
        time.sleep(FRAME_TIMEOUT * 1.2)  # idle, nothing pending


def test_half_closed_connections_get_their_answers(edge_broker: Broker) -> None:
    sock = connect(edge_broker.socket)
    count = 40
    frames = b"".join(p.encode_request(i, Random(16)) for i in range(1, count + 1))
    frames += p.encode_request(count + 1, Hello(p.VERSION, "half"))
    sock.sendall(frames)
    sock.shutdown(socket.SHUT_WR)
    answered = set()
    for _ in range(count + 1):
        header, body = read_frame(sock)
        answer = p.decode_response(header, body)
        assert not isinstance(answer, p.ErrorResult), answer
        answered.add(header.request_id)
    assert answered == set(range(1, count + 2))
    assert sock.recv(1) == b""  # closed once everything is answered


def test_half_close_inside_a_frame_says_so(edge_broker: Broker) -> None:
    sock = connect(edge_broker.socket)
    sock.sendall(p.encode_request(1, Hello(p.VERSION, "x"))[:7])
    sock.shutdown(socket.SHUT_WR)
    _, answer = connection_error(sock)
    assert answer.status == Status.MALFORMED and "half-closed" in answer.message


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_descriptor_exhaustion_pauses_accepting_and_logs_one_line(edge_broker: Broker) -> None:
    """At `ulimit -n 256`, 400 idle clients: the rest wait in the backlog, the log gets a
    line, not a traceback per failed accept (main wrote 18 MB in 6 s), and once clients go
    away the waiting ones are served."""
    assert edge_broker.proc is not None
    subprocess.run(["prlimit", f"--pid={edge_broker.proc.pid}", "--nofile=256:256"],
                   check=True)
    size_before = edge_broker.log_path.stat().st_size
    socks = [connect(edge_broker.socket) for _ in range(400)]
    try:
        time.sleep(3)
        log = edge_broker.log_path.read_text(errors="replace")
        grown = edge_broker.log_path.stat().st_size - size_before
        assert "Traceback" not in log
        assert log.count("accept paused") == 1
        # one 'conn N' line per admitted client, and the pause: nothing per failure
        assert grown < 256 * 120 + 1000, grown
        waiting = socks[-1]  # in the backlog: connected, not yet accepted
        waiting.sendall(p.encode_request(7, Hello(p.VERSION, "waiting")))
        for sock in socks[:200]:
            sock.close()
        header, _ = read_frame(waiting)
        assert header.request_id == 7
        still_serves(edge_broker)
    finally:
        for sock in socks:
            sock.close()
