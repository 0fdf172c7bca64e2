"""Authorized commands (session crypto in the broker, raw commands) against a real swtpm,
with the C arithmetic and with the Python oracle."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT, TPM2_SE, TPMA_SESSION
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
)

from tpmbroker.errors import AuthFailedError, TpmError
from tpmbroker.procedures.generate import generate_key
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign import sign as sign_digest
from tpmbroker.procedures.status import status as tpm_status
from tpmbroker.protocol import Curve, Hash, KeySource, KeyType, Scheme
from tpmbroker.simulator import Swtpm
from tpmbroker.templates import storage_parent_template
from tpmbroker.tpm import KeyInfo, TpmWorker, command, reference
from tpmbroker.tpm import link as tpm_link
from tpmbroker.tpm import session_crypto as sc
from tpmbroker.tpm.rc import Kind, classify

AUTH_FAIL_SESSION_1 = 0x98E
ECDSA, RSASSA, RSAPSS = int(TPM2_ALG.ECDSA), int(TPM2_ALG.RSASSA), int(TPM2_ALG.RSAPSS)
SHA256 = int(TPM2_ALG.SHA256)
PASSWORD = b"correct horse"
SIGNING_KEY = "sign|userwithauth|fixedtpm|fixedparent|sensitivedataorigin"


@dataclass
class Key:
    handle: int  # TPM handle
    tr: Any  # ESYS_TR
    name: bytes
    public: Any  # TPMT_PUBLIC

    def verify(self, signature: bytes, digest: bytes, scheme: int = ECDSA) -> None:
        public = load_der_public_key(self.public.to_der())
        prehashed = utils.Prehashed(hashes.SHA256())
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(prehashed))
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            pad: padding.AsymmetricPadding = padding.PKCS1v15() if scheme == RSASSA else \
                padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            public.verify(signature, digest, pad, prehashed)


class Tpm:
    """A swtpm reached through one persistent link that ESAPI and raw commands share."""

    def __init__(self, swtpm: Swtpm, rsa_primary: bool = False) -> None:
        self.transport, tcti = tpm_link.open_transport(swtpm.tcti)
        self.esapi = ESAPI(tcti)
        template = storage_parent_template(rsa=rsa_primary)
        self.primary, public, *_ = self.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template), ESYS_TR.RH_OWNER)
        self.primary_public = public.publicArea
        self.primary_handle = int(self.esapi.tr_get_tpm_handle(self.primary))

    def key(self, alg: str = "ecc256", password: bytes = PASSWORD) -> Key:
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(password)))
        private, public, *_ = self.esapi.create(
            self.primary, sensitive, TPM2B_PUBLIC.parse(alg, objectAttributes=SIGNING_KEY))
        tr = self.esapi.load(self.primary, private, public)
        self.esapi.tr_set_auth(tr, password)
        return Key(int(self.esapi.tr_get_tpm_handle(tr)), tr, bytes(public.get_name()),
                   public.publicArea)

    def session(self) -> sc.SessionState:
        return command.start_salted_session(self.transport, self.primary_handle,
                                            self.primary_public)

    def sign(self, session: sc.SessionState, key: Key, digest: bytes,
             password: bytes = PASSWORD, scheme: int = ECDSA) -> bytes:
        return command.sign(self.transport, session, key.handle, key.name, password, digest,
                            scheme, SHA256)

    def close(self) -> None:
        self.esapi.close()


@pytest.fixture(autouse=True, params=["c", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the C session arithmetic and with the Python oracle."""
    if request.param == "python":
        for name in ("prepare", "finish", "signature_bytes"):
            monkeypatch.setattr(command, name, getattr(reference, name))
    return str(request.param)


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[Tpm]:
    t = Tpm(swtpm)
    try:
        yield t
    finally:
        t.close()


