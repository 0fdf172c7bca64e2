"""The wire codec against the golden frames that the C client is tested with too."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpmbroker import protocol as p
from tpmbroker.errors import (
    FrameTooLargeError,
    ProtocolError,
    Status,
    UnknownOpcodeError,
    UnsupportedVersionError,
)
from tpmbroker.ops.certify import Certify, CertifyResult
from tpmbroker.ops.decrypt import Decrypt, DecryptResult
from tpmbroker.ops.derive import Derive, DeriveResult
from tpmbroker.ops.generate import Generate, GenerateResult
from tpmbroker.ops.hello import Hello, HelloResult
from tpmbroker.ops.import_key import Import, ImportResult
from tpmbroker.ops.load import Load, LoadResult
from tpmbroker.ops.nv_read import NvRead, NvReadResult
from tpmbroker.ops.pcr_read import PcrRead, PcrReadResult
from tpmbroker.ops.persistence import (
    Evict,
    EvictResult,
    KeysRequest,
    KeysResult,
    Persist,
    PersistResult,
)
from tpmbroker.ops.random import Random, RandomResult
from tpmbroker.ops.sign import Sign, SignResult
from tpmbroker.ops.sign_message import SignMessage, SignMessageResult
from tpmbroker.ops.status import StatusRequest, StatusResult
from tpmbroker.ops.unload import Unload, UnloadResult

GOLDEN = {
    name: bytes.fromhex(hexdata)
    for name, hexdata in (
        line.split() for line in (Path(__file__).parent / "golden" / "frames.txt")
        .read_text().splitlines() if line and not line.startswith("#")
    )
}
KID = bytes(range(32))

EXPECTED: dict[str, tuple[int, p.Message | p.ErrorResult, int]] = {
    "hello_request": (1, Hello(1, "tpmbroker-provider/0.1.0"), 5000),
    "load_request": (2, Load(p.KeySource.TSS2_DER, bytes.fromhex("3003020101"), b"pw"), 30000),
    "load_handle_request": (3, Load(p.KeySource.PERSISTENT_HANDLE, b"\x81\x00\x00\x01"), 0),
    "sign_request": (4, Sign(KID, p.Scheme.ECDSA, p.Hash.SHA256, bytes(32)), 1000),
    "sign_pss_request": (0xFFFFFFFE, Sign(KID, p.Scheme.PSS, p.Hash.SHA384, b"\xaa" * 48), 0),
    "generate_request": (6, Generate(p.KeyType.RSA, 2048, b"", 0x40000001), 60000),
    "generate_rsa_pss_request": (6, Generate(p.KeyType.RSA_PSS, 3072, b"", 0x40000001,
                                                 p.Usage.SIGN, p.Hash.SHA384), 60000),
    "status_request": (7, StatusRequest(), 0),
    "unload_request": (8, Unload(KID), 0),
    "hello_response": (1, HelloResult(1, "tpmbroker/0.1.0", 65536), 0),
    "load_response": (2, LoadResult(KID, p.KeyType.EC, 256, p.Curve.P256,
                                      bytes.fromhex("3059")), 0),
    "sign_response": (4, SignResult(bytes.fromhex("3006020101020102")), 0),
    "error_unknown_key": (4, p.ErrorResult(Status.UNKNOWN_KEY,
                                           "key not loaded on this connection"), 0),
    "error_tpm": (5, p.ErrorResult(Status.AUTH_FAILED, "wrong password", 0x98E), 0),
    "generate_response": (6, GenerateResult(b"\x30\x00", b"\x30\x01"), 0),
    "status_response": (7, StatusResult('{"pool_size":2}'), 0),
    "unload_response": (8, UnloadResult(), 0),
    "random_request": (9, Random(48), 2000),
    "random_max_request": (10, Random(p.MAX_RANDOM), 0),
    "random_response": (9, RandomResult(bytes(range(48))), 0),
    "random_empty_response": (10, RandomResult(b""), 0),
    "nv_read_request": (12, NvRead(0x01000010), 5000),
    "nv_read_response": (12, NvReadResult(bytes.fromhex("3082000130")), 0),
    "load_parent_auth_request": (13, Load(p.KeySource.TSS2_DER, bytes.fromhex("3003020101"),
                                              b"", b"parentpass"), 0),
    "generate_parent_auth_request": (14, Generate(p.KeyType.EC, p.Curve.P256, b"pw",
                                                      0x81000002,
                                                      parent_auth=b"parentpass"), 0),
    # A PCR lock on PCR 16 (sha256) at its current value: the tail carries parent_auth
    # even when empty, then the policy (tpmbroker.keypolicy). Python clients alone send
    # it (the provider makes no policy keys), so it is not named *_request, the frames the
    # C encoder must write too.
    "generate_policy_frame": (15, Generate(
        p.KeyType.EC, p.Curve.P256, b"", 0x40000001, policy=bytes.fromhex(
            "301830163014a0040202017fa10c040a00000001000b03000001")), 0),
    "decrypt_request": (13, Decrypt(KID, p.Padding.PKCS1, p.DecryptFlag.IMPLICIT_REJECTION,
                                        0, 0, b"", bytes(range(16))), 3000),
    "decrypt_oaep_request": (14, Decrypt(KID, p.Padding.OAEP, 0, p.Hash.SHA256, p.Hash.SHA1,
                                             b"label", b"\xee" * 8), 0),
    "decrypt_response": (13, DecryptResult(b"secret"), 0),
    "error_random_too_many": (11, p.ErrorResult(Status.UNSUPPORTED,
                                                "at most 1024 random bytes per request"), 0),
    "sign_message_request": (13, SignMessage(KID, p.Scheme.ECDSA, p.Hash.SHA256,
                                                 b"hello, world"), 3000),
    "sign_message_empty_request": (14, SignMessage(KID, p.Scheme.PSS, p.Hash.SHA384,
                                                       b""), 0),
    "sign_message_response": (13, SignMessageResult(bytes.fromhex("3006020101020102")),
                              0),
    "error_sign_message_too_long": (15, p.ErrorResult(
        Status.UNSUPPORTED, "message of 65281 bytes: SIGN_MESSAGE carries at most 65280 "
        "(MAX_MESSAGE)"), 0),
    "derive_request": (13, Derive(KID, b"\x04" + bytes(range(0x40, 0x80))), 3000),
    "derive_response": (13, DeriveResult(bytes(range(0x80, 0xA0))), 0),
    "import_request": (16, Import(0x40000001, bytes.fromhex("3003020101"),
                                      b"parentpass"), 60000),
    "import_parent_public_request": (17, Import(0), 5000),
    "import_response": (16, ImportResult(bytes.fromhex("0004aabbccdd"),
                                             bytes.fromhex("3003020102")), 0),
    "import_parent_public_response": (17, ImportResult(bytes.fromhex("0004aabbccdd")), 0),
    "persist_request": (15, Persist(KID, 0x81000010), 30000),
    "persist_owner_auth_request": (16, Persist(KID, 0x81000010, b"ownerpass"), 0),
    "persist_response": (15, PersistResult(0x81000010, bytes.fromhex("000b")
                                               + bytes(range(0x40, 0x60))), 0),
    "error_persist_in_use": (15, p.ErrorResult(
        Status.BAD_KEY, "0x81000010 is in use by another persistent object"), 0),
    "evict_request": (17, Evict(0x81000010), 30000),
    "evict_response": (17, EvictResult(), 0),
    "keys_request": (18, KeysRequest(), 0),
    "keys_response": (18, KeysResult('{"loaded":[],"persistent":[]}'), 0),
    # sha256 PCR 16. The provider reads no PCRs, so not *_request (the C encoder's).
    "pcr_read_frame": (19, PcrRead(bytes.fromhex("00000001000b03000001")), 5000),
    "pcr_read_response": (19, PcrReadResult(bytes.fromhex("00000001000b03000001"),
                                                 bytes(32)), 0),
    # The provider asks for no attestation statements, so not *_request.
    "certify_frame": (20, Certify(bytes(range(32)), b"challenge"), 5000),
    "certify_response": (20, CertifyResult(b'{"fmt": "tpm"}'), 0),
}
OPCODE_OF_RESPONSE = {"error_unknown_key": p.Opcode.SIGN, "error_tpm": p.Opcode.SIGN,
                      "error_connection": p.CONNECTION_ERROR,
                      "error_random_too_many": p.Opcode.RANDOM,
                      "error_sign_message_too_long": p.Opcode.SIGN_MESSAGE,
                      "error_persist_in_use": p.Opcode.PERSIST}
# Every other status, answering STATUS (request id 100 + status).
for _status in Status:
    if _status in (Status.OK, Status.UNKNOWN_KEY, Status.AUTH_FAILED):
        continue  # OK is in every result; the other two have frames of their own above
    _name = f"error_{_status.name.lower()}"
    EXPECTED[_name] = (100 + _status, p.ErrorResult(
        _status, _status.name.lower().replace("_", " "),
        0x100 + _status if _status is Status.TPM_ERROR else 0), 0)
    OPCODE_OF_RESPONSE[_name] = p.Opcode.STATUS
EXPECTED["error_connection"] = (0, p.ErrorResult(
    Status.PERMISSION_DENIED, "uid 1000 is not allowed to use this broker"), 0)


def test_golden_frames_cover_every_opcode_and_status() -> None:
    opcodes = {p.decode_header(frame).opcode & ~p.RESPONSE_BIT for frame in GOLDEN.values()}
    assert set(p.Opcode) <= opcodes
    statuses = {Status.OK} | {msg.status for _, msg, _ in EXPECTED.values()
                              if isinstance(msg, p.ErrorResult)}
    assert statuses == set(Status)


def test_every_golden_frame_is_covered() -> None:
    assert set(GOLDEN) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_frames_encode_and_decode(name: str) -> None:
    request_id, msg, timeout_ms = EXPECTED[name]
    frame = GOLDEN[name]
    header = p.decode_header(frame)
    body = frame[p.HEADER_SIZE:]
    assert header.request_id == request_id
    assert header.timeout_ms == timeout_ms
    if header.is_response:
        opcode = (OPCODE_OF_RESPONSE[name] if isinstance(msg, p.ErrorResult)
                  else msg.OPCODE)
        assert p.encode_response(request_id, opcode, msg) == frame
        assert p.decode_response(header, body) == msg
    else:
        assert isinstance(msg, p.Message)
        assert p.encode_request(request_id, msg, timeout_ms) == frame
        assert p.decode_request(header, body) == msg


def test_frame_reader_splits_a_stream_fed_byte_by_byte() -> None:
    stream = GOLDEN["sign_request"] + GOLDEN["status_request"] + GOLDEN["hello_request"]
    reader = p.FrameReader()
    frames = [f for i in range(len(stream)) for f in reader.feed(stream[i:i + 1])]
    assert [h.opcode for h, _ in frames] == [p.Opcode.SIGN, p.Opcode.STATUS, p.Opcode.HELLO]
    assert reader.pending == 0


def test_length_out_of_range_breaks_framing() -> None:
    with pytest.raises(FrameTooLargeError):
        p.FrameReader().feed(struct.pack(">I", p.MAX_FRAME) + bytes(12))
    with pytest.raises(ProtocolError):
        p.FrameReader().feed(struct.pack(">I", 3) + bytes(12))


def test_bad_version_flags_and_opcode_are_answerable_errors() -> None:
    frame = bytearray(GOLDEN["status_request"])
    frame[4] = 2
    with pytest.raises(UnsupportedVersionError):
        p.decode_request(p.decode_header(frame), b"")
    frame = bytearray(GOLDEN["status_request"])
    frame[7] = 1
    with pytest.raises(ProtocolError):
        p.decode_request(p.decode_header(frame), b"")
    frame = bytearray(GOLDEN["status_request"])
    frame[5] = 0x7E
    with pytest.raises(UnknownOpcodeError):
        p.decode_request(p.decode_header(frame), b"")


def test_truncated_and_trailing_bodies_are_malformed() -> None:
    frame = GOLDEN["sign_request"]
    header = p.decode_header(frame)
    with pytest.raises(ProtocolError, match="truncated"):
        p.decode_request(header, frame[p.HEADER_SIZE:-1])
    with pytest.raises(ProtocolError, match="trailing"):
        p.decode_request(header, frame[p.HEADER_SIZE:] + b"\x00")


def test_oversized_field_and_frame_are_refused_when_encoding() -> None:
    with pytest.raises(ProtocolError):
        p.encode_request(1, Sign(KID, 1, 0x0B, bytes(70000)))
    with pytest.raises(FrameTooLargeError):
        p.encode_request(1, Load(1, bytes(40000), bytes(40000)))


def test_random_bytes_never_appear_in_reprs() -> None:
    assert "abcdef" not in repr(RandomResult(bytes.fromhex("abcdef")))


def test_shared_secrets_never_appear_in_reprs() -> None:
    assert "abcdef" not in repr(DeriveResult(bytes.fromhex("abcdef")))


def test_plaintexts_never_appear_in_reprs() -> None:
    assert "secret" not in repr(DecryptResult(b"secret"))


def test_passwords_never_appear_in_reprs() -> None:
    assert "secret" not in repr(Persist(KID, 0x81000010, b"secret"))
    assert "secret" not in repr(Evict(0x81000010, b"secret"))
    assert "secret" not in repr(Load(1, b"k", b"secret"))
    assert "secret" not in repr(Generate(1, 3, b"secret"))
    assert "secret" not in repr(Load(1, b"k", b"", b"secret"))
    assert "secret" not in repr(Generate(1, 3, b"", 0x81000002, parent_auth=b"secret"))


def test_a_parent_password_is_a_trailing_field_absent_when_empty() -> None:
    # Frames without it keep their bytes (and brokers before it read them); with it, the
    # field follows the last one, and an explicitly empty one reads as absent.
    plain = p.encode_request(1, Load(1, b"k", b"pw"))
    with_parent = p.encode_request(1, Load(1, b"k", b"pw", b"pp"))
    assert with_parent == plain[:3] + bytes([plain[3] + 4]) + plain[4:] + b"\x00\x02pp"
    header = p.decode_header(plain)
    assert p.decode_request(header, plain[p.HEADER_SIZE:] + b"\x00\x00") == Load(
        1, b"k", b"pw")
    with pytest.raises(ProtocolError):
        p.decode_request(header, plain[p.HEADER_SIZE:] + b"\x00\x03pp")


def test_hash_names_as_openssl_spells_them() -> None:
    assert p.Hash.from_name("SHA2-256") is p.Hash.SHA256
    assert p.Hash.from_name("sha384") is p.Hash.SHA384
    assert p.Hash.from_name("SHA-512") is p.Hash.SHA512
    with pytest.raises(ValueError):
        p.Hash.from_name("md5")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bodies_never_crash_the_decoder(body: bytes) -> None:
    for opcode in [*list(p.Opcode), 0, 127, 255]:
        header = p.Header(p.VERSION, opcode, 0, 1, 0)
        with contextlib.suppress(ProtocolError):
            p.decode_request(header, body)
        resp = p.Header(p.VERSION, opcode | p.RESPONSE_BIT, 0, 1, 0)
        with contextlib.suppress(ProtocolError):
            p.decode_response(resp, body)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.sampled_from(list(p.Scheme)),
       st.sampled_from(list(p.Hash)), st.binary(max_size=64), st.integers(0, 2**32 - 1))
def test_sign_round_trips(kid: bytes, scheme: p.Scheme, hash_alg: p.Hash, digest: bytes,
                          request_id: int) -> None:
    msg = Sign(kid, scheme, hash_alg, digest)
    frame = p.encode_request(request_id, msg, 7)
    ((header, body),) = p.FrameReader().feed(frame)
    assert header.request_id == request_id
    assert p.decode_request(header, body) == msg


def _generic_sign(body: bytes) -> object:
    try:
        # The general decoder every message inherits, past Sign's unrolled one.
        return super(Sign, Sign).decode_body(memoryview(body), 0)
    except ProtocolError as exc:
        return type(exc)


def _fast_sign(body: bytes) -> object:
    try:
        return p.decode_request(p.Header(p.VERSION, p.Opcode.SIGN, 0, 1, 0), body)
    except ProtocolError as exc:
        return type(exc)


@settings(max_examples=500)
@given(st.binary(max_size=80) | st.builds(
    lambda key, scheme, h, digest, cut: (
        struct.pack(">H", len(key)) + key + struct.pack(">BHH", scheme, h, len(digest))
        + digest)[:cut],
    st.binary(max_size=20), st.integers(0, 255), st.integers(0, 0xFFFF),
    st.binary(max_size=70), st.integers(0, 120)))
def test_sign_fast_decoder_agrees_with_the_general_one(body: bytes) -> None:
    assert _fast_sign(body) == _generic_sign(body)
