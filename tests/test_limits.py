"""Bounded memory whatever clients load: per-connection and broker-wide key limits."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import Status, UnknownKeyError
from tpmbroker.ops.load import Load, LoadResult
from tpmbroker.ops.sign import Sign, SignResult
from tpmbroker.procedures.generate import generate_key
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign import sign as sign_digest
from tpmbroker.procedures.status import status as tpm_status
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm import TpmWorker

from .tpmfixtures import Broker


def _round_trip(sock: socket.socket, request_id: int, msg: p.Message,
                ) -> p.Message | p.ErrorResult:
    sock.sendall(p.encode_request(request_id, msg))
    reader = p.FrameReader()
    while True:
        data = sock.recv(65536)
        assert data
        for header, body in reader.feed(data):
            assert header.request_id == request_id
            return p.decode_response(header, body)


def test_a_connection_forgets_its_least_recently_used_keys(swtpm: Swtpm,
                                                           tmp_path: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "b",
                    extra_args=("--max-keys-per-connection", "2")).start()
    try:
        with Client(broker.socket) as client:
            keys = [client.generate_key(p.KeyType.EC, p.Curve.P256)[0] for _ in range(3)]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(broker.socket)
            ids = []
            for rid, der in enumerate(keys[:2], 1):
                result = _round_trip(sock, rid, Load(p.KeySource.TSS2_DER, der))
                assert isinstance(result, LoadResult)
                ids.append(result.key_id)

            def sign(rid: int, key_id: bytes) -> p.Message | p.ErrorResult:
                return _round_trip(sock, rid, Sign(key_id, p.Scheme.ECDSA,
                                                       p.Hash.SHA256, bytes(32)))

            assert isinstance(sign(10, ids[0]), SignResult)  # key 0 is now the fresher
            third = _round_trip(sock, 11, Load(p.KeySource.TSS2_DER, keys[2]))
            assert isinstance(third, LoadResult)
            forgotten = sign(12, ids[1])
            assert isinstance(forgotten, p.ErrorResult)
            assert forgotten.status == Status.UNKNOWN_KEY
            assert isinstance(sign(13, ids[0]), SignResult)
            assert isinstance(sign(14, third.key_id), SignResult)
        with Client(broker.socket) as client:  # the client library reloads by itself
            loaded = [client.load_key(der) for der in keys]
            for key in loaded + loaded:
                assert client.sign(key, bytes(32))
    finally:
        broker.stop()


def test_the_worker_forgets_its_oldest_keys_beyond_its_limit(swtpm: Swtpm) -> None:
    worker = TpmWorker(swtpm.tcti)
    worker.objects.max_keys = 2
    deadline = time.monotonic() + 60
    worker.open(deadline)
    try:
        ders = [generate_key(worker, p.KeyType.EC, p.Curve.P256, b"", 0, deadline)[0]
                for _ in range(3)]
        infos = [load_key(worker, p.KeySource.TSS2_DER, der, deadline) for der in ders]
        assert tpm_status(worker)["loaded_keys"] == 2
        with pytest.raises(UnknownKeyError):  # the oldest was forgotten
            sign_digest(worker, infos[0].key_id, b"", p.Scheme.ECDSA, p.Hash.SHA256, bytes(32),
                        deadline)
        for info in infos[1:]:
            assert sign_digest(worker, info.key_id, b"", p.Scheme.ECDSA, p.Hash.SHA256, bytes(32),
                               deadline)
        load_key(worker, p.KeySource.TSS2_DER, ders[0], deadline)  # loads again on demand
        assert sign_digest(worker, infos[0].key_id, b"", p.Scheme.ECDSA, p.Hash.SHA256, bytes(32),
                           deadline)
    finally:
        worker.close()