class Recorder:
    """A transport that keeps the last command and may alter responses."""

    def __init__(self, inner: command.Transport) -> None:
        self.inner = inner
        self.commands: list[bytes] = []
        self.responses: list[bytes] = []
        self.tamper: int | None = None  # index from the end of the response to flip

    def transact(self, command: bytes) -> bytes:
        self.commands.append(command)
        response = self.inner.transact(command)
        if self.tamper is not None and len(response) > 10:  # not a bare response code
            altered = bytearray(response)
            altered[-self.tamper] ^= 0x01
            response = bytes(altered)
        self.responses.append(response)
        return response


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_signatures_verify(tpm: Tpm) -> None:
    key = tpm.key()
    session = tpm.session()
    for i in range(20):
        digest = digest_of(b"message %d" % i)
        key.verify(tpm.sign(session, key, digest), digest)


@pytest.mark.parametrize("scheme", [RSASSA, RSAPSS])
def test_rsa_signatures_verify(tpm: Tpm, scheme: int) -> None:
    key = tpm.key("rsa2048")
    session = tpm.session()
    digest = digest_of(b"rsa")
    signature = tpm.sign(session, key, digest, scheme=scheme)
    assert len(signature) == 256
    key.verify(signature, digest, scheme)


def test_session_salted_to_an_rsa_primary(swtpm: Swtpm) -> None:
    t = Tpm(swtpm, rsa_primary=True)
    try:
        key = t.key()
        digest = digest_of(b"rsa salt")
        key.verify(t.sign(t.session(), key, digest), digest)
    finally:
        t.close()


def test_ours_and_esys_sign_the_same_digest_with_the_same_key(tpm: Tpm) -> None:
    key = tpm.key()
    digest = digest_of(b"same")
    ours = tpm.sign(tpm.session(), key, digest)

    esys_session = tpm.esapi.start_auth_session(
        tpm.primary, ESYS_TR.NONE, TPM2_SE.HMAC, command.aes128_cfb(), TPM2_ALG.SHA256)
    tpm.esapi.trsess_set_attributes(
        esys_session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT)
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    esys = bytes(tpm.esapi.sign(key.tr, TPM2B_DIGEST(digest), scheme, session1=esys_session))

    key.verify(ours, digest)
    key.verify(esys, digest)
    assert ours != esys  # ECDSA: a fresh nonce each time
    with pytest.raises(InvalidSignature):
        key.verify(ours, digest_of(b"other"))


def test_wrong_password_is_auth_fail_and_the_session_lives_on(tpm: Tpm) -> None:
    key = tpm.key()
    session = tpm.session()
    with pytest.raises(TSS2_Exception) as failure:
        tpm.sign(session, key, digest_of(b"x"), password=b"wrong")
    assert int(failure.value.rc) == AUTH_FAIL_SESSION_1
    assert classify(failure.value) is Kind.AUTH
    assert session.usable  # the TPM refused before touching the nonces
    digest = digest_of(b"y")
    key.verify(tpm.sign(session, key, digest), digest)


def test_password_trailing_zeros_are_ignored_like_the_tpm_does(tpm: Tpm) -> None:
    key = tpm.key(password=b"pw")
    digest = digest_of(b"z")
    key.verify(tpm.sign(tpm.session(), key, digest, password=b"pw\0\0"), digest)


def test_key_without_password(tpm: Tpm) -> None:
    key = tpm.key(password=b"")
    digest = digest_of(b"no password")
    key.verify(tpm.sign(tpm.session(), key, digest, password=b""), digest)


@pytest.mark.parametrize("where", [1, 5, 40])  # response HMAC, its nonce, the signature
def test_tampered_response_is_rejected(tpm: Tpm, where: int) -> None:
    key = tpm.key()
    session = tpm.session()
    tpm.sign(session, key, digest_of(b"warm up"))
    recorder = Recorder(tpm.transport)
    recorder.tamper = where
    with pytest.raises(command.ResponseAuthError):
        command.sign(recorder, session, key.handle, key.name, PASSWORD, digest_of(b"t"), ECDSA,
                     SHA256)
    # The outcome is unknown: the session must not send another HMAC.
    assert not session.usable
    with pytest.raises(TSS2_Exception):
        tpm.sign(session, key, digest_of(b"u"))


