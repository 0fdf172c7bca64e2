"""A malicious broker: speaks the wire protocol on a Unix socket and lies on purpose.

It answers HELLO and LOAD as the broker does (with the public key of a software key it
holds, written into a TSS2 PRIVATE KEY file by `key_file`), and answers SIGN with one
of the misbehaviours in MISBEHAVIOURS, chosen by `FakeBroker.behaviour`. The behaviour
`honest` signs correctly: it shows the fake is a fair broker apart from its lies.

A misbehaviour returns a list of actions: bytes to write, a float to sleep, or one of
"close", "reset" (close with RST), "hang" (keep the connection open, answer nothing).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tpmbroker import protocol as p
from tpmbroker.errors import Status
from tpmbroker.ops.hello import Hello, HelloResult
from tpmbroker.ops.load import Load, LoadResult
from tpmbroker.ops.random import RandomResult
from tpmbroker.ops.sign import Sign, SignResult

Action = bytes | float | str

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def key_file(public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    """A TSS2 PRIVATE KEY (PEM) whose public part is `public` (the private part is junk:
    only the fake broker will ever see it)."""
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = TPM2B_PUBLIC.from_pem(pem)
    data: bytes = TSSPrivKey(TPM2B_PRIVATE(bytes(48)), pub, empty_auth=True,
                             parent=p.STORAGE_PRIMARY).to_pem()
    return data


def _der_int(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8 or 1, "big", signed=v < 0)
    return b"\x02" + bytes([len(raw)]) + raw


def _der_sig(r_der: bytes, s_der: bytes) -> bytes:
    body = r_der + s_der
    return b"\x30" + bytes([len(body)]) + body


@dataclass
class Request:
    """What a misbehaviour sees: the SIGN (or other) request and the fake's keys."""

    request_id: int
    opcode: int
    msg: p.Message
    fake: FakeBroker
    sign_count: int = 0

    def ok(self, result: p.Message, request_id: int | None = None,
           opcode: int | None = None) -> bytes:
        return p.encode_response(self.request_id if request_id is None else request_id,
                                 self.opcode if opcode is None else opcode, result)

    def error(self, status: int, message: str = "no", request_id: int | None = None,
              opcode: int | None = None) -> bytes:
        return p.encode_response(self.request_id if request_id is None else request_id,
                                 self.opcode if opcode is None else opcode,
                                 p.ErrorResult(status, message))

    @property
    def digest(self) -> bytes:
        assert isinstance(self.msg, Sign)
        return self.msg.digest

    def true_signature(self, digest: bytes | None = None) -> bytes:
        assert isinstance(self.msg, Sign)
        digest = self.digest if digest is None else digest
        hash_cls: dict[p.Hash, Callable[[], hashes.HashAlgorithm]] = {
            p.Hash.SHA1: hashes.SHA1, p.Hash.SHA256: hashes.SHA256,
            p.Hash.SHA384: hashes.SHA384, p.Hash.SHA512: hashes.SHA512}
        algorithm = utils.Prehashed(hash_cls[p.Hash(self.msg.hash)]())
        key = self.fake.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(digest, ec.ECDSA(algorithm))
        return key.sign(digest, padding.PKCS1v15(), algorithm)

    def sig(self, signature: bytes) -> bytes:
        return self.ok(SignResult(signature))

    def rs(self) -> tuple[int, int]:
        return utils.decode_dss_signature(self.true_signature())


def _frame(length: int, version: int = p.VERSION, opcode: int = p.Opcode.SIGN | 0x80,
           flags: int = 0, request_id: int = 1, body: bytes = b"") -> bytes:
    return struct.pack(">IBBHII", length, version, opcode, flags, request_id, 0) + body


def _raw_sign_answer(q: Request, body: bytes, **kw: int) -> bytes:
    header = {"version": p.VERSION, "opcode": p.Opcode.SIGN | 0x80, "flags": 0,
              "request_id": q.request_id}
    header.update(kw)
    return _frame(12 + len(body), body=body, **header)


def _ok_body(signature: bytes) -> bytes:
    return struct.pack(">HH", Status.OK, len(signature)) + signature


