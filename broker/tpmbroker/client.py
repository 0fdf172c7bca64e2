"""Synchronous broker client: thread-safe, fork-safe, reconnecting, with deadlines.

A Client keeps a small pool of connections; each request borrows one for its
round trip, so threads never interleave on a socket. Keys are remembered by the
client, not the connection: a connection that has not loaded a key yet (a new
one, or one to a restarted broker) answers UNKNOWN_KEY, and the client loads the
key there and retries. After fork() the child drops the parent's connections
and opens its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from . import protocol as p
from .definitions import CURVES, REPEATABLE
from .errors import (
    BadKeyError,
    BrokerUnavailableError,
    DeadlineError,
    ProtocolError,
    ShuttingDownError,
    TpmBrokerError,
    UnknownKeyError,
    UnsupportedError,
    error_for_status,
)
from .keyref import KeySpec
from .ops.certify import Certify, CertifyResult
from .ops.decrypt import Decrypt, DecryptResult
from .ops.derive import Derive, DeriveResult
from .ops.generate import Generate, GenerateResult
from .ops.hello import Hello, HelloResult
from .ops.import_key import Import, ImportResult
from .ops.load import LoadResult
from .ops.nv_read import NvRead, NvReadResult
from .ops.pcr_read import PcrRead, PcrReadResult
from .ops.persistence import Evict, EvictResult, KeysRequest, KeysResult, Persist, PersistResult
from .ops.random import Random, RandomResult
from .ops.sign import Sign, SignResult
from .ops.sign_message import SignMessage, SignMessageResult
from .ops.status import StatusRequest, StatusResult
from .paths import default_socket
from .verification import check_signature, public_key
from .version import __version__

if TYPE_CHECKING:
    pass

DEFAULT_TIMEOUT = 30.0
# A request a restarting broker could not serve is sent again after RETRY_FIRST seconds,
# doubling to RETRY_MAX; a broker's socket may be away for RESTART_GRACE seconds.
RETRY_FIRST = 0.01
RETRY_MAX = 0.25
RESTART_GRACE = 3.0
MAX_LOST_CONNECTIONS = 2  # a request goes out at most this many times more after a loss


@dataclasses.dataclass(frozen=True)
class LoadedKey:
    """A key the broker knows. Holds what is needed to load it again anywhere."""

    spec: KeySpec
    key_id: bytes
    key_type: p.KeyType
    bits: int
    curve: p.Curve
    public_key: bytes  # SubjectPublicKeyInfo DER

    def __repr__(self) -> str:
        return (f"LoadedKey({self.key_type.name}, {self.bits} bits, "
                f"id={self.key_id[:6].hex()}…)")


class _Connection:
    def __init__(self, path: str, deadline: float) -> None:
        self.sock = self._connect(path, deadline)
        self.reader = p.FrameReader()
        # key id -> the password it was loaded with here: the broker signs with that one
        self.loaded: dict[bytes, bytes] = {}
        self.next_id = 1
        self.broken = False  # never returned to the pool

    @staticmethod
    def _connect(path: str, deadline: float) -> socket.socket:
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                # EAGAIN: the listen backlog is full for a moment; a broker is there.
                sock.close()
                if time.monotonic() + delay >= deadline:
                    raise DeadlineError(f"tpmbroker at {path} is too busy to accept a "
                                        "connection before the deadline") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                sock.close()
                raise BrokerUnavailableError(
                    f"cannot reach tpmbroker at {path}: {exc.strerror or exc}; is `tpmbroker "
                    f"serve` running there? (set TPMBROKER_SOCKET or pass socket=)") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def carries_unsolicited(self) -> bool:
        """Whether something arrived while no request was in flight: a frame nobody asked
        for, or the broker's close. Either way the connection is not used again."""
        if self.broken or self.reader.pending:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def round_trip(self, msg: p.Message, deadline: float) -> p.Message:
        request_id = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFF) + 1
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        self._settimeout(deadline)
        try:
            self.sock.sendall(p.encode_request(request_id, msg, remaining_ms))
        except (BrokenPipeError, ConnectionResetError):
            # The broker may have said why before it closed (a process it does not
            # admit): that answer is already here to read.
            self.broken = True
            self._raise_connection_error(min(deadline, time.monotonic() + 0.2))
            raise
        try:
            result = self._answer(msg, request_id, deadline)
        except BaseException:
            # A timeout, a frame that does not parse, a connection error: whatever the
            # stream holds next cannot be trusted to belong to the next request.
            self.broken = True
            raise
        if isinstance(result, p.ErrorResult):
            # The broker's answer to this request: the connection, and the keys loaded
            # on it, stay good (a BUSY client that reconnected would queue a LOAD).
            raise error_for_status(result.status, result.message, result.tpm_rc)
        return result

    def _answer(self, msg: p.Message, request_id: int,
                deadline: float) -> p.Message | p.ErrorResult:
        while True:
            self._settimeout(deadline)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("broker closed the connection")
            frames = self.reader.feed(data)
            if not frames:
                continue
            header, body = frames[0]
            if header.request_id == 0:
                # An error about the whole connection: the wait ends here, whether or
                # not the broker closes the stream after it.
                result = p.decode_response(header, body)
                if isinstance(result, p.ErrorResult):
                    raise error_for_status(result.status, result.message, result.tpm_rc)
                raise ProtocolError("the broker sent a result for request 0, which no "
                                    "request uses")
            if header.request_id != request_id:
                raise ProtocolError(f"the broker answered request {header.request_id} "
                                    f"while request {request_id} was the only one in "
                                    "flight")
            if header.opcode != msg.OPCODE | p.RESPONSE_BIT:
                raise ProtocolError(f"the broker answered {msg.OPCODE.name} with opcode "
                                    f"0x{header.opcode:02x}")
            result = p.decode_response(header, body)
            if len(frames) > 1 or self.reader.pending:
                self.broken = True  # frames after the answer: nobody asked for them
            return result

    def _raise_connection_error(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                self._settimeout(deadline)
                data = self.sock.recv(65536)
                if not data:
                    return
                for header, body in self.reader.feed(data):
                    result = p.decode_response(header, body)
                    if header.request_id == 0 and isinstance(result, p.ErrorResult):
                        raise error_for_status(result.status, result.message, result.tpm_rc)
        except (OSError, TimeoutError, ProtocolError):
            return

    def _settimeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)