def test_nonces_roll_and_the_digest_travels_encrypted(tpm: Tpm) -> None:
    key = tpm.key()
    session = tpm.session()
    recorder = Recorder(tpm.transport)
    digest = digest_of(b"secret digest")
    seen_tpm = {session.nonce_tpm}
    for _ in range(5):
        command.sign(recorder, session, key.handle, key.name, PASSWORD, digest, ECDSA, SHA256)
        assert session.nonce_tpm not in seen_tpm
        seen_tpm.add(session.nonce_tpm)
    caller_nonces = set()
    for sent in recorder.commands:
        assert digest not in sent
        # Authorization area: size, session handle, nonceCaller (TPM2B), attributes, HMAC.
        offset = 10 + 4 + 4 + 4
        (size,) = struct.unpack_from(">H", sent, offset)
        caller_nonces.add(sent[offset + 2:offset + 2 + size])
        assert sent[offset + 2 + size] == sc.CONTINUE_SESSION | sc.DECRYPT
    assert len(caller_nonces) == 5


def test_replayed_command_is_refused(tpm: Tpm) -> None:
    key = tpm.key()
    session = tpm.session()
    recorder = Recorder(tpm.transport)
    tpm.sign(session, key, digest_of(b"warm up"))  # libtpms' first ECDSA answers RETRY
    command.sign(recorder, session, key.handle, key.name, PASSWORD, digest_of(b"r"), ECDSA, SHA256)
    response = tpm.transport.transact(recorder.commands[-1])
    assert command.response_code(response) & 0xBF == 0x08E  # the old nonceTPM: AUTH_FAIL


def test_response_parameter_decryption(tpm: Tpm) -> None:
    """TPM2_ReadPublic through an encrypt session: outPublic (a sized buffer) comes back
    encrypted and decrypts to the key's public area."""
    key = tpm.key()
    session = tpm.session()
    recorder = Recorder(tpm.transport)
    pending = command.prepare(session, 0x173, (key.handle,), (key.name,), b"", None, b"",
                              sc.CONTINUE_SESSION | sc.ENCRYPT)
    _, parameters = command.execute(recorder, pending)
    out_public, _ = TPM2B_PUBLIC.unmarshal(parameters)
    assert out_public.publicArea.marshal() == key.public.marshal()
    assert parameters == command.plain_command(0x173, (key.handle,), b"", tpm.transport)
    assert key.public.marshal() not in recorder.responses[-1]


def test_two_sessions_from_two_threads(tpm: Tpm) -> None:
    key = tpm.key()
    sessions = [tpm.session(), tpm.session()]
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def signer(session: sc.SessionState, tag: int) -> None:
        try:
            for i in range(40):
                digest = digest_of(b"%d-%d" % (tag, i))
                signature = tpm.sign(session, key, digest)
                with lock:
                    results.append((digest, signature))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=signer, args=(s, n)) for n, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 80
    for digest, signature in results:
        key.verify(signature, digest)


def test_flushed_session_is_reported_lost(tpm: Tpm) -> None:
    key = tpm.key()
    session = tpm.session()
    command.flush_context(tpm.transport, session.handle)
    with pytest.raises(TSS2_Exception) as failure:
        tpm.sign(session, key, digest_of(b"gone"))
    assert classify(failure.value) is Kind.LOST


def test_read_clock_counts_a_restart(swtpm: Swtpm) -> None:
    link, _ = tpm_link.open_transport(swtpm.tcti)
    before = command.read_clock(link)
    swtpm.restart()
    with pytest.raises(TSS2_Exception) as failure:
        command.read_clock(link)  # the old connection died with the process
    assert classify(failure.value) is Kind.TRANSPORT
    after = command.read_clock(link)  # reconnects
    assert after[0] == before[0] + 1


