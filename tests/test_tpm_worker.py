"""The TPM worker against a real swtpm (and tpm2-abrmd for other TPM users)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_PT_HR,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

from tpmbroker.errors import (
    AuthFailedError,
    BadKeyError,
    DeadlineError,
    LockoutError,
    NoSessionsError,
    TpmUnavailableError,
    UnknownKeyError,
    UnsupportedError,
)
from tpmbroker.procedures.generate import generate_key
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign import sign as sign_digest
from tpmbroker.procedures.status import status as tpm_status
from tpmbroker.protocol import Curve, Hash, KeySource, KeyType, Scheme, key_id_for
from tpmbroker.simulator import Swtpm, free_port_pair
from tpmbroker.templates import storage_parent_template
from tpmbroker.tpm import KeyInfo, TpmWorker
from tpmbroker.tpm import sessions as sessions_module

from .tpmfixtures import Abrmd, running_swtpm

HASHES: dict[Hash, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    Hash.SHA256: hashes.SHA256, Hash.SHA384: hashes.SHA384, Hash.SHA512: hashes.SHA512}
KEY_KINDS = {"ec-p256": (KeyType.EC, Curve.P256), "ec-p384": (KeyType.EC, Curve.P384),
             "rsa-2048": (KeyType.RSA, 2048), "rsa-3072": (KeyType.RSA, 3072)}
AUTH_FAIL = 0x08E
TPM2_PEM = "TSS2 PRIVATE KEY"


def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def digest_of(data: bytes, hash_alg: Hash) -> bytes:
    return hashlib.new(hash_alg.hashlib_name, data).digest()


def verify(public_der: bytes, signature: bytes, digest: bytes, scheme: Scheme,
           hash_alg: Hash) -> None:
    public = load_der_public_key(public_der)
    algorithm = HASHES[hash_alg]()
    prehashed = utils.Prehashed(algorithm)
    if isinstance(public, ec.EllipticCurvePublicKey):
        assert scheme is Scheme.ECDSA
        public.verify(signature, digest, ec.ECDSA(prehashed))
    elif isinstance(public, rsa.RSAPublicKey):
        assert len(signature) == public.key_size // 8
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15() if scheme is Scheme.PKCS1
            else padding.PSS(padding.MGF1(algorithm), algorithm.digest_size))
        public.verify(signature, digest, pad, prehashed)
    else:
        raise AssertionError(f"unexpected public key {public!r}")


def pem_to_der(pem: bytes) -> bytes:
    lines = pem.decode().strip().splitlines()
    assert lines[0] == f"-----BEGIN {TPM2_PEM}-----", lines[0]
    return base64.b64decode("".join(lines[1:-1]))


def der_to_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    chunks = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {TPM2_PEM}-----", *chunks,
                      f"-----END {TPM2_PEM}-----", ""]).encode()


def tpm_property(ectx: Any, prop: int) -> int:
    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
    return int(data.data.tpmProperties[0].value)


def opened(tcti: str, sessions: int = 2, da_reserve: int | None = 1) -> TpmWorker:
    worker = TpmWorker(tcti, sessions, da_reserve=da_reserve)
    worker.open(soon())
    return worker


# --- one TPM and one worker for the read-mostly tests -----------------------------------

@dataclass
class Shared:
    tpm: Swtpm
    worker: TpmWorker
    keys: dict[str, tuple[bytes, bytes, KeyInfo]]  # kind -> (TSS2 DER, SPKI, info)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    with running_swtpm(tmp_path_factory.mktemp("shared") / "tpmstate") as tpm:
        worker = opened(tpm.tcti)
        try:
            generated = {}
            for kind, (key_type, param) in KEY_KINDS.items():
                der, spki = generate_key(worker, key_type, param, b"", 0, soon(60))
                generated[kind] = (der, spki, load_key(worker, KeySource.TSS2_DER, der, soon()))
            yield Shared(tpm, worker, generated)
        finally:
            worker.close()


SIGN_CASES = [(kind, scheme, hash_alg)
              for kind in KEY_KINDS
              for scheme in ((Scheme.ECDSA,) if kind.startswith("ec") else
                             (Scheme.PKCS1, Scheme.PSS))
              for hash_alg in HASHES]


@pytest.mark.parametrize(("kind", "scheme", "hash_alg"), SIGN_CASES,
                         ids=[f"{k}-{s.name}-{h.name}" for k, s, h in SIGN_CASES])
def test_signs_and_verifies(shared: Shared, kind: str, scheme: Scheme,
                            hash_alg: Hash) -> None:
    _, spki, info = shared.keys[kind]
    digest = digest_of(f"{kind} {scheme} {hash_alg}".encode(), hash_alg)
    signature = sign_digest(shared.worker, info.key_id, b"", scheme, hash_alg, digest, soon())
    verify(spki, signature, digest, scheme, hash_alg)


def test_key_info_describes_the_key(shared: Shared) -> None:
    for kind, (key_type, param) in KEY_KINDS.items():
        der, spki, info = shared.keys[kind]
        assert info.key_id == key_id_for(KeySource.TSS2_DER, der)
        assert info.key_type is key_type
        assert info.public_key == spki
        if key_type is KeyType.EC:
            assert info.curve == param
            assert info.bits == {Curve.P256: 256, Curve.P384: 384}[Curve(param)]
        else:
            assert (info.curve, info.bits) == (Curve.NONE, param)


def test_generated_key_is_a_tss2_key_that_loads_again(shared: Shared) -> None:
    der, spki = generate_key(shared.worker, KeyType.EC, Curve.P256, b"secret", 0, soon())
    tss = TSSPrivKey.from_der(der)
    assert tss.empty_auth is False
    assert tss.parent == 0x40000001
    attributes = tss.public.publicArea.objectAttributes
    assert attributes & TPMA_OBJECT.SIGN_ENCRYPT and attributes & TPMA_OBJECT.USERWITHAUTH
    assert attributes & TPMA_OBJECT.DECRYPT  # the default usage: sign and decrypt
    assert not attributes & (TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED)
    assert TSSPrivKey.from_der(shared.keys["ec-p256"][0]).empty_auth is True

    info = load_key(shared.worker, KeySource.TSS2_DER, der, soon())
    assert load_key(shared.worker, KeySource.TSS2_DER, der, soon()) == info
    digest = digest_of(b"reloaded", Hash.SHA256)
    signature = sign_digest(shared.worker, info.key_id, b"secret", Scheme.ECDSA, Hash.SHA256,
                                   digest, soon())
    verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)


def test_key_file_without_empty_auth_needs_the_password(shared: Shared) -> None:
    """emptyAuth absent (allowed by the key file format) means "has a password"."""
    der, spki = generate_key(shared.worker, KeyType.EC, Curve.P256, b"pw", 0, soon())
    tss = TSSPrivKey.from_der(der)
    without = _der_sequence([
        bytes.fromhex("06066781050a0103"),  # OID 2.23.133.10.1.3
        _der(0x02, tss.parent.to_bytes(4, "big")),
        _der(0x04, tss.public.marshal()),
        _der(0x04, tss.private.marshal()),
    ])
    info = load_key(shared.worker, KeySource.TSS2_DER, without, soon())
    digest = digest_of(b"no emptyAuth", Hash.SHA256)
    signature = sign_digest(shared.worker, info.key_id, b"pw", Scheme.ECDSA, Hash.SHA256, digest,
                                   soon())
    verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    elif size < 0x100:
        length = bytes([0x81, size])
    else:
        length = bytes([0x82]) + size.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _der_sequence(items: list[bytes]) -> bytes:
    return _der(0x30, b"".join(items))


def test_pool_sessions_are_the_only_sessions(shared: Shared) -> None:
    _, _, info = shared.keys["ec-p256"]
    digest = digest_of(b"count", Hash.SHA256)
    for _ in range(20):
        sign_digest(shared.worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
    status = tpm_status(shared.worker)
    assert status["pool_size"] == status["pool_sessions"] == 2
    assert status["tpm_active_sessions"] == 2
    assert status["tpm_active_sessions_max"] == 64
    assert status["tcti"] == shared.tpm.tcti


def test_bad_requests(shared: Shared) -> None:
    worker = shared.worker
    _, _, info = shared.keys["ec-p256"]
    _, _, rsa_info = shared.keys["rsa-2048"]
    digest = digest_of(b"x", Hash.SHA256)
    with pytest.raises(UnknownKeyError):
        sign_digest(worker, b"\0" * 32, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
    # A digest of the wrong length never reaches the procedure: SIGN's check refuses it
    # (tests/test_broker.py, test_bad_keys_digests_and_ids).
    with pytest.raises(UnsupportedError):
        sign_digest(worker, info.key_id, b"", Scheme.PSS, Hash.SHA256, digest, soon())
    with pytest.raises(UnsupportedError):
        sign_digest(worker, rsa_info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
    with pytest.raises(DeadlineError):
        sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                    time.monotonic() - 1)
    with pytest.raises(UnsupportedError, match="no ECDSA"):
        generate_key(worker, KeyType.EC, 0x0010, b"", 0, soon())  # BN P-256
    with pytest.raises(UnsupportedError, match="TPM2_TestParms"):
        generate_key(worker, KeyType.RSA, 1536, b"", 0, soon())
    with pytest.raises(UnsupportedError):
        generate_key(worker, KeyType.EC, Curve.P256, b"", 0x40000007, soon())


@pytest.mark.parametrize("blob", [
    b"", b"garbage", b"\x30\x03\x02\x01\x01",
    bytes.fromhex("300a06082a8648ce3d040302"),  # a sequence with another OID
], ids=["empty", "garbage", "short-sequence", "wrong-oid"])
def test_unparsable_blobs_are_bad_keys(shared: Shared, blob: bytes) -> None:
    with pytest.raises(BadKeyError):
        load_key(shared.worker, KeySource.TSS2_DER, blob, soon())


def test_blobs_the_tpm_refuses_are_bad_keys(shared: Shared) -> None:
    der = shared.keys["ec-p256"][0]
    with pytest.raises(BadKeyError):
        load_key(shared.worker, KeySource.TSS2_DER, der[:-10], soon())
    tss = TSSPrivKey.from_der(der)
    private = bytearray(tss.private.marshal())
    private[20] ^= 0xFF
    tampered = der.replace(bytes(tss.private.marshal()), bytes(private))
    with pytest.raises(BadKeyError) as caught:
        load_key(shared.worker, KeySource.TSS2_DER, tampered, soon())
    assert caught.value.tpm_rc != 0
    with pytest.raises(BadKeyError):
        load_key(shared.worker, KeySource.PERSISTENT_HANDLE, b"\x81\0\0", soon())
    with pytest.raises(BadKeyError):
        load_key(shared.worker, KeySource.PERSISTENT_HANDLE, b"\x80\0\0\0", soon())
    with pytest.raises(BadKeyError):
        load_key(shared.worker, KeySource.PERSISTENT_HANDLE, b"\x81\0\x7f\x7f", soon())
    # The worker is still healthy and did not rebuild anything.
    assert tpm_status(shared.worker)["tpm_restarts_recovered"] == 0


# --- fresh TPMs ---------------------------------------------------------------------------

def test_pool_size_is_checked() -> None:
    for bad in (0, 4):
        with pytest.raises(ValueError):
            TpmWorker("swtpm:host=127.0.0.1,port=1", bad)


def test_unreachable_tpm() -> None:
    port = free_port_pair()
    worker = TpmWorker(f"swtpm:host=127.0.0.1,port={port}")
    started = time.monotonic()
    with pytest.raises(TpmUnavailableError):
        worker.open(time.monotonic() + 0.3)
    assert time.monotonic() - started < 3
    worker.close()


@pytest.mark.parametrize("pool_size", [1, 3])
def test_pool_size_sessions_and_no_more(swtpm: Swtpm, pool_size: int) -> None:
    worker = opened(swtpm.tcti, pool_size)
    try:
        der, _ = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        for _ in range(7):
            sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, b"\1" * 32, soon())
        assert tpm_status(worker)["tpm_active_sessions"] == pool_size
    finally:
        worker.close()
    worker.close()  # idempotent
    with ESAPI(swtpm.tcti) as ectx:  # close() gave every slot back
        assert tpm_property(ectx, TPM2_PT_HR.ACTIVE) == 0
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, 0x80000000, 16)
        assert list(data.data.handles) == []
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, 0x02000000, 16)
        assert list(data.data.handles) == []


def test_wrong_password_then_lockout(swtpm: Swtpm) -> None:
    """The TPM's own lockout, as a worker without the shield (tpm/lockout.py) meets it."""
    worker = opened(swtpm.tcti, da_reserve=None)
    der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"right", 0, soon())
    info = load_key(worker, KeySource.TSS2_DER, der, soon())
    digest = digest_of(b"pw", Hash.SHA256)
    sign_digest(worker, info.key_id, b"right", Scheme.ECDSA, Hash.SHA256, digest, soon())
    with pytest.raises(AuthFailedError) as caught:
        sign_digest(worker, info.key_id, b"wrong", Scheme.ECDSA, Hash.SHA256, digest, soon())
    assert caught.value.tpm_rc == AUTH_FAIL  # session number masked off
    with pytest.raises(AuthFailedError):
        sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
    # swtpm locks out after 3 failures (TPM2_PT_MAX_AUTH_FAIL).
    with pytest.raises((AuthFailedError, LockoutError)):
        sign_digest(worker, info.key_id, b"wrong", Scheme.ECDSA, Hash.SHA256, digest, soon())
    with pytest.raises(LockoutError):
        sign_digest(worker, info.key_id, b"right", Scheme.ECDSA, Hash.SHA256, digest, soon())
    assert tpm_status(worker)["tpm_restarts_recovered"] == 0
    worker.close()

    with ESAPI(swtpm.tcti) as ectx:  # the lockout authorization is empty on swtpm
        ectx.dictionary_attack_lock_reset(ESYS_TR.RH_LOCKOUT)
    worker = opened(swtpm.tcti)
    try:
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        signature = sign_digest(worker, info.key_id, b"right", Scheme.ECDSA, Hash.SHA256, digest,
                                soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
    finally:
        worker.close()


def test_least_recently_used_keys_make_room(swtpm: Swtpm) -> None:
    """swtpm has 3 transient object slots: the primary and two keys."""
    worker = opened(swtpm.tcti)
    try:
        keys = []
        for _ in range(5):
            der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
            keys.append((load_key(worker, KeySource.TSS2_DER, der, soon()), spki))
        digest = digest_of(b"lru", Hash.SHA256)
        for _ in range(2):
            for info, spki in keys:
                signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256,
                                        digest, soon())
                verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        status = tpm_status(worker)
        assert status["loaded_keys"] == 5
        assert status["resident_keys"] in (1, 2)
    finally:
        worker.close()