class Client:
    """A client of one broker. Share one instance between threads; it survives fork()."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_connections: int = 16,
                 verify: bool = True) -> None:
        """`verify`: check each signature against the key's public key before returning
        it (about 0.1 ms for ECDSA P-256; docs/python.md). Its shape is checked anyway."""
        self.socket_path = str(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self.verify = verify
        self.max_connections = max_connections
        self._reached = False  # a broker answered this client once: a restart is waited for
        self._reset()
        _live_clients.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._idle: list[_Connection] = []
        self._open = 0

    def _after_fork_in_child(self) -> None:
        # The parent's sockets are shared with it: close our copies, never shut them down.
        for conn in self._idle:
            conn.close()
        self._reset()

    # --- connection pool ---------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, deadline: float) -> Iterator[_Connection]:
        if os.getpid() != self._pid:  # fork without os.register_at_fork (e.g. os.fork in C)
            self._after_fork_in_child()
        with self._available:
            while not self._idle and self._open >= self.max_connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._available.wait(remaining):
                    raise DeadlineError("no free connection to the broker before the deadline")
            if self._idle:
                conn = self._idle.pop()
            else:
                self._open += 1
                conn = None
        if conn is not None and conn.carries_unsolicited():
            conn.close()  # the slot stays counted: a fresh connection takes it
            conn = None
        if conn is None:
            try:
                conn = _Connection(self.socket_path, deadline)
            except BaseException:
                self._release(None)
                raise
        healthy = False
        try:
            yield conn
            healthy = True
        except TpmBrokerError as exc:
            # A stopping broker's connection is of no further use: the next request
            # connects afresh, to its successor.
            healthy = not isinstance(exc, (ProtocolError, BrokerUnavailableError,
                                           ShuttingDownError))
            raise
        finally:
            self._release(conn if healthy else None)

    def _release(self, conn: _Connection | None) -> None:
        with self._available:
            if conn is None or conn.broken or os.getpid() != self._pid:
                self._open -= 1
                if conn is not None:
                    conn.close()
            else:
                self._idle.append(conn)
            self._available.notify()

    def _drop_idle(self) -> None:
        with self._available:
            for conn in self._idle:
                conn.close()
            self._open -= len(self._idle)
            self._idle.clear()

    def close(self) -> None:
        self._drop_idle()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------

    def _call(self, msg: p.Message, timeout: float | None = None,
              key: LoadedKey | None = None) -> p.Message:
        """One request. A broker restart goes unnoticed within the deadline: a request
        it could not serve (SHUTTING_DOWN, or a connection lost with the request out) is
        sent again to its successor if it may be repeated (REPEATABLE), and a broker
        this client reached before is waited for while its socket is away."""
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        repeatable = msg.OPCODE in REPEATABLE
        delay, away_since, lost = RETRY_FIRST, None, 0
        while True:
            try:
                with self._connection(deadline) as conn:
                    if key is not None and conn.loaded.get(key.key_id) != key.spec.auth:
                        self._reload(conn, key, deadline)
                    try:
                        result = conn.round_trip(msg, deadline)
                    except UnknownKeyError:
                        if key is None:
                            raise
                        self._reload(conn, key, deadline)  # broker restarted or evicted
                        result = conn.round_trip(msg, deadline)
                self._reached = True
                return result
            except TimeoutError:
                raise DeadlineError("the broker did not answer before the deadline") from None
            except ShuttingDownError:
                if not repeatable or time.monotonic() + delay >= deadline:
                    raise
            except (ConnectionError, BrokenPipeError) as exc:
                self._drop_idle()  # every idle connection went to the same dead broker
                lost += 1  # a broker that drops every request is not waited out
                if (not repeatable or lost > MAX_LOST_CONNECTIONS
                        or time.monotonic() + delay >= deadline):
                    raise BrokerUnavailableError(
                        f"lost the connection to tpmbroker at {self.socket_path}: {exc}"
                    ) from None
            except BrokerUnavailableError:
                # Nothing was sent. A broker that answered before is being restarted.
                now = time.monotonic()
                away_since = away_since or now
                if (not self._reached or now + delay >= deadline
                        or now - away_since > RESTART_GRACE):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    @classmethod
    def _reload(cls, conn: _Connection, key: LoadedKey, deadline: float) -> None:
        """LOAD `key` again on `conn`. A handle names a place, not a key: if another key
        was persisted there since, nothing is done with it in this key's name."""
        result = cls._load_on(conn, key.spec, deadline)
        if (key.spec.source == p.KeySource.PERSISTENT_HANDLE
                and _loaded_key(key.spec, result).public_key != key.public_key):
            raise BadKeyError(
                f"the key at persistent handle 0x{int.from_bytes(key.spec.key, 'big'):08x} "
                "is not the one loaded (it was evicted and another persisted there); "
                "load the handle again")

    @staticmethod
    def _load_on(conn: _Connection, spec: KeySpec, deadline: float) -> LoadResult:
        result = conn.round_trip(spec.load_request(), deadline)
        assert isinstance(result, LoadResult)  # the opcode was checked
        if result.key_id != spec.key_id:
            conn.broken = True
            raise ProtocolError("the broker answered LOAD with the id of another key")
        conn.loaded[result.key_id] = spec.auth
        return result

    def hello(self) -> HelloResult:
        result = self._call(Hello(p.VERSION, f"tpmbroker-python/{__version__}"))
        assert isinstance(result, HelloResult)
        return result

    def load_key(self, key: KeySpec | bytes | str | os.PathLike[str] | int,
                 password: bytes | str | None = None,
                 timeout: float | None = None,
                 parent_auth: bytes | str | None = None) -> LoadedKey:
        """Load a key: a KeySpec, PEM or DER bytes, a file path, or a persistent handle.
        `parent_auth`: the password of the key's parent (docs/python.md)."""
        spec = (key if isinstance(key, KeySpec)
                else KeySpec.from_any(key, password, parent_auth))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(2):
            try:
                with self._connection(deadline) as conn:
                    result = self._load_on(conn, spec, deadline)
                    return _loaded_key(spec, result)
            except TimeoutError:
                raise DeadlineError("the broker did not answer before the deadline") from None
            except (ConnectionError, BrokenPipeError) as exc:
                self._drop_idle()
                if attempt:
                    raise BrokerUnavailableError(
                        f"lost the connection to tpmbroker at {self.socket_path}: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    def sign(self, key: LoadedKey, digest: bytes, hash_alg: p.Hash | str = p.Hash.SHA256,
             scheme: p.Scheme | None = None, timeout: float | None = None) -> bytes:
        """Sign a digest. ECDSA gives DER; RSA the big-endian signature."""
        hash_alg = hash_alg if isinstance(hash_alg, p.Hash) else p.Hash.from_name(hash_alg)
        if scheme is None:
            scheme = {p.KeyType.EC: p.Scheme.ECDSA,
                      p.KeyType.RSA_PSS: p.Scheme.PSS}.get(key.key_type, p.Scheme.PKCS1)
        result = self._call(Sign(key.key_id, scheme, hash_alg, digest), timeout, key)
        assert isinstance(result, SignResult)  # the opcode was checked
        check_signature(key, digest, hash_alg, p.Scheme(scheme), result.signature,
                        verify=self.verify)
        return result.signature

    def decrypt(self, key: LoadedKey, ciphertext: bytes,
                padding: p.Padding = p.Padding.PKCS1, hash_alg: p.Hash | str | None = None,
                mgf1_hash: p.Hash | str | None = None, label: bytes = b"",
                implicit_rejection: bool = True, timeout: float | None = None) -> bytes:
        """RSA-decrypt `ciphertext` with a TPM key. OAEP takes `hash_alg` (default SHA-256),
        `mgf1_hash` (default: the same) and `label`. PKCS#1 v1.5 with
        `implicit_rejection` returns a synthetic message for a bad padding, as OpenSSL 3.2
        does; without it a bad padding raises BadDigestError."""
        padding = p.Padding(padding)
        flags = 0
        hash_id = mgf1_id = 0
        if padding is p.Padding.OAEP:
            hash_id = _hash(hash_alg or p.Hash.SHA256)
            mgf1_id = _hash(mgf1_hash) if mgf1_hash is not None else hash_id
        elif hash_alg is not None or mgf1_hash is not None or label:
            raise ValueError("a hash, an MGF1 hash or a label are for OAEP only")
        if padding is p.Padding.PKCS1 and implicit_rejection:
            flags |= p.DecryptFlag.IMPLICIT_REJECTION
        result = self._call(Decrypt(key.key_id, padding, flags, hash_id, mgf1_id, label,
                                        ciphertext), timeout, key)
        assert isinstance(result, DecryptResult)
        if len(result.plaintext) > (key.bits + 7) // 8:  # no padding makes a message longer
            raise ProtocolError(f"the broker sent a plaintext of {len(result.plaintext)} "
                                f"bytes for a {key.bits}-bit key")
        return result.plaintext
    def sign_message(self, key: LoadedKey, message: bytes,
                     hash_alg: p.Hash | str = p.Hash.SHA256, scheme: p.Scheme | None = None,
                     timeout: float | None = None) -> bytes:
        """Sign a message (at most protocol.MAX_MESSAGE bytes) that the broker, or for a
        restricted key (an attestation key) the TPM, hashes. ECDSA gives DER; RSA the
        big-endian signature."""
        hash_alg = hash_alg if isinstance(hash_alg, p.Hash) else p.Hash.from_name(hash_alg)
        if scheme is None:
            scheme = p.Scheme.ECDSA if key.key_type == p.KeyType.EC else p.Scheme.PKCS1
        if len(message) > p.MAX_MESSAGE:
            raise UnsupportedError(f"message of {len(message)} bytes: the broker signs "
                                   f"messages of at most {p.MAX_MESSAGE} bytes (MAX_MESSAGE)")
        result = self._call(SignMessage(key.key_id, scheme, hash_alg, message), timeout,
                            key)
        assert isinstance(result, SignMessageResult)  # the opcode was checked
        digest = hashlib.new(hash_alg.hashlib_name, message).digest()
        check_signature(key, digest, hash_alg, p.Scheme(scheme), result.signature,
                        verify=self.verify)
        return result.signature

    def derive(self, key: LoadedKey, peer_point: bytes, timeout: float | None = None) -> bytes:
        """ECDH with an EC key: Z, the shared point's x-coordinate, from the peer's
        public key as an uncompressed point (0x04 || x || y)."""
        result = self._call(Derive(key.key_id, peer_point), timeout, key)
        assert isinstance(result, DeriveResult)
        if len(result.secret) != (key.bits + 7) // 8:
            raise ProtocolError(f"the broker sent a {len(result.secret)}-byte secret for "
                                f"a {key.bits}-bit curve")
        return result.secret

    def generate_key(self, key_type: p.KeyType, param: int, password: bytes | str | None = None,
                     parent: int = p.STORAGE_PRIMARY,
                     timeout: float | None = None, usage: p.Usage = p.Usage.DEFAULT,
                     hash_alg: p.Hash | None = None,
                     parent_auth: bytes | str | None = None,
                     policy: bytes = b"") -> tuple[bytes, bytes]:
        """Create a key in the TPM: (TSS2 PRIVATE KEY DER, SubjectPublicKeyInfo DER).

        `param` is a curve (p.Curve) for EC keys, the modulus bits for RSA and RSA-PSS;
        the TPM decides which it has. `usage` sets the key's sign and decrypt attributes
        (default: both, as tpm2-openssl; RSA-PSS keys sign only; Usage.SIGN or
        Usage.DECRYPT narrows the key for good); `hash_alg` is the key's hash (default
        SHA-256): its nameAlg, and the hash an RSA-PSS key's scheme is bound to.
        `parent_auth`: the parent's password (for 0x40000001, the owner hierarchy's).
        `policy`: the key's policy (keypolicy.encode_request), e.g. a PCR lock; the key
        file carries it and the broker satisfies it at each use."""
        auth = password.encode() if isinstance(password, str) else (password or b"")
        pauth = (parent_auth.encode() if isinstance(parent_auth, str)
                 else (parent_auth or b""))
        result = self._call(Generate(key_type, param, auth, parent, usage,
                                         int(hash_alg) if hash_alg is not None else 0, pauth,
                                         policy),
                            timeout if timeout is not None else max(self.timeout, 120.0))
        assert isinstance(result, GenerateResult)
        return result.key, result.public_key

    def parent_public(self, parent: int = p.STORAGE_PRIMARY,
                      timeout: float | None = None) -> bytes:
        """The TPM2B_PUBLIC of a parent in the broker's TPM (the storage primary
        0x40000001, or a persistent 0x81xxxxxx): what keys are wrapped to."""
        result = self._call(Import(parent), timeout)
        assert isinstance(result, ImportResult)
        return result.parent_public

    def import_key(self, key: bytes, parent_auth: bytes | str | None = None,
                   timeout: float | None = None) -> bytes:
        """An importable TSS2 PRIVATE KEY (DER; tpmbroker.wrap.wrap_key makes one)
        imported into the broker's TPM (TPM2_Import): the loadable TSS2 PRIVATE KEY DER.
        `parent_auth`: the parent's password (for 0x40000001, the owner hierarchy's)."""
        pauth = (parent_auth.encode() if isinstance(parent_auth, str)
                 else (parent_auth or b""))
        result = self._call(Import(0, key, pauth), timeout)
        assert isinstance(result, ImportResult)
        if not result.key:
            raise ProtocolError("the broker answered IMPORT without a key")
        return result.key

    def wrap_key(self, key: object, password: bytes | str | None = None, *,
                 usage: p.Usage = p.Usage.DEFAULT, parent: int = p.STORAGE_PRIMARY,
                 parent_auth: bytes | str | None = None, passphrase: bytes | None = None,
                 timeout: float | None = None) -> bytes:
        """Move a software EC or RSA private key (a cryptography key, or PEM/DER bytes
        with `passphrase` if encrypted) into the broker's TPM: wrapped to the parent
        here, imported there; the loadable TSS2 PRIVATE KEY DER. Only ciphertext leaves
        this process. Destroy the original afterwards (docs/keys.md)."""
        from .wrap import wrap_key

        parent_area = self.parent_public(parent, timeout)
        importable = wrap_key(key, parent_area, password=password,  # type: ignore[arg-type]
                              usage=usage, parent_handle=parent, passphrase=passphrase)
        return self.import_key(importable, parent_auth, timeout)

    def random(self, count: int, timeout: float | None = None) -> bytes:
        """`count` bytes from the TPM's random number generator, asked for in requests of
        at most protocol.MAX_RANDOM bytes; `timeout` applies to each request."""
        if count < 0:
            raise ValueError("count must not be negative")
        out = bytearray()
        while len(out) < count:
            wanted = min(count - len(out), p.MAX_RANDOM)
            result = self._call(Random(wanted), timeout)
            assert isinstance(result, RandomResult)
            if len(result.random) != wanted:
                raise ProtocolError(f"the broker sent {len(result.random)} random bytes "
                                    f"for {wanted}")
            out += result.random
        return bytes(out)

    def pcr_read(self, pcrs: str, timeout: float | None = None) -> list[tuple[str, int, bytes]]:
        """The values of the PCRs `pcrs` names, spelled as --pcr-lock is (`16`,
        `sha256:16,17`, `sha1:0+sha256:7`; tpmbroker.keypolicy.parse_pcr_lock): a list of
        (bank, PCR, value) in that order. A bank the TPM has not allocated raises
        UnsupportedError."""
        from .keypolicy import HASH_NAMES, PcrSelection, marshal_selection, parse_pcr_lock

        out = []
        for selection in parse_pcr_lock(pcrs):
            bank = HASH_NAMES[selection.bank]
            for pcr in selection.pcrs:
                # One PCR per request: a TPM answers at most 8 values per TPM2_PCR_Read.
                wanted = marshal_selection([PcrSelection(selection.bank, (pcr,))])
                result = self._call(PcrRead(wanted), timeout)
                assert isinstance(result, PcrReadResult)
                if result.selection != wanted:
                    raise UnsupportedError(f"this TPM has no {bank} PCR {pcr} (its {bank} "
                                           "bank is not allocated)")
                if len(result.values) != selection.bank.digest_size:
                    raise ProtocolError(f"the broker sent a {len(result.values)}-byte value "
                                        f"for {bank} PCR {pcr}")
                out.append((bank, pcr, result.values))
        return out

    def attest(self, key: LoadedKey | KeySpec | bytes | str | os.PathLike[str],
               challenge: bytes, *, parent_auth: bytes | str | None = None,
               timeout: float | None = None) -> bytes:
        """A statement that the key is resident in the broker's TPM, over `challenge`
        (at most definitions.MAX_CHALLENGE bytes; a verifier's fresh nonce): JSON, the
        WebAuthn "tpm" attestation statement with the EK certificate and the
        attestation key's (docs/attestation.md). tpmbroker.attestation.verify checks it
        offline. `key`: a LoadedKey, or a key file or handle as load_key takes it."""
        loaded = key if isinstance(key, LoadedKey) else self.load_key(
            key, timeout=timeout, parent_auth=parent_auth)
        result = self._call(Certify(loaded.key_id, bytes(challenge)), timeout, loaded)
        assert isinstance(result, CertifyResult)
        return result.statement

    def nv_read(self, index: int, timeout: float | None = None) -> bytes:
        """The contents of NV index `index` (0x01xxxxxx), e.g. a certificate."""
        result = self._call(NvRead(index), timeout)
        assert isinstance(result, NvReadResult)
        return result.data

    def status(self, timeout: float | None = None) -> dict[str, object]:
        result = self._call(StatusRequest(), timeout)
        assert isinstance(result, StatusResult)
        try:
            data = json.loads(result.json)
        except ValueError:
            raise ProtocolError("the broker's STATUS is not JSON") from None
        if not isinstance(data, dict):
            raise ProtocolError("the broker's STATUS is not a JSON object")
        return data

    # --- persistent handles (docs/python.md) ---------------------------------------------

    def persist(self, key: LoadedKey | KeySpec | bytes | str | os.PathLike[str], handle: int,
                *, parent_auth: bytes | str | None = None,
                owner_auth: bytes | str | None = None,
                timeout: float | None = None) -> bytes:
        """Make a key persistent at `handle` (0x81000000 to 0x817FFFFF, free): a LoadedKey,
        or a key file as load_key takes it (with its parent's password). Only the broker's
        administrators may. `owner_auth`: the owner hierarchy's password, if it has one.
        Returns the key's TPM Name; afterwards load_key(handle) uses it by handle."""
        loaded = key if isinstance(key, LoadedKey) else self.load_key(
            key, timeout=timeout, parent_auth=parent_auth)
        result = self._call(Persist(loaded.key_id, handle, _password(owner_auth)),
                            timeout, loaded)
        assert isinstance(result, PersistResult)
        if result.handle != handle:
            raise ProtocolError(f"the broker persisted at 0x{result.handle:08x}, not at "
                                f"0x{handle:08x}")
        return result.name

    def evict(self, handle: int, *, owner_auth: bytes | str | None = None,
              timeout: float | None = None) -> None:
        """Take the persistent object at `handle` out of the TPM (administrators only)."""
        result = self._call(Evict(handle, _password(owner_auth)), timeout)
        assert isinstance(result, EvictResult)

    def keys(self, timeout: float | None = None) -> dict[str, list[dict[str, object]]]:
        """{"persistent": [...], "loaded": [...]}: the TPM's persistent objects and the
        keys the broker holds (docs/broker.md, Persistent keys)."""
        result = self._call(KeysRequest(), timeout)
        assert isinstance(result, KeysResult)
        try:
            data = json.loads(result.json)
        except ValueError:
            raise ProtocolError("the broker's KEYS is not JSON") from None
        if not (isinstance(data, dict)
                and all(isinstance(data.get(k), list) for k in ("persistent", "loaded"))):
            raise ProtocolError("the broker's KEYS is not a JSON object with the lists "
                                "persistent and loaded")
        return data


