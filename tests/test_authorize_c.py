"""The C session arithmetic (tpm/authorize.c, through tpm/command.py) against the Python
oracle in tpm/reference.py and session_crypto.py, byte for byte. tests/test_command.py runs
both against a TPM."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from tpmbroker.tpm import command, reference
from tpmbroker.tpm import session_crypto as sc

HASHES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64}
ATTRIBUTES = (sc.CONTINUE_SESSION, sc.CONTINUE_SESSION | sc.DECRYPT, sc.DECRYPT,
              sc.CONTINUE_SESSION | sc.ENCRYPT)


def test_the_package_carries_the_c_code() -> None:
    # command.py does not import without it: the broker has no slower fallback.
    assert Path(command._authorize.__file__).parent == Path(command.__file__).parent


def finish(pending: command.PendingCommand, response: bytes) -> tuple[list[int], bytes]:
    """Each implementation checks the responses to the commands it prepared."""
    if pending.c_pending is not None:
        return command.finish(pending, response)
    return reference.finish(pending, response)


def session(hash_alg: int, key: bytes, nonce_tpm: bytes) -> sc.SessionState:
    return sc.SessionState(0x02000000, hash_alg, key, nonce_tpm)


@st.composite
def commands(draw: st.DrawFn) -> tuple[sc.SessionState, bytes, dict[str, object]]:
    hash_alg = draw(st.sampled_from(sorted(HASHES)))
    size = HASHES[hash_alg]
    key = draw(st.sampled_from([b"", b"\x07" * size]))
    nonce_tpm = draw(st.binary(min_size=size, max_size=size))
    nonce_caller = draw(st.binary(min_size=size, max_size=size))
    handles = draw(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=3))
    args: dict[str, object] = {
        "command_code": draw(st.sampled_from([command.CC_SIGN, command.CC_RSA_DECRYPT,
                                              command.CC_CREATE])),
        "handles": handles,
        "names": [draw(st.binary(min_size=4, max_size=66)) for _ in handles],
        # Trailing zeros included: both must drop them.
        "auth": draw(st.binary(max_size=40)) + draw(st.sampled_from([b"", b"\0\0"])),
        "first_parameter": draw(st.none() | st.binary(max_size=600)),
        "other_parameters": draw(st.binary(max_size=64)),
        "attributes": draw(st.sampled_from(ATTRIBUTES)),
        "response_handles": draw(st.integers(0, 1)),
    }
    return session(hash_alg, key, nonce_tpm), nonce_caller, args


@settings(max_examples=300, deadline=None)
@given(commands())
def test_prepare_is_byte_identical(case: tuple[sc.SessionState, bytes, dict[str, object]],
                                   ) -> None:
    state, nonce_caller, args = case
    c = command.prepare(state, nonce_caller=nonce_caller, **args)  # type: ignore[arg-type]
    ref = reference.prepare(state, nonce_caller=nonce_caller, **args)  # type: ignore[arg-type]
    assert c.c_pending is not None and ref.c_pending is None
    assert c.command == ref.command


def tpm_response(pending: command.PendingCommand, parameters: bytes, nonce_tpm: bytes,
                 attributes: int = sc.CONTINUE_SESSION, handles: tuple[int, ...] = ()) -> bytes:
    """What a TPM answers to `pending`, its HMAC computed by the reference code."""
    state = pending.session
    name = state.hash
    key = state.session_key + sc.strip_auth(b"pw\0")
    mac = sc.session_hmac(name, key, sc.rp_hash(name, 0, pending.command_code, parameters),
                          nonce_tpm, NONCE_CALLER[: state.nonce_size], attributes)
    body = (b"".join(struct.pack(">I", h) for h in handles)
            + struct.pack(">I", len(parameters)) + parameters
            + command.tpm2b(nonce_tpm) + bytes((attributes,)) + command.tpm2b(mac))
    return struct.pack(">HII", command.ST_SESSIONS, 10 + len(body), 0) + body


NONCE_CALLER = bytes(range(64))


def both_prepared(hash_alg: int = 0x000B, response_handles: int = 0,
                  ) -> tuple[command.PendingCommand, command.PendingCommand]:
    size = HASHES[hash_alg]
    made = []
    for prepare in (command.prepare, reference.prepare):
        made.append(prepare(session(hash_alg, b"\x05" * size, b"\x09" * size), command.CC_SIGN,
                            [0x80000001], [b"name"], b"pw\0", b"d" * size, b"rest",
                            sc.CONTINUE_SESSION | sc.DECRYPT, response_handles,
                            nonce_caller=NONCE_CALLER[:size]))
    return made[0], made[1]


@pytest.mark.parametrize("hash_alg", sorted(HASHES))
def test_finish_accepts_what_the_reference_accepts(hash_alg: int) -> None:
    size = HASHES[hash_alg]
    new_nonce = b"\x0b" * size
    for pending in both_prepared(hash_alg, response_handles=1):
        response = tpm_response(pending, b"\x00\x18params", new_nonce, handles=(0x80000002,))
        assert finish(pending, response) == ([0x80000002], b"\x00\x18params")
        assert pending.session.nonce_tpm == new_nonce


def test_finish_decrypts_an_encrypted_response_parameter() -> None:
    results = []
    for pending in both_prepared():
        clear = b"secret bytes"
        state = pending.session
        new_nonce = b"\x0c" * 32
        key = state.session_key + b"pw"
        sealed = sc.cfb_encrypt("sha256", key, new_nonce, NONCE_CALLER[:32], clear)
        response = tpm_response(pending, command.tpm2b(sealed) + b"tail", new_nonce,
                                sc.CONTINUE_SESSION | sc.ENCRYPT)
        results.append(finish(pending, response))
    assert results[0] == results[1] == ([], command.tpm2b(b"secret bytes") + b"tail")


@pytest.mark.parametrize("flip", range(10, 60, 7))
def test_any_altered_byte_is_refused_by_both(flip: int) -> None:
    for pending in both_prepared():
        response = bytearray(tpm_response(pending, b"\x00\x18params", b"\x0b" * 32))
        response[flip] ^= 0x40
        nonce_before = pending.session.nonce_tpm
        with pytest.raises(TSS2_Exception) as caught:
            finish(pending, bytes(response))
        # Either the layout no longer adds up or the HMAC does not match.
        assert caught.value.rc in (command.malformed().rc, command.ResponseAuthError().rc)
        assert pending.session.nonce_tpm == nonce_before


@pytest.mark.parametrize("response", [
    b"", b"\x80\x01", struct.pack(">HII", 0x8001, 11, 0) + b"x",
    struct.pack(">HII", 0x8002, 14, 0) + b"\xff\xff\xff\xff",
    struct.pack(">HII", 0x8001, 12, 0x9A2) + b"xx"])
def test_malformed_responses_are_refused_by_both(response: bytes) -> None:
    for pending in both_prepared():
        with pytest.raises(TSS2_Exception) as caught:
            finish(pending, response)
        assert caught.value.rc == command.malformed().rc


def test_a_refusal_carries_the_tpm_code_in_both() -> None:
    for pending in both_prepared():
        with pytest.raises(TSS2_Exception) as caught:
            finish(pending, struct.pack(">HII", 0x8001, 10, 0x98E))
        assert caught.value.rc == 0x98E


def test_prepare_refuses_what_it_cannot_frame() -> None:
    state = session(0x000B, b"", b"\0" * 32)
    with pytest.raises(TSS2_Exception):
        command.prepare(state, command.CC_SIGN, [1], [b"n"], b"a" * 65, b"", b"", sc.DECRYPT)
    with pytest.raises(TSS2_Exception):
        command.prepare(state, command.CC_SIGN, [1], [b"n"], b"", b"x" * 5000, b"", sc.DECRYPT)
    with pytest.raises(ValueError, match="nonceCaller"):
        command.prepare(state, command.CC_SIGN, [1], [b"n"], b"", b"", b"", sc.DECRYPT,
                    nonce_caller=b"short")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=66), st.binary(max_size=66))
def test_ecdsa_signature_is_the_same_der(r: bytes, s: bytes) -> None:
    parameters = struct.pack(">HHH", 0x0018, 0x000B, len(r)) + r + command.tpm2b(s)
    expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    assert command.signature_bytes(parameters) == expected
    assert reference.signature_bytes(parameters) == expected


@pytest.mark.parametrize("scheme", [0x0014, 0x0016])
def test_rsa_signature_is_padded_to_the_modulus(scheme: int) -> None:
    parameters = struct.pack(">HHH", scheme, 0x000B, 255) + b"\x01" * 255
    assert command.signature_bytes(parameters, 256) == b"\0" + b"\x01" * 255
    assert command.signature_bytes(parameters) == reference.signature_bytes(parameters)


@pytest.mark.parametrize("parameters", [
    b"\x00\x18", struct.pack(">HHH", 0x0018, 0x000B, 40) + b"r",
    struct.pack(">HHH", 0x0014, 0x000B, 3) + b"toolong"])
def test_malformed_signatures_are_refused(parameters: bytes) -> None:
    with pytest.raises(TSS2_Exception):
        command.signature_bytes(parameters)
    with pytest.raises(TSS2_Exception):
        reference.signature_bytes(parameters)


# --- TPM2_GetRandom: no handles, the session only encrypts the answer ---------------------

@pytest.mark.parametrize("hash_alg", sorted(HASHES))
def test_get_random_is_byte_identical_and_both_decrypt_its_answer(hash_alg: int) -> None:
    size = HASHES[hash_alg]
    name = sc.hash_name(hash_alg)
    key = b"\x05" * size
    nonce_caller, new_nonce = NONCE_CALLER[:size], b"\x0d" * size
    clear = bytes(range(100, 100 + size))  # what the TPM drew: one digest's worth
    commands, results = [], []
    for prepare in (command.prepare, reference.prepare):
        state = session(hash_alg, key, b"\x09" * size)
        pending = prepare(state, command.CC_GET_RANDOM, (), (), b"", None, struct.pack(">H", 48),
                          command.RANDOM_ATTRIBUTES, nonce_caller=nonce_caller)
        commands.append(pending.command)
        # The TPM's side: randomBytes encrypted with the sessionKey alone (no entity is
        # authorized, so no authValue), HMAC over the encrypted parameter.
        sealed = command.tpm2b(sc.cfb_encrypt(name, key, new_nonce, nonce_caller, clear))
        attributes = command.RANDOM_ATTRIBUTES
        mac = sc.session_hmac(name, key, sc.rp_hash(name, 0, command.CC_GET_RANDOM, sealed),
                              new_nonce, nonce_caller, attributes)
        body = (struct.pack(">I", len(sealed)) + sealed + command.tpm2b(new_nonce)
                + bytes((attributes,)) + command.tpm2b(mac))
        response = struct.pack(">HII", command.ST_SESSIONS, 10 + len(body), 0) + body
        results.append(finish(pending, response))
        assert state.nonce_tpm == new_nonce
    assert commands[0] == commands[1]
    # Header, no handle area, the auth area, then bytesRequested alone.
    assert struct.unpack_from(">HII", commands[0]) == (command.ST_SESSIONS, len(commands[0]),
                                                      command.CC_GET_RANDOM)
    assert commands[0].endswith(b"\x00\x30")
    assert results[0] == results[1] == ([], command.tpm2b(clear))
    assert command.sized_result(results[0][1]) == clear


def test_get_random_key_is_the_session_key_alone() -> None:
    # The HMAC of a session that authorizes no handle is keyed by sessionKey only: the
    # same command with an authValue differs, so an extra one would show.
    state = session(0x000B, b"\x05" * 32, b"\x09" * 32)
    plain = command.prepare_get_random(state, 32, nonce_caller=NONCE_CALLER[:32])
    with_auth = reference.prepare(state, command.CC_GET_RANDOM, (), (), b"pw", None,
                                      b"\x00\x20", command.RANDOM_ATTRIBUTES,
                                      nonce_caller=NONCE_CALLER[:32])
    expected = sc.session_hmac("sha256", b"\x05" * 32,
                               sc.cp_hash("sha256", command.CC_GET_RANDOM, [], b"\x00\x20"),
                               NONCE_CALLER[:32], b"\x09" * 32, command.RANDOM_ATTRIBUTES)
    assert plain.command.endswith(command.tpm2b(expected) + b"\x00\x20")
    assert plain.command != with_auth.command


@pytest.mark.parametrize("parameters", [b"", b"\x00", b"\x00\x05abc"])
def test_truncated_encrypted_parameter_is_malformed_in_both(parameters: bytes) -> None:
    for prepare in (command.prepare, reference.prepare):
        state = session(0x000B, b"\x05" * 32, b"\x09" * 32)
        pending = prepare(state, command.CC_GET_RANDOM, (), (), b"", None, b"\x00\x20",
                          command.RANDOM_ATTRIBUTES, nonce_caller=NONCE_CALLER[:32])
        mac = sc.session_hmac("sha256", b"\x05" * 32,
                              sc.rp_hash("sha256", 0, command.CC_GET_RANDOM, parameters),
                              b"\x0d" * 32, NONCE_CALLER[:32], command.RANDOM_ATTRIBUTES)
        body = (struct.pack(">I", len(parameters)) + parameters + command.tpm2b(b"\x0d" * 32)
                + bytes((command.RANDOM_ATTRIBUTES,)) + command.tpm2b(mac))
        response = struct.pack(">HII", command.ST_SESSIONS, 10 + len(body), 0) + body
        with pytest.raises(TSS2_Exception) as caught:
            finish(pending, response)
        assert caught.value.rc == command.malformed().rc


@pytest.mark.parametrize("name", ["P-256", "P-384", "P-521"])
@settings(max_examples=40, deadline=None)
@given(flip=st.integers(min_value=1, max_value=255), where=st.integers(min_value=1))
def test_the_c_point_check_agrees_with_cryptography(name: str, flip: int, where: int) -> None:
    """ECDH peers' points are checked in C; cryptography's point decoder is the oracle,
    for points on the curve and for the same points with one byte changed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[name]
    good = ec.generate_private_key(curve).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    where = 1 + where % (len(good) - 1)
    changed = good[:where] + bytes([good[where] ^ flip]) + good[where + 1:]
    for point in (good, changed, b"\x04" + bytes(len(good) - 1), good[:-1], b""):
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except ValueError:
            expected = False
        else:
            expected = True
        assert command.ec_point_on_curve(name, point) is expected


def test_the_c_point_check_knows_only_the_nist_curves() -> None:
    with pytest.raises(ValueError, match="P-224"):
        command.ec_point_on_curve("P-224", b"\x04" + bytes(56))