def test_tss2_tcti_transport_works_too(swtpm: Swtpm) -> None:
    """Through tss2's own swtpm TCTI (a new connection per command) instead of ours."""
    link, tcti = tpm_link.open_transport(swtpm.tcti, persistent=False)
    esapi = ESAPI(tcti)
    try:
        primary, public, *_ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=storage_parent_template(rsa=False)),
            ESYS_TR.RH_OWNER)
        private, key_public, *_ = esapi.create(
            primary, TPM2B_SENSITIVE_CREATE(),
            TPM2B_PUBLIC.parse("ecc256", objectAttributes=SIGNING_KEY))
        tr = esapi.load(primary, private, key_public)
        key = Key(int(esapi.tr_get_tpm_handle(tr)), tr, bytes(key_public.get_name()),
                  key_public.publicArea)
        session = command.start_salted_session(link, int(esapi.tr_get_tpm_handle(primary)),
                                               public.publicArea)
        digest = digest_of(b"tcti")
        key.verify(command.sign(link, session, key.handle, key.name, b"", digest, ECDSA, SHA256),
                   digest)
    finally:
        esapi.close()


# --- the worker on either path ------------------------------------------------------------

def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def opened_worker(tcti: str) -> TpmWorker:
    worker = TpmWorker(tcti, sessions=2)
    worker.open(soon())
    return worker


def worker_sign(worker: TpmWorker, info: KeyInfo, digest: bytes, auth: bytes = b"",
                scheme: Scheme = Scheme.ECDSA) -> bytes:
    return sign_digest(worker, info.key_id, auth, scheme, Hash.SHA256, digest, soon())


def verify_spki(spki: bytes, signature: bytes, digest: bytes,
                scheme: Scheme = Scheme.ECDSA) -> None:
    public = load_der_public_key(spki)
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(prehashed))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert scheme is Scheme.PKCS1
        public.verify(signature, digest, padding.PKCS1v15(), prehashed)


def test_worker_keys_load_and_sign_in_another_worker(swtpm: Swtpm) -> None:
    """Keys made with raw TPM2_Create (the password encrypted on its way) load and sign
    in a second worker on the same TPM."""
    digest = digest_of(b"two workers")
    worker = opened_worker(swtpm.tcti)
    try:
        made = {"ec": generate_key(worker, KeyType.EC, Curve.P256, PASSWORD, 0, soon()),
                "rsa": generate_key(worker, KeyType.RSA, 2048, b"", 0, soon(60))}
    finally:
        worker.close()
    worker = opened_worker(swtpm.tcti)
    try:
        for kind, (der, spki) in made.items():
            info = load_key(worker, KeySource.TSS2_DER, der, soon())
            auth, scheme = (PASSWORD, Scheme.ECDSA) if kind == "ec" else (b"", Scheme.PKCS1)
            verify_spki(spki, worker_sign(worker, info, digest, auth, scheme), digest, scheme)
    finally:
        worker.close()


def test_worker_wrong_password(swtpm: Swtpm) -> None:
    worker = opened_worker(swtpm.tcti)
    try:
        der, spki = generate_key(worker, KeyType.EC, Curve.P256, PASSWORD, 0, soon())
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        # The right password first: once a wrong one has counted, the broker's shield
        # (tpm/lockout.py) lets no untried password through until the count decays.
        digest = digest_of(b"right")
        verify_spki(spki, worker_sign(worker, info, digest, PASSWORD), digest)
        with pytest.raises(AuthFailedError) as failure:
            worker_sign(worker, info, digest_of(b"w"), b"wrong")
        assert failure.value.tpm_rc == 0x08E
        verify_spki(spki, worker_sign(worker, info, digest, PASSWORD), digest)
        assert tpm_status(worker)["tpm_active_sessions"] == 2
    finally:
        worker.close()


def test_worker_replaces_a_session_after_a_forged_response(swtpm: Swtpm) -> None:
    worker = opened_worker(swtpm.tcti)
    try:
        der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        worker_sign(worker, info, digest_of(b"warm up"))
        link = worker.link.transport
        assert link is not None
        forger = Recorder(link)
        forger.tamper = 40
        worker.link.transport = forger  # type: ignore[assignment]
        with pytest.raises(TpmError):
            worker_sign(worker, info, digest_of(b"forged"))
        worker.link.transport = link
        assert tpm_status(worker)["pool_sessions"] == 1  # the distrusted session is gone
        for i in range(4):
            digest = digest_of(b"after %d" % i)
            verify_spki(spki, worker_sign(worker, info, digest), digest)
        status = tpm_status(worker)
        assert status["pool_sessions"] == status["tpm_active_sessions"] == 2
    finally:
        worker.close()


