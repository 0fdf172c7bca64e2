"""Every operation at once: 64 threads of one process and forked children, decrypting and
deriving with TPM keys while others sign, all through the provider in libcrypto. No
failure, every result correct, and the TPM never holds more sessions than the pool."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tpmbroker.paths import provider_path

from .tpmfixtures import Broker, BrokerEnv, active_sessions, running_swtpm

MODULE = provider_path()
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
THREADS, CHILDREN, ROUNDS = 64, 2, 4
pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")

# The provider through ctypes to the system libcrypto (its calls release the GIL). Thread i
# signs when i % 3 == 0, decrypts when 1, derives when 2; the children fork before any
# thread starts and run the same threads. Prints the failures of this process and the
# children's exit codes.
_SCRIPT = textwrap.dedent("""\
    import ctypes, os, sys, threading
    lib = ctypes.CDLL("libcrypto.so.3")
    lib.OSSL_PROVIDER_set_default_search_path(None, sys.argv[1].encode())
    lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
    assert lib.OSSL_PROVIDER_load(None, b"tpmbroker")
    assert lib.OSSL_PROVIDER_load(None, b"default")
    for name in ("BIO_new_mem_buf", "PEM_read_bio_PrivateKey", "PEM_read_bio_PUBKEY",
                 "EVP_PKEY_CTX_new_from_pkey"):
        getattr(lib, name).restype = ctypes.c_void_p
    for name in ("PEM_read_bio_PrivateKey", "PEM_read_bio_PUBKEY"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4
    lib.EVP_PKEY_CTX_new_from_pkey.argtypes = [ctypes.c_void_p] * 3
    for name in ("EVP_PKEY_derive_init", "EVP_PKEY_CTX_free", "EVP_PKEY_sign_init",
                 "EVP_PKEY_decrypt_init"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.EVP_PKEY_derive_set_peer.argtypes = [ctypes.c_void_p] * 2
    lib.EVP_PKEY_derive.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_size_t)]
    for name in ("EVP_PKEY_sign", "EVP_PKEY_decrypt"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                       ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p,
                                       ctypes.c_size_t]

    def read(path, fn):
        data = open(path, "rb").read()
        key = fn(lib.BIO_new_mem_buf(data, len(data)), None, None, None)
        assert key, path
        return key

    signer = read(sys.argv[2], lib.PEM_read_bio_PrivateKey)
    decrypter = read(sys.argv[3], lib.PEM_read_bio_PrivateKey)
    deriver = read(sys.argv[4], lib.PEM_read_bio_PrivateKey)
    peer = read(sys.argv[5], lib.PEM_read_bio_PUBKEY)
    ciphertext, plaintext, secret = (bytes.fromhex(a) for a in sys.argv[6:9])
    rounds, threads, children = (int(a) for a in sys.argv[9:12])
    failures = []

    def run(ctx, init, operation, expected):
        out = ctypes.create_string_buffer(512)
        n = ctypes.c_size_t(512)
        ok = init(ctx) == 1 and operation(ctx, out, n) == 1
        lib.EVP_PKEY_CTX_free(ctx)
        return ok and (expected is None or out.raw[:n.value] == expected)

    def sign():
        return run(lib.EVP_PKEY_CTX_new_from_pkey(None, signer, None), lib.EVP_PKEY_sign_init,
                   lambda c, o, n: lib.EVP_PKEY_sign(c, o, ctypes.byref(n), bytes(32), 32),
                   None)

    def decrypt():
        return run(lib.EVP_PKEY_CTX_new_from_pkey(None, decrypter, None),
                   lib.EVP_PKEY_decrypt_init,
                   lambda c, o, n: lib.EVP_PKEY_decrypt(c, o, ctypes.byref(n), ciphertext,
                                                        len(ciphertext)),
                   plaintext)

    def derive():
        return run(lib.EVP_PKEY_CTX_new_from_pkey(None, deriver, None),
                   lambda c: lib.EVP_PKEY_derive_init(c) == 1
                   and lib.EVP_PKEY_derive_set_peer(c, peer),
                   lambda c, o, n: lib.EVP_PKEY_derive(c, o, ctypes.byref(n)), secret)

    def worker(operation):
        for _ in range(rounds):
            if not operation():
                failures.append(operation.__name__)

    pids, child = [], False
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            pids, child = [], True
            break
        pids.append(pid)
    work = [threading.Thread(target=worker, args=((sign, decrypt, derive)[i % 3],))
            for i in range(threads)]
    [t.start() for t in work]
    [t.join() for t in work]
    if child:
        os._exit(1 if failures else 0)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(len(failures), *codes)
    """)


class Env(BrokerEnv):
    def keygen(self, name: str, alg: str, usage: str) -> Path:
        path = self.dir / name
        subprocess.run([TPMBROKER, "keygen", "--alg", alg, "--usage", usage, "-o", str(path)],
                       check=True, capture_output=True, env=self.environ, timeout=120)
        return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("concurrency")
    with running_swtpm(base / "tpm") as tpm, \
            Broker(tpm.tcti, base / "broker", sessions=2) as broker:
        yield Env(broker, base)


def public_key_of(env: Env, key: Path) -> bytes:
    return subprocess.run([TPMBROKER, "pubkey", str(key)], check=True, capture_output=True,
                          env=env.environ, timeout=60).stdout


def test_threads_and_forked_children_decrypt_and_derive_while_others_sign(env: Env) -> None:
    signer = env.keygen("sign.pem", "ec:P-256", "sign")
    decrypter = env.keygen("decrypt.pem", "rsa:2048", "decrypt")
    deriver = env.keygen("derive.pem", "ec:P-256", "decrypt")
    rsa_public = serialization.load_pem_public_key(public_key_of(env, decrypter))
    ec_public = serialization.load_pem_public_key(public_key_of(env, deriver))
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_pem = env.dir / "peer.pub"
    peer_pem.write_bytes(peer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    plaintext = os.urandom(32)
    assert hasattr(rsa_public, "encrypt") and isinstance(ec_public, ec.EllipticCurvePublicKey)
    ciphertext = rsa_public.encrypt(plaintext, padding.PKCS1v15())
    secret = peer.exchange(ec.ECDH(), ec_public)

    before = env.status()
    pool = before["pool_size"]
    assert isinstance(pool, int)
    with active_sessions(env.broker.socket, 0.05) as active:
        res = subprocess.run(
            [sys.executable, "-c", _SCRIPT,
             str(MODULE.parent), str(signer), str(decrypter), str(deriver), str(peer_pem),
             ciphertext.hex(), plaintext.hex(), secret.hex(),
             str(ROUNDS), str(THREADS), str(CHILDREN)],
            capture_output=True, text=True, timeout=600, env=env.environ)
    assert res.returncode == 0, res.stderr + env.broker.log()
    assert res.stdout.split() == ["0"] + ["0"] * CHILDREN  # no failure anywhere
    after = env.status()
    processes = 1 + CHILDREN
    per_kind = {kind: sum(1 for i in range(THREADS) if i % 3 == kind) * ROUNDS * processes
                for kind in range(3)}
    for counter, kind in (("signatures", 0), ("decryptions", 1), ("derivations", 2)):
        done, started = after[counter], before[counter]
        assert isinstance(done, int) and isinstance(started, int)
        assert done - started == per_kind[kind], counter
    assert active and max(active) <= pool