def _password(value: bytes | str | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def _hash(value: p.Hash | str) -> p.Hash:
    return value if isinstance(value, p.Hash) else p.Hash.from_name(value)


def _loaded_key(spec: KeySpec, result: LoadResult) -> LoadedKey:
    """The LOAD answer, checked: known type and curve, a public key of that kind, and for
    a key file the file's own public key (the broker's word is not taken for it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from .keyfile import public_key_der

    try:
        key_type, curve = p.KeyType(result.key_type), p.Curve(result.curve)
    except ValueError:
        raise ProtocolError(f"the broker answered LOAD with key type {result.key_type} "
                            f"and curve {result.curve}") from None
    public = public_key(result.public_key)
    if key_type == p.KeyType.EC:
        fits = (isinstance(public, ec.EllipticCurvePublicKey) and curve in CURVES
                and public.curve.name == curve.pyca_name
                and result.bits == public.curve.key_size)
    else:
        fits = (isinstance(public, rsa.RSAPublicKey) and curve == p.Curve.NONE
                and result.bits == public.key_size)
    if not fits:
        raise ProtocolError(f"the broker answered LOAD with a public key that is not the "
                            f"{key_type.name} key of {result.bits} bits it claims")
    spki = public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    if spec.source == p.KeySource.TSS2_DER:
        try:
            in_file = public_key_der(spec.key)
        except ValueError as exc:
            raise BadKeyError(f"the key file's public key cannot be read: {exc}") from None
        if in_file != spki:
            raise ProtocolError("the broker answered LOAD with another public key than the "
                                "key file's")
    return LoadedKey(spec, result.key_id, key_type, result.bits, curve, spki)


_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_clients_in_child() -> None:
    for client in list(_live_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_clients_in_child)


def read_password_file(path: str | os.PathLike[str]) -> bytes:
    """A password file's first line, without its line ending."""
    data = Path(path).read_bytes()
    return data.split(b"\n", 1)[0].rstrip(b"\r")
