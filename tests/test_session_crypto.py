"""Session crypto against known vectors and independent implementations (no TPM here;
tests/test_command.py checks the same code against a real TPM)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPM2B_PUBLIC

from tpmbroker.tpm import session_crypto as sc

SHA256 = int(TPM2_ALG.SHA256)
CRYPTOGRAPHY_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512}


def sp800_108_counter_hmac(name: str, key: bytes, label: bytes, context: bytes,
                           bits: int) -> bytes:
    """KDFa as cryptography's SP 800-108 implementation computes it (it adds the 0x00
    separator, which is KDFa's label terminator)."""
    return KBKDFHMAC(algorithm=CRYPTOGRAPHY_HASH[name](), mode=Mode.CounterMode,
                     length=bits // 8, rlen=4, llen=4, location=CounterLocation.BeforeFixed,
                     label=label, context=context, fixed=None).derive(key)


def cfb128_reference(key: bytes, iv: bytes, data: bytes) -> bytes:
    """CFB-128 built from single AES block encryptions (SP 800-38A, 6.3)."""
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = bytearray()
    feedback = iv
    for start in range(0, len(data), 16):
        stream = block.update(feedback)
        chunk = bytes(a ^ b for a, b in zip(data[start:start + 16], stream, strict=False))
        out += chunk
        feedback = chunk if len(chunk) == 16 else feedback
    return bytes(out)


def test_cfb_reference_matches_nist_sp800_38a_f3_13() -> None:
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    iv = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    cipher = bytes.fromhex("3b3fd92eb72dad20333449f8e83cfb4ac8a64537a0b3a93fcde3cdad9f1ce58b")
    assert cfb128_reference(key, iv, plain) == cipher


@pytest.mark.parametrize("name", ["sha1", "sha256", "sha384", "sha512"])
@pytest.mark.parametrize("bits", [128, 256, 512, 1024])
def test_kdfa_is_sp800_108_counter_mode(name: str, bits: int) -> None:
    key, u, v = b"k" * 32, b"nonce-newer" * 3, b"nonce-older" * 2
    assert sc.kdfa(name, key, b"ATH", u, v, bits) == sp800_108_counter_hmac(
        name, key, b"ATH", u + v, bits)


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=1, max_size=80), label=st.sampled_from([b"ATH", b"CFB", b"X"]),
       u=st.binary(max_size=64), v=st.binary(max_size=64), octets=st.integers(1, 100))
def test_kdfa_any_input(key: bytes, label: bytes, u: bytes, v: bytes, octets: int) -> None:
    assert sc.kdfa("sha256", key, label, u, v, 8 * octets) == sp800_108_counter_hmac(
        "sha256", key, label, u + v, 8 * octets)


def test_kdfa_label_already_terminated_is_not_terminated_twice() -> None:
    assert sc.kdfa("sha256", b"k", b"CFB\0", b"", b"", 256) == sc.kdfa("sha256", b"k", b"CFB",
                                                                        b"", b"", 256)


def test_kdfa_partial_octet_keeps_the_low_bits() -> None:
    block = hmac.digest(b"k", bytes.fromhex("00000001") + b"L\0" + bytes.fromhex("0000000c"),
                        "sha256")
    assert sc.kdfa("sha256", b"k", b"L", b"", b"", 12) == bytes([block[0] & 0x0F, block[1]])


@pytest.mark.parametrize("name", ["sha256", "sha384"])
def test_kdfe_is_the_sp800_56a_concatenation_kdf(name: str) -> None:
    z, u, v = b"\x42" * 32, b"\x01" * 32, b"\x02" * 32
    expected = ConcatKDFHash(CRYPTOGRAPHY_HASH[name](), length=hashlib.new(name).digest_size,
                             otherinfo=b"SECRET\0" + u + v).derive(z)
    assert sc.kdfe(name, z, b"SECRET", u, v, 8 * hashlib.new(name).digest_size) == expected


def test_ecdh_salt_is_what_the_tpm_derives_from_its_private_key() -> None:
    tpm_key = ec.derive_private_key(0x1234_5678_9ABC, ec.SECP256R1())
    public = tpm_key.public_key().public_numbers()
    salt_key = sc.SaltKey(SHA256, ecc_curve=0x0003, ecc_x=public.x.to_bytes(32, "big"),
                          ecc_y=public.y.to_bytes(32, "big"))
    ephemeral = ec.derive_private_key(0xCAFE_F00D, ec.SECP256R1())
    salt, point = sc.ecdh_salt(salt_key, ephemeral)

    # The TPM's side: the ephemeral point from encryptedSalt, Z from its private key.
    assert point[:2] == b"\x00\x20" and point[34:36] == b"\x00\x20" and len(point) == 68
    qe = ec.EllipticCurvePublicNumbers(int.from_bytes(point[2:34], "big"),
                                       int.from_bytes(point[36:], "big"),
                                       ec.SECP256R1()).public_key()
    z = tpm_key.exchange(ec.ECDH(), qe)
    expected = ConcatKDFHash(hashes.SHA256(), length=32,
                             otherinfo=b"SECRET\0" + point[2:34] + salt_key.ecc_x).derive(z)
    assert salt == expected