def lockout_counter(ectx: Any) -> int:
    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
    return int(data.data.tpmProperties[0].value)


def test_worker_survives_a_tpm_reset_without_lockout_failures(swtpm: Swtpm) -> None:
    worker = opened_worker(swtpm.tcti)
    try:
        der, spki = generate_key(worker, KeyType.EC, Curve.P256, b"", 0, soon())
        info = load_key(worker, KeySource.TSS2_DER, der, soon())
        worker_sign(worker, info, digest_of(b"before"))
        swtpm.restart()
        # A reset without TPM2_Shutdown counts one failure by itself (TPM Part 1,
        # dictionary attack protection); our recovery must add none.
        with ESAPI(swtpm.tcti) as ectx:
            before = lockout_counter(ectx)
        digest = digest_of(b"after reset")
        verify_spki(spki, worker_sign(worker, info, digest), digest)
        assert tpm_status(worker)["tpm_restarts_recovered"] == 1
        assert lockout_counter(worker.link.ectx) == before
    finally:
        worker.close()


# --- the persistent swtpm link against a scripted peer (error paths) ----------------------

def scripted_swtpm(replies: list[list[bytes]]) -> tuple[int, threading.Thread]:
    """A loopback server that answers each command frame with the given pieces, sent one
    by one, and closes when the script ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                for pieces in replies:
                    header = conn.recv(9)
                    if len(header) < 9:
                        return
                    (length,) = struct.unpack_from(">I", header, 5)
                    conn.recv(length, socket.MSG_WAITALL)
                    for piece in pieces:
                        conn.sendall(piece)
                        time.sleep(0.01)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


READ_CLOCK_RESPONSE = struct.pack(">HII", 0x8001, 35, 0) + bytes(16) + struct.pack(
    ">IIB", 7, 3, 1)


def test_swtpm_link_reassembles_a_response_sent_in_pieces() -> None:
    framed = struct.pack(">I", len(READ_CLOCK_RESPONSE)) + READ_CLOCK_RESPONSE + bytes(4)
    port, thread = scripted_swtpm([[framed[:2], framed[2:20], framed[20:]]])
    link = tpm_link.SwtpmSocket("127.0.0.1", port, timeout=5)
    try:
        assert command.read_clock(link) == (7, 3)
    finally:
        link.close()
        thread.join(5)


@pytest.mark.parametrize("reply", [
    b"",  # the peer closes without answering
    struct.pack(">I", 5000),  # longer than any TPM response
    struct.pack(">I", len(READ_CLOCK_RESPONSE)) + READ_CLOCK_RESPONSE + b"\0\0\0\1",  # bad ack
], ids=["closed", "oversized", "bad-ack"])
def test_swtpm_link_failures_are_transport_errors(reply: bytes) -> None:
    port, thread = scripted_swtpm([[reply] if reply else []])
    link = tpm_link.SwtpmSocket("127.0.0.1", port, timeout=5)
    try:
        with pytest.raises(TSS2_Exception) as failure:
            command.read_clock(link)
        assert classify(failure.value) is Kind.TRANSPORT
    finally:
        link.close()
        thread.join(5)


def test_ecdh_zgen_result_reads_x_and_refuses_any_other_layout() -> None:
    """outPoint is TPM2B_ECC_POINT(size, TPM2B x, TPM2B y), as tpm2-pytss marshals it."""
    from tpm2_pytss.types import TPM2B_ECC_POINT, TPMS_ECC_POINT

    x, y = bytes(range(1, 33)), bytes(range(33, 65))
    good = bytes(TPM2B_ECC_POINT(TPMS_ECC_POINT(x=x, y=y)).marshal())
    assert command.ecdh_zgen_result(good) == x
    for bad in (good[:-1], good + b"\0", good[:1], b"", good[:2] + b"\x00\x40" + good[4:],
                struct.pack(">H", len(good) - 1) + good[2:]):
        with pytest.raises(TSS2_Exception):
            command.ecdh_zgen_result(bad)
