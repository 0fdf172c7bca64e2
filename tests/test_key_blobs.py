"""Malformed key blobs get BAD_KEY (or UNSUPPORTED), never INTERNAL: a real broker on swtpm,
LOAD frames sent raw so that the client's own checks do not hide the broker's."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import Status
from tpmbroker.ops.load import Load

from .tpmfixtures import Broker

# What LOAD of a TSS2 blob may answer (docs/protocol.md): the key, or why not.
LOAD_STATUSES = {Status.OK, Status.BAD_KEY, Status.UNSUPPORTED}
EMPTY_AUTH_TRUE = b"\xa0\x03\x01\x01\xff"


class RawConnection:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.next_id = 1

    def load(self, blob: bytes) -> int:
        """LOAD `blob` as a TSS2 DER key; the answer's status."""
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(p.encode_request(request_id, Load(p.KeySource.TSS2_DER, blob)))
        header, body = read_frame(self.sock)
        assert header.request_id == request_id
        answer = p.decode_response(header, body)
        return int(answer.status) if isinstance(answer, p.ErrorResult) else 0

    def close(self) -> None:
        self.sock.close()


def read_frame(sock: socket.socket) -> tuple[p.Header, bytes]:
    """Exactly one frame: answers that arrive together stay in the socket for the next."""
    data = _read_exactly(sock, 4)
    data += _read_exactly(sock, struct.unpack(">I", data)[0])
    return p.decode_header(data), data[p.HEADER_SIZE:]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


@pytest.fixture
def key_der(broker: Broker) -> bytes:
    with Client(broker.socket) as client:
        der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256)
    return der


@pytest.fixture
def raw(broker: Broker) -> Iterator[RawConnection]:
    conn = RawConnection(broker.socket)
    yield conn
    conn.close()


def no_internal_errors(broker: Broker) -> None:
    with Client(broker.socket) as client:
        by_status = client.status()["errors_by_status"]
    assert isinstance(by_status, dict)
    assert "INTERNAL" not in by_status, by_status
    assert "internal error" not in broker.log()


def test_the_untouched_key_loads(raw: RawConnection, key_der: bytes) -> None:
    assert raw.load(key_der) == Status.OK  # so that the refusals below can be told apart


def test_tpm2_openssl_style_true_loads(raw: RawConnection, key_der: bytes) -> None:
    """tpm2-openssl writes emptyAuth TRUE as 0x01: the one BER form the broker accepts."""
    assert EMPTY_AUTH_TRUE in key_der
    assert raw.load(key_der.replace(EMPTY_AUTH_TRUE, b"\xa0\x03\x01\x01\x01", 1)) == Status.OK


def canonical(blob: bytes) -> bytes:
    return blob.replace(b"\xa0\x03\x01\x01\x01", EMPTY_AUTH_TRUE, 1)


def test_corrupted_public_type_is_bad_key(broker: Broker, raw: RawConnection,
                                          key_der: bytes) -> None:
    """The report's case: an unknown algorithm in TPM2B_PUBLIC made tpm2-pytss raise
    ValueError, which came back as INTERNAL."""
    public_at = key_der.index(b"\x04", 20) + 2  # OCTET STRING public: tag, length 0x58
    assert key_der[public_at + 2:public_at + 4] == b"\x00\x23"  # TPM2_ALG_ECC
    for bad_type in (b"\x00\xcc", b"\x53\x23", b"\xff\xff"):
        blob = key_der[:public_at + 2] + bad_type + key_der[public_at + 4:]
        assert raw.load(blob) in (Status.BAD_KEY, Status.UNSUPPORTED)
    no_internal_errors(broker)


@pytest.mark.parametrize("name,mutate", [
    # BER, not DER: TRUE is 0xff (0x01 is tolerated there, tpm2-openssl writes it)
    ("ber boolean", lambda d: d.replace(b"\xa0\x03\x01\x01\xff", b"\xa0\x03\x01\x01\x7f", 1)),
    # BER long-form length inside: [0] with 81 03
    ("ber inner length", lambda d: b"\x30\x81\xf1" + d[3:].replace(
        b"\xa0\x03\x01\x01\xff", b"\xa0\x81\x03\x01\x01\xff", 1)),
    # BER long-form length where the short or shorter form fits
    ("ber length", lambda d: b"\x30\x82\x00" + d[2:]),
    ("trailing byte", lambda d: d + b"\x00"),
    ("truncated", lambda d: d[:-1]),
    # a context tag the format does not have
    ("unknown tag", lambda d: d.replace(b"\xa0\x03", b"\xa8\x03", 1)),
    # TPM2B size of the public blob shorter than its OCTET STRING
    ("short tpm2b", lambda d: d.replace(b"\x04\x58\x00\x56", b"\x04\x58\x00\x55", 1)),
])
def test_key_files_are_strict_der(raw: RawConnection, key_der: bytes, name: str,
                                  mutate: object) -> None:
    assert callable(mutate)
    blob = mutate(key_der)
    assert blob != key_der, name
    assert raw.load(blob) == Status.BAD_KEY, name


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.integers(min_value=0), min_size=1, max_size=6))
def test_bit_flipped_blobs_get_documented_statuses(raw: RawConnection, key_der: bytes,
                                                   flips: list[int]) -> None:
    blob = bytearray(key_der)
    for flip in flips:
        bit = flip % (len(blob) * 8)
        blob[bit // 8] ^= 1 << (bit % 8)
    status = raw.load(bytes(blob))
    assert status in LOAD_STATUSES
    if canonical(bytes(blob)) != key_der:
        # Every byte is covered by DER, the TPM2B sizes or the TPM's integrity check.
        assert status != Status.OK


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0), tail=st.binary(max_size=64))
def test_cut_and_padded_blobs_get_documented_statuses(raw: RawConnection, key_der: bytes,
                                                      cut: int, tail: bytes) -> None:
    blob = key_der[:cut % len(key_der)] + tail
    assert raw.load(blob) in LOAD_STATUSES - {Status.OK}


def test_no_internal_error_after_fuzzing(broker: Broker, raw: RawConnection,
                                         key_der: bytes) -> None:
    for i in range(len(key_der) * 8):
        blob = bytearray(key_der)
        blob[i // 8] ^= 1 << (i % 8)
        if canonical(bytes(blob)) != key_der:
            assert raw.load(bytes(blob)) in LOAD_STATUSES - {Status.OK}, i
    no_internal_errors(broker)