def test_ecdh_salt_is_fresh_each_time() -> None:
    tpm_key = ec.generate_private_key(ec.SECP256R1())
    public = tpm_key.public_key().public_numbers()
    salt_key = sc.SaltKey(SHA256, ecc_curve=0x0003, ecc_x=public.x.to_bytes(32, "big"),
                          ecc_y=public.y.to_bytes(32, "big"))
    assert sc.make_salt(salt_key) != sc.make_salt(salt_key)


def test_rsa_salt_decrypts_with_the_secret_label() -> None:
    tpm_key = rsa.generate_private_key(65537, 2048)
    numbers = tpm_key.public_key().public_numbers()
    salt_key = sc.SaltKey(SHA256, rsa_modulus=numbers.n.to_bytes(256, "big"), rsa_exponent=0)
    salt, encrypted = sc.make_salt(salt_key)
    assert len(salt) == 32 and len(encrypted) == 256
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=b"SECRET\0")
    assert tpm_key.decrypt(encrypted, oaep) == salt


def test_session_key() -> None:
    salt, nonce_tpm, nonce_caller = b"s" * 32, b"t" * 32, b"c" * 32
    assert sc.session_key("sha256", b"", salt, nonce_tpm, nonce_caller) == \
        sp800_108_counter_hmac("sha256", salt, b"ATH", nonce_tpm + nonce_caller, 256)
    # bind auth comes first, without trailing zeros
    assert sc.session_key("sha256", b"pw\0\0", salt, nonce_tpm, nonce_caller) == \
        sc.session_key("sha256", b"pw", salt, nonce_tpm, nonce_caller) == \
        sp800_108_counter_hmac("sha256", b"pw" + salt, b"ATH", nonce_tpm + nonce_caller, 256)
    assert sc.session_key("sha256", b"", b"", nonce_tpm, nonce_caller) == b""


def test_cp_hash_rp_hash_and_hmac() -> None:
    names = [b"\x00\x0b" + b"n" * 32, bytes.fromhex("40000001")]
    assert sc.cp_hash("sha256", 0x15D, names, b"params") == hashlib.sha256(
        bytes.fromhex("0000015d") + names[0] + names[1] + b"params").digest()
    assert sc.rp_hash("sha256", 0, 0x15D, b"out") == hashlib.sha256(
        bytes.fromhex("000000000000015d") + b"out").digest()
    assert sc.session_hmac("sha256", b"key", b"p" * 32, b"new", b"old", 0x21) == hmac.digest(
        b"key", b"p" * 32 + b"new" + b"old" + b"\x21", "sha256")
    assert sc.session_hmac("sha256", b"key", b"p", b"n", b"o", 1, b"d", b"e") == hmac.digest(
        b"key", b"pnode\x01", "sha256")


def test_object_name_matches_tpm2_pytss() -> None:
    public = TPM2B_PUBLIC.parse("ecc256", nameAlg="sha256").publicArea
    assert sc.object_name(SHA256, public.marshal()) == bytes(public.get_name())
    assert sc.handle_name(0x40000001) == bytes.fromhex("40000001")


@settings(max_examples=50, deadline=None)
@given(key=st.binary(max_size=64), newer=st.binary(min_size=16, max_size=32),
       older=st.binary(min_size=16, max_size=32), data=st.binary(max_size=300))
def test_cfb_parameter_encryption(key: bytes, newer: bytes, older: bytes, data: bytes) -> None:
    material = sp800_108_counter_hmac("sha256", key, b"CFB", newer + older, 256)
    encrypted = sc.cfb_encrypt("sha256", key, newer, older, data)
    assert encrypted == cfb128_reference(material[:16], material[16:], data)
    assert sc.cfb_decrypt("sha256", key, newer, older, encrypted) == data


def test_strip_auth() -> None:
    assert sc.strip_auth(b"pw\0\0") == b"pw"
    assert sc.strip_auth(b"\0p\0w\0") == b"\0p\0w"
    assert sc.strip_auth(b"") == b""


def test_unknown_hash_and_curve_are_refused() -> None:
    with pytest.raises(ValueError):
        sc.hash_name(0x0012)
    with pytest.raises(ValueError):
        sc.ecdh_salt(sc.SaltKey(SHA256, ecc_curve=0x0010, ecc_x=b"\1", ecc_y=b"\1"))