def _other_key_signature(q: Request) -> bytes:
    other = ec.generate_private_key(ec.SECP256R1())
    return other.sign(q.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def _p384_signature(q: Request) -> bytes:
    other = ec.generate_private_key(ec.SECP384R1())
    return other.sign(q.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def _long_form_der(q: Request) -> bytes:
    sig = q.true_signature()
    return b"\x30\x81" + bytes([len(sig) - 2]) + sig[2:]


def _padded_r(q: Request) -> bytes:
    r, s = q.rs()
    raw = r.to_bytes((r.bit_length() + 8) // 8, "big")
    return _der_sig(b"\x02" + bytes([len(raw) + 1]) + b"\0" + raw, _der_int(s))


def _negative_r(q: Request) -> bytes:
    r, s = q.rs()
    return _der_sig(_der_int(-r), _der_int(s))


# name -> what to do with a SIGN; every one but `honest` must be refused by the client.
MISBEHAVIOURS: dict[str, Callable[[Request], list[Action]]] = {
    # signatures that are not signatures
    "empty-signature": lambda q: [q.sig(b"")],
    "garbage-72": lambda q: [q.sig(os.urandom(72))],
    "garbage-4096": lambda q: [q.sig(os.urandom(4096))],
    "garbage-der-like": lambda q: [q.sig(b"\x30\x44\x02\x20" + os.urandom(68))],
    "digest-echoed": lambda q: [q.sig(q.digest)],
    "rsa-sized-for-ec": lambda q: [q.sig(os.urandom(256))],
    "r-zero": lambda q: [q.sig(_der_sig(_der_int(0), _der_int(q.rs()[1])))],
    "s-zero": lambda q: [q.sig(_der_sig(_der_int(q.rs()[0]), _der_int(0)))],
    "r-equals-n": lambda q: [q.sig(_der_sig(_der_int(P256_ORDER), _der_int(q.rs()[1])))],
    "s-equals-n": lambda q: [q.sig(_der_sig(_der_int(q.rs()[0]), _der_int(P256_ORDER)))],
    "r-plus-n": lambda q: [q.sig(_der_sig(_der_int(q.rs()[0] + P256_ORDER),
                                          _der_int(q.rs()[1])))],
    "s-huge": lambda q: [q.sig(_der_sig(_der_int(q.rs()[0]), _der_int(1 << 600)))],
    "r-negative": lambda q: [q.sig(_negative_r(q))],
    "r-one-s-one": lambda q: [q.sig(utils.encode_dss_signature(1, 1))],
    "r-s-swapped": lambda q: [q.sig(utils.encode_dss_signature(q.rs()[1], q.rs()[0]))],
    "wrong-digest": lambda q: [q.sig(q.true_signature(bytes(len(q.digest))))],
    "other-key": lambda q: [q.sig(_other_key_signature(q))],
    "p384-signature": lambda q: [q.sig(_p384_signature(q))],
    "der-long-form-length": lambda q: [q.sig(_long_form_der(q))],
    "der-padded-integer": lambda q: [q.sig(_padded_r(q))],
    "der-trailing-bytes": lambda q: [q.sig(q.true_signature() + b"\0")],
    "der-truncated": lambda q: [q.sig(q.true_signature()[:-1])],
    # frames that do not frame
    "truncated-then-close": lambda q: [q.sig(q.true_signature())[:20], 0.05, "close"],
    "truncated-then-hang": lambda q: [q.sig(q.true_signature())[:20], "hang"],
    "half-header-then-close": lambda q: [q.sig(q.true_signature())[:8], 0.05, "close"],
    "close-without-answer": lambda q: ["close"],
    "reset-without-answer": lambda q: ["reset"],
    "never-answer": lambda q: ["hang"],
    "slow-drip": lambda q: [*(bytes([b]) for b in q.sig(q.true_signature())), "drip"],
    "length-huge": lambda q: [_frame(0xFFFFFFFF, request_id=q.request_id), "hang"],
    "length-below-header": lambda q: [_frame(4, request_id=q.request_id), "hang"],
    "length-over-max-frame": lambda q: [_frame(p.MAX_FRAME - 3, request_id=q.request_id),
                                        "hang"],
    "length-longer-than-body": lambda q: [
        _frame(12 + 200, request_id=q.request_id, body=_ok_body(q.true_signature())), "hang"],
    "body-field-overruns": lambda q: [_raw_sign_answer(
        q, struct.pack(">HH", Status.OK, 200) + q.true_signature())],
    "body-trailing-bytes": lambda q: [_raw_sign_answer(
        q, _ok_body(q.true_signature()) + b"\0\0")],
    "body-empty": lambda q: [_raw_sign_answer(q, b"")],
    "ok-status-no-fields": lambda q: [_raw_sign_answer(q, struct.pack(">H", Status.OK))],
    # headers that lie
    "wrong-version": lambda q: [_raw_sign_answer(q, _ok_body(q.true_signature()),
                                                 version=2)],
    "nonzero-flags": lambda q: [_raw_sign_answer(q, _ok_body(q.true_signature()), flags=1)],
    "wrong-request-id": lambda q: [q.ok(SignResult(q.true_signature()),
                                        request_id=q.request_id + 1), "hang"],
    "request-id-zero-ok": lambda q: [q.ok(SignResult(q.true_signature()), request_id=0),
                                     "hang"],
    "opcode-without-response-bit": lambda q: [_raw_sign_answer(
        q, _ok_body(q.true_signature()), opcode=p.Opcode.SIGN)],
    "opcode-of-random": lambda q: [q.ok(RandomResult(q.true_signature()),
                                        opcode=p.Opcode.RANDOM)],
    "opcode-of-hello": lambda q: [q.ok(HelloResult(1, "fake", p.MAX_FRAME),
                                       opcode=p.Opcode.HELLO)],
    "opcode-unknown": lambda q: [_raw_sign_answer(q, _ok_body(q.true_signature()),
                                                  opcode=0xEE)],
    # connection errors and frames nobody asked for
    "connection-error-no-close": lambda q: [
        q.error(Status.MALFORMED, "bad frame", request_id=0, opcode=p.CONNECTION_ERROR),
        "hang"],
    "connection-error-then-close": lambda q: [
        q.error(Status.TOO_LARGE, "too large", request_id=0, opcode=p.CONNECTION_ERROR),
        "close"],
    "connection-error-deadline-status": lambda q: [
        q.error(Status.DEADLINE, "late", request_id=0, opcode=p.CONNECTION_ERROR), "hang"],
    "unsolicited-before-answer": lambda q: [
        q.ok(SignResult(q.true_signature()), request_id=q.request_id + 7),
        q.sig(q.true_signature())],
    "unknown-status": lambda q: [q.error(999, "what")],
    "error-message-not-utf8": lambda q: [_raw_sign_answer(
        q, struct.pack(">HIH", Status.TPM_ERROR, 0x101, 2) + b"\xff\xfe")],
    "flood": lambda q: [os.urandom(65536) for _ in range(8)],
}

def _rsa_above_modulus(q: Request) -> bytes:
    key = q.fake.key
    assert isinstance(key, rsa.RSAPrivateKey)
    n = key.public_key().public_numbers().n
    return (n + 1).to_bytes(key.key_size // 8, "big")


# the same for an RSA key
RSA_MISBEHAVIOURS: dict[str, Callable[[Request], list[Action]]] = {
    "rsa-one-byte-short": lambda q: [q.sig(q.true_signature()[1:])],
    "rsa-one-byte-long": lambda q: [q.sig(b"\0" + q.true_signature())],
    "rsa-empty": lambda q: [q.sig(b"")],
    "rsa-garbage-modulus-long": lambda q: [q.sig(b"\x01" + os.urandom(255))],
    "rsa-above-modulus": lambda q: [q.sig(_rsa_above_modulus(q))],
    "rsa-wrong-digest": lambda q: [q.sig(q.true_signature(bytes(len(q.digest))))],
    "rsa-der-ecdsa": lambda q: [q.sig(utils.encode_dss_signature(5, 7))],
}

# answered correctly, then a frame nobody asked for: the signature is good, the
# connection must not be used again
UNSOLICITED_AFTER = "answer-then-unsolicited"
MISBEHAVIOURS[UNSOLICITED_AFTER] = lambda q: [q.sig(q.true_signature())
                                              + q.sig(os.urandom(72))]
# the same, the frame nobody asked for coming a moment later, while the connection idles
UNSOLICITED_LATER = "answer-then-unsolicited-later"
MISBEHAVIOURS[UNSOLICITED_LATER] = lambda q: [q.sig(q.true_signature()), 0.1,
                                              q.sig(os.urandom(72))]


def _honest(q: Request) -> list[Action]:
    return [q.sig(q.true_signature())]


@dataclass
class FakeBroker:
    """The malicious broker; `behaviour` picks the SIGN misbehaviour (or `honest`)."""

    path: str
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    behaviour: str = "honest"
    lie_on_load: str = ""  # "", "other-public-key", "other-key-id"
    # HELLOs answered SHUTTING_DOWN first, as by a broker stopping as the connection came
    stopping_hellos: int = 0
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _conns: list[socket.socket] = field(default_factory=list)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self._conns)

    def key_pem(self) -> bytes:
        return key_file(self.key.public_key())

    def __enter__(self) -> FakeBroker:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(64)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        Path(self.path).unlink(missing_ok=True)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _answer(self, q: Request) -> list[Action]:
        msg = q.msg
        if isinstance(msg, Hello):
            if self.stopping_hellos > 0:
                self.stopping_hellos -= 1
                return [q.error(Status.SHUTTING_DOWN, "the broker is shutting down"), "close"]
            return [q.ok(HelloResult(p.VERSION, "fake-broker", p.MAX_FRAME))]
        if isinstance(msg, Load):
            public = self.key.public_key()
            if self.lie_on_load == "other-public-key":
                public = ec.generate_private_key(ec.SECP256R1()).public_key()
            spki = public.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
            key_id = p.key_id_for(p.KeySource(msg.source), msg.key)
            if self.lie_on_load == "other-key-id":
                key_id = bytes(32)
            if isinstance(self.key, ec.EllipticCurvePrivateKey):
                result = LoadResult(key_id, p.KeyType.EC, self.key.curve.key_size,
                                        p.Curve.P256 if self.key.curve.key_size == 256
                                        else p.Curve.P384, spki)
            else:
                result = LoadResult(key_id, p.KeyType.RSA, self.key.key_size,
                                        p.Curve.NONE, spki)
            return [q.ok(result)]
        if isinstance(msg, Sign):
            if self.lie_on_load == "other-public-key":
                other = ec.generate_private_key(ec.SECP256R1())
                return [q.sig(other.sign(msg.digest,
                                         ec.ECDSA(utils.Prehashed(hashes.SHA256()))))]
            if self.behaviour == "honest":
                return _honest(q)
            return {**MISBEHAVIOURS, **RSA_MISBEHAVIOURS}[self.behaviour](q)
        return [q.error(Status.UNSUPPORTED, "the fake broker does not do that")]

    def _serve(self, conn: socket.socket) -> None:
        reader = p.FrameReader()
        signs = 0
        try:
            while not self._stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                for header, body in reader.feed(data):
                    msg = p.decode_request(header, body)
                    if isinstance(msg, Sign):
                        signs += 1
                    q = Request(header.request_id, header.opcode, msg, self, signs)
                    if not self._act(conn, self._answer(q)):
                        return
        except OSError:
            return

    def _act(self, conn: socket.socket, actions: list[Action]) -> bool:
        """Carries out the actions; False when the connection is finished with."""
        drip = "drip" in actions
        for action in actions:
            if isinstance(action, bytes):
                try:
                    conn.sendall(action)
                except OSError:
                    return False
                if drip:
                    self._stop.wait(0.25)
            elif isinstance(action, float):
                self._stop.wait(action)
            elif action == "close":
                conn.close()
                return False
            elif action == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return False
            elif action == "hang":
                self._stop.wait()
                return False
        return True
