"""Decryption and ECDH beside signing: the keys, the inputs and the systems that run them.

A point's key label names the operation when it is not signing: "rsa:2048 decrypt"
(RSA-2048 PKCS#1 v1.5 decryption of one 32-byte secret) and "ec:P-256 derive" (P-256
ECDH with one peer key). Every result is compared with the expected bytes (one in
CHECK_EVERY), as signatures are verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMT_PUBLIC

from tpmbroker.loadgen import LoadReport, run_for, sample_sessions

from . import systems
from .systems import CHECK_EVERY, Key

OPS = ("sign", "decrypt", "derive")
KEY_FOR = {"decrypt": "rsa:2048", "derive": "ec:P-256"}  # the key type each one needs
SYSTEMS = ("direct-password", "direct-hmac", "provider", "client",
           "tpm2-openssl-1.1", "tpm2-openssl-1.3")  # the systems that have them
STORAGE_PRIMARY_FROM_TEMPLATE = 0x40000001
ATTRIBUTES = "userwithauth|sign|decrypt|fixedtpm|fixedparent|sensitivedataorigin"


def label(key: str, op: str) -> str:
    return key if op == "sign" else f"{key} {op}"


def split(key_label: str) -> tuple[str, str]:
    """("rsa:2048", "decrypt") from "rsa:2048 decrypt"; ("ec:P-256", "sign") from "ec:P-256"."""
    key, _, op = key_label.partition(" ")
    return key, op or "sign"


@dataclasses.dataclass(frozen=True)
class Work:
    """A key that signs and decrypts (as tpm2-openssl makes them), and one job for it."""

    key: Key
    op: str
    data: bytes  # the ciphertext, or the peer's public key (PEM)
    expected: bytes  # the secret, or Z
    peer_point: bytes = b""  # the peer's uncompressed point (the Python client's input)

    def write(self, workdir: Path) -> tuple[Path, Path, Path]:
        """(key PEM, input, expected) as files, for the processes of tpm2-openssl."""
        stem = f"{self.key.name.replace(':', '-')}-{self.op}"
        paths = (workdir / f"{stem}.pem", workdir / f"{stem}.in", workdir / f"{stem}.expect")
        for path, data in zip(paths, (self.key.pem, self.data, self.expected), strict=True):
            path.write_bytes(data)
        return paths


def make_work(tcti: str, key_label: str) -> Work:
    name, op = split(key_label)
    alg = {"ec:P-256": "ecc256", "rsa:2048": "rsa2048"}[name]
    template = TPMT_PUBLIC.parse(alg, nameAlg="sha256", objectAttributes=ATTRIBUTES)
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        tss = TSSPrivKey.create(ectx, template, STORAGE_PRIMARY_FROM_TEMPLATE)
    key = Key(name, tss.to_der(), tss.to_pem(), tss.public.to_der())
    public = serialization.load_der_public_key(key.public)
    if op == "decrypt":
        assert isinstance(public, rsa.RSAPublicKey)
        secret = os.urandom(32)
        return Work(key, op, public.encrypt(secret, padding.PKCS1v15()), secret)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    pem = peer.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    return Work(key, op, pem, peer.exchange(ec.ECDH(), public), point)


def _threads(clients: int, seconds: float, report: LoadReport,
             make_call: object) -> LoadReport:
    """`clients` threads call `make_call(index)()` until `seconds` have passed."""
    stop = threading.Event()
    start = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        done = failed = bad = 0
        errors: dict[str, int] = {}
        latencies: list[float] = []
        try:
            call, expected = make_call(index)  # type: ignore[operator]
        except Exception as exc:
            start.wait()
            report.add_signer(index, 0, 1, 0, [], {f"setup: {exc}"[:160]: 1})
            return
        # Uncounted: a key's first use is set-up (the first decryption also derives the
        # key's implicit-rejection secret), not the steady state. A failure shows below.
        with contextlib.suppress(Exception):
            call()
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                output = call()
            except Exception as exc:
                failed += 1
                name = f"{type(exc).__name__}: {exc}"[:120]
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if done % CHECK_EVERY == 0 and output != expected:
                bad += 1
            done += 1
        report.add_signer(index, done, failed, bad, latencies, errors)

    report.seconds = run_for(worker, clients, start, stop, seconds)
    return report


def run_client(socket: str, work: Work, clients: int, seconds: float) -> LoadReport:
    """Threads sharing one tpmbroker Client, each decrypting or deriving in a loop."""
    from tpmbroker.client import Client

    report = LoadReport(clients, seconds, per_client=[0] * clients)
    with Client(socket, timeout=30, max_connections=clients + 1) as client:
        loaded = client.load_key(work.key.der)
        stop = threading.Event()
        sampler = threading.Thread(target=sample_sessions, args=(client, stop, report),
                                   daemon=True)
        sampler.start()
        try:
            def make_call(index: int) -> tuple[object, bytes]:
                if work.op == "decrypt":
                    return (lambda: client.decrypt(loaded, work.data)), work.expected
                return (lambda: client.derive(loaded, work.peer_point)), work.expected

            return _threads(clients, seconds, report, make_call)
        finally:
            stop.set()
            sampler.join()


def run_provider(socket: str, workdir: Path, work: Work, clients: int,
                 seconds: float) -> LoadReport:
    """C threads of one process calling EVP_PKEY_decrypt / EVP_PKEY_derive through the
    provider: the load generator that signs for the provider system (systems.run_provider),
    so that its signatures and these operations are measured alike."""
    _, data, expected = work.write(workdir)
    return systems.run_provider(socket, workdir, work.key, clients, seconds,
                                operation=(work.op, str(data), str(expected)))


def direct_command(work: Work) -> systems.DirectCommand:
    """TPM2_RSA_Decrypt (RSAES: the TPM removes the PKCS#1 v1.5 padding) or TPM2_ECDH_ZGen
    (Z is the shared point's x), the TPM commands behind a decryption and a derivation."""
    from collections.abc import Callable

    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPM2B_ECC_POINT, TPMS_ECC_POINT, TPMT_RSA_DECRYPT

    if work.op == "decrypt":
        scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.RSAES)

        def decrypt(ectx: ESAPI, handle: ESYS_TR, session: ESYS_TR,
                    n: int) -> Callable[[], bool]:
            message = ectx.rsa_decrypt(handle, work.data, scheme, session1=session)
            return lambda: bytes(message) == work.expected

        return decrypt
    if work.op != "derive":
        raise ValueError(f"no direct loop for {work.op}")
    size = (len(work.peer_point) - 1) // 2
    point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=work.peer_point[1:1 + size],
                                           y=work.peer_point[1 + size:]))

    def derive(ectx: ESAPI, handle: ESYS_TR, session: ESYS_TR,
               n: int) -> Callable[[], bool]:
        shared = ectx.ecdh_zgen(handle, point, session1=session)
        return lambda: bytes(shared.point.x) == work.expected

    return derive


def run_direct(tcti: str, work: Work, seconds: float, hmac: bool) -> LoadReport:
    """The direct loop of decryption or ECDH: one ESAPI context straight to the TPM, as
    direct-password and direct-hmac are for signing."""
    return systems.run_direct(tcti, work.key, seconds, hmac, direct_command(work))