def test_persistent_key_and_persistent_parent(swtpm: Swtpm) -> None:
    key_handle, parent_handle = 0x81000010, 0x81000001
    with ESAPI(swtpm.tcti) as ectx:
        tss = TSSPrivKey.create_ecc(ectx)
        loaded = tss.load(ectx)
        ectx.evict_control(ESYS_TR.RH_OWNER, loaded, persistent_handle=key_handle)
        ectx.flush_context(loaded)
        template = storage_parent_template(rsa=False)  # swtpm has ECC
        primary = ectx.create_primary(TPM2B_SENSITIVE_CREATE(),
                                      TPM2B_PUBLIC(publicArea=template), ESYS_TR.RH_OWNER)[0]
        ectx.evict_control(ESYS_TR.RH_OWNER, primary, persistent_handle=parent_handle)
        ectx.flush_context(primary)

    worker = opened(swtpm.tcti)
    try:
        info = load_key(worker, KeySource.PERSISTENT_HANDLE, key_handle.to_bytes(4, "big"),
                               soon())
        assert info.public_key == tss.public.publicArea.to_der()
        digest = digest_of(b"persistent", Hash.SHA384)
        signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA384, digest, soon())
        verify(info.public_key, signature, digest, Scheme.ECDSA, Hash.SHA384)

        der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", parent_handle, soon())
        assert TSSPrivKey.from_der(der).parent == parent_handle
        child = load_key(worker, KeySource.TSS2_DER, der, soon())
        digest = digest_of(b"child", Hash.SHA256)
        signature = sign_digest(worker, child.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                                soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        with pytest.raises(BadKeyError):  # no such persistent parent
            load_key(worker, KeySource.TSS2_DER, der.replace(
                parent_handle.to_bytes(4, "big"), (0x81000077).to_bytes(4, "big")), soon())
    finally:
        worker.close()


# --- recovery ---------------------------------------------------------------------------

def _signing_key(worker: TpmWorker) -> tuple[KeyInfo, bytes]:
    der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
    return load_key(worker, KeySource.TSS2_DER, der, soon()), spki


def test_tpm_restart_is_recovered(swtpm: Swtpm) -> None:
    worker = opened(swtpm.tcti)
    try:
        info, spki = _signing_key(worker)
        digest = digest_of(b"restart", Hash.SHA256)
        sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
        swtpm.restart()  # TPM Reset: sessions and transient objects are gone
        signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                                soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        status = tpm_status(worker)
        assert status["tpm_restarts_recovered"] == 1
        assert status["pool_sessions"] == status["tpm_active_sessions"] == 2
    finally:
        worker.close()


def test_restart_without_volatile_state_is_recovered(swtpm: Swtpm) -> None:
    """reset_state drops any saved volatile state but keeps the seeds: old keys still load."""
    worker = opened(swtpm.tcti)
    try:
        old, old_spki = _signing_key(worker)
        swtpm.restart(reset_state=True)
        digest = digest_of(b"restarted", Hash.SHA256)
        signature = sign_digest(worker, old.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
        verify(old_spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        assert tpm_status(worker)["tpm_restarts_recovered"] == 1
        new, spki = _signing_key(worker)
        signature = sign_digest(worker, new.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        assert tpm_status(worker)["tpm_active_sessions"] == 2
    finally:
        worker.close()


def test_cleared_tpm_refuses_old_keys(swtpm: Swtpm) -> None:
    """TPM2_Clear flushes our objects and changes the owner seed: old keys are bad keys."""
    worker = opened(swtpm.tcti)
    try:
        old, _ = _signing_key(worker)
        worker.link.ectx.clear(ESYS_TR.RH_LOCKOUT)  # as another TPM user would
        digest = digest_of(b"cleared", Hash.SHA256)
        with pytest.raises(BadKeyError):
            sign_digest(worker, old.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
        new, spki = _signing_key(worker)
        signature = sign_digest(worker, new.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest, soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        assert tpm_status(worker)["tpm_active_sessions"] == 2
    finally:
        worker.close()


def _flush_raw(ectx: Any, handle: int) -> None:
    """TPM2_FlushContext sent past ESAPI, so ESAPI still believes the handle is alive."""
    tcti = ectx.tcti
    tcti.transmit(struct.pack(">HIII", 0x8001, 14, 0x165, handle))
    response = tcti.receive()
    assert struct.unpack_from(">I", response, 6)[0] == 0


def test_session_flushed_behind_our_back(swtpm: Swtpm) -> None:
    """A pool session that vanished is replaced without a failed authorization."""
    worker = opened(swtpm.tcti)
    try:
        info, spki = _signing_key(worker)
        ectx = worker.link.ectx
        for session in worker.pool.sessions:
            _flush_raw(ectx, session.handle)
        lockout_before = tpm_property(ectx, TPM2_PT.LOCKOUT_COUNTER)
        digest = digest_of(b"flushed", Hash.SHA256)
        signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                                soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
        assert tpm_property(worker.link.ectx, TPM2_PT.LOCKOUT_COUNTER) == lockout_before
        status = tpm_status(worker)
        assert status["pool_sessions"] == status["tpm_active_sessions"] == 2
        # Same TPM life: the old primary and key were flushed, not leaked.
        _, data = worker.link.ectx.get_capability(TPM2_CAP.HANDLES, 0x80000000, 16)
        assert len(data.data.handles) == 2
    finally:
        worker.close()


# --- other TPM users (through tpm2-abrmd) -------------------------------------------------

class SessionHog:
    """Another TPM user holding session slots, over as many abrmd connections as it needs."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.held: list[tuple[Any, Any]] = []  # (ESAPI, session)
        self.contexts: list[Any] = []

    def take_all(self) -> int:
        """Start sessions until the TPM has no slot left; returns how many it got now."""
        got = 0
        ectx = None
        while True:
            if ectx is None:
                ectx = ESAPI(self.tcti)
                self.contexts.append(ectx)
            try:
                session = ectx.start_auth_session(
                    tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
                    symmetric=None, auth_hash=TPM2_ALG.SHA256)
            except TSS2_Exception as exc:
                if int(exc.rc) & 0xFFFF != 0x903 or int(exc.rc) >> 16 != 0xB:
                    assert int(exc.rc) == 0x905, exc  # TPM_RC_SESSION_HANDLES
                    return got
                ectx = None  # abrmd's per-connection limit: open another connection
                continue
            self.held.append((ectx, session))
            got += 1

    def release(self, count: int | None = None) -> None:
        count = len(self.held) if count is None else count
        for _ in range(count):
            ectx, session = self.held.pop()
            ectx.flush_context(session)

    def close(self) -> None:
        self.release()
        for ectx in self.contexts:
            ectx.close()


@pytest.fixture
def hog(abrmd: Abrmd, monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionHog]:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", abrmd.bus_address)
    session_hog = SessionHog(abrmd.tcti)
    try:
        yield session_hog
    finally:
        session_hog.close()


def test_other_users_holding_session_slots(abrmd: Abrmd, hog: SessionHog,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "TOP_UP_INTERVAL", 0.2)
    worker = opened(abrmd.tcti)
    try:
        der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        digest = digest_of(b"crowded", Hash.SHA256)

        def sign(deadline: float) -> None:
            signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                                    deadline)
            verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)

        # Every other slot taken: the pool keeps serving with its own sessions.
        assert hog.take_all() == 62
        sign(soon())
        assert tpm_status(worker)["tpm_active_sessions"] == 64

        # The pool starts with no session at all: requests fail at their deadline.
        worker.close()
        assert hog.take_all() == 2
        worker = opened(abrmd.tcti)
        assert tpm_status(worker)["pool_sessions"] == 0
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        started = time.monotonic()
        with pytest.raises(NoSessionsError, match="no free session slots"):
            sign(started + 0.5)
        assert 0.5 <= time.monotonic() - started < 2.0

        # One slot comes free: the same worker picks it up.
        hog.release(1)
        sign(soon(5))
        assert tpm_status(worker)["pool_sessions"] == 1

        # All free again: the pool grows back to full size.
        hog.release()
        time.sleep(0.25)
        sign(soon(5))
        assert tpm_status(worker)["pool_sessions"] == 2
    finally:
        worker.close()


# --- tpm2-openssl interoperability --------------------------------------------------------

def _tpm2_openssl_available() -> bool:
    """The provider connects to a TPM when it loads, so look for its module instead."""
    if shutil.which("openssl") is None:
        return False
    version = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True)
    modules = version.stdout.partition('"')[2].rstrip().rstrip('"')
    return bool(modules) and (Path(modules) / "tpm2.so").exists()


needs_tpm2_openssl = pytest.mark.skipif(not _tpm2_openssl_available(),
                                        reason="tpm2-openssl provider not installed")


def _openssl(swtpm: Swtpm, *args: str) -> bytes:
    env = dict(os.environ, TPM2OPENSSL_TCTI=swtpm.tcti)
    env.pop("OPENSSL_CONF", None)
    done = subprocess.run(["openssl", *args], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@needs_tpm2_openssl
def test_tpm2_openssl_keys_sign_through_the_worker(swtpm: Swtpm, tmp_path: Path) -> None:
    cases = {"ec": (["-algorithm", "EC", "-pkeyopt", "group:P-256"], b""),
             "ec-pw": (["-algorithm", "EC", "-pkeyopt", "group:P-256",
                        "-pkeyopt", "user-auth:pw"], b"pw"),
             "rsa": (["-algorithm", "RSA", "-pkeyopt", "bits:2048"], b"")}
    made = {}
    for name, (options, _) in cases.items():  # swtpm serves one connection at a time
        path = tmp_path / f"{name}.pem"
        _openssl(swtpm, "genpkey", "-provider", "tpm2", *options, "-out", str(path))
        pubout = _openssl(swtpm, "pkey", "-provider", "tpm2", "-provider", "base",
                          "-in", str(path), "-pubout", "-outform", "DER",
                          *(["-passin", "pass:pw"] if name == "ec-pw" else []))
        made[name] = (pem_to_der(path.read_bytes()), pubout)

    worker = opened(swtpm.tcti)
    try:
        for name, (der, pubout) in made.items():
            info = load_key(worker, KeySource.TSS2_DER, der, soon())
            assert info.public_key == pubout
            scheme = Scheme.ECDSA if info.key_type is KeyType.EC else Scheme.PSS
            digest = digest_of(name.encode(), Hash.SHA256)
            signature = sign_digest(worker, info.key_id, cases[name][1], scheme, Hash.SHA256,
                                    digest, soon())
            verify(pubout, signature, digest, scheme, Hash.SHA256)
    finally:
        worker.close()


@needs_tpm2_openssl
def test_worker_keys_sign_with_tpm2_openssl(swtpm: Swtpm, tmp_path: Path) -> None:
    worker = opened(swtpm.tcti)
    try:
        made = {"ec-pw": generate_key(worker, KeyType.EC, Curve.P256, b"pw", 0, soon()),
                "rsa": generate_key(worker, KeyType.RSA, 2048, b"", 0, soon(60))}
    finally:
        worker.close()
    digest = digest_of(b"signed by tpm2-openssl", Hash.SHA256)
    digest_file = tmp_path / "digest"
    digest_file.write_bytes(digest)
    for name, (der, spki) in made.items():
        key = tmp_path / f"{name}.pem"
        key.write_bytes(der_to_pem(der))
        signature = tmp_path / f"{name}.sig"
        # pkeyutl, not dgst -sign: tpm2-openssl 1.1.1 fails dgst -sign even for its own
        # keys ("missing private key").
        _openssl(swtpm, "pkeyutl", "-provider", "tpm2", "-provider", "base", "-sign",
                 "-inkey", str(key), "-passin", "pass:pw", "-pkeyopt", "digest:sha256",
                 "-in", str(digest_file), "-out", str(signature))
        verify(spki, signature.read_bytes(), digest,
               Scheme.ECDSA if name.startswith("ec") else Scheme.PKCS1, Hash.SHA256)


def test_a_key_unloaded_while_a_session_is_taken_is_named_where_it_is_then(
        swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking a pool session may start one, and starting one may need an object slot (a
    verified TPM's EK made again): the least recently used key is unloaded, perhaps the
    very key the command is for. The command names the key as it is once its session is
    taken, not as it was before."""
    worker = opened(swtpm.tcti)
    try:
        info, spki = _signing_key(worker)
        entry = worker.objects.keys.get(info.key_id)
        assert entry is not None and entry.handle is not None
        acquire = worker.pool.acquire

        def acquire_out_of_room(deadline: float) -> Any:
            worker.objects.unload(entry)  # as a session start short of slots does
            return acquire(deadline)

        monkeypatch.setattr(worker.pool, "acquire", acquire_out_of_room)
        digest = digest_of(b"evicted meanwhile", Hash.SHA256)
        signature = sign_digest(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, digest,
                                soon())
        verify(spki, signature, digest, Scheme.ECDSA, Hash.SHA256)
    finally:
        worker.close()
