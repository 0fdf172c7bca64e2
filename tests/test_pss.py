"""RSA-PSS with salt = digest length, padded by the broker where the TPM would not.

Real TPMs sign PSS with the maximum salt length, which TLS 1.3 rejects; swtpm uses the
digest length. `--pss-padding broker` makes the broker pad PSS itself and use the TPM
for the raw RSA operation only, so that path is tested here on swtpm.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PUBLIC

from tpmbroker.errors import UnsupportedError
from tpmbroker.paths import provider_path
from tpmbroker.procedures.generate import generate_key
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign import lane as sign_lane
from tpmbroker.procedures.sign import sign as sign_digest
from tpmbroker.protocol import Hash, KeySource, KeyType, Scheme, Usage, key_id_for
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm import TpmWorker, pss

from . import tls_transcript
from .tpmfixtures import Broker

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
HASHES = {Hash.SHA256: hashes.SHA256(), Hash.SHA384: hashes.SHA384(),
          Hash.SHA512: hashes.SHA512()}


# --- the encoding itself --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2048, 3071, 3072])
def test_encoding_is_pss_with_digest_long_salt(bits: int) -> None:
    key = rsa.generate_private_key(65537, bits)
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    for hash_alg, algorithm in HASHES.items():
        digest = hashlib.new(hash_alg.hashlib_name, b"pss").digest()
        block = pss.encode(digest, hash_alg.hashlib_name, n.bit_length())
        assert len(block) == (n.bit_length() + 7) // 8
        signature = pow(int.from_bytes(block, "big"), d, n).to_bytes(len(block), "big")
        key.public_key().verify(signature, digest,
                                padding.PSS(padding.MGF1(algorithm), algorithm.digest_size),
                                utils.Prehashed(algorithm))
        assert pss.salt_length(signature, n, 65537, digest, hash_alg.hashlib_name) == len(digest)


def test_salt_length_reads_what_a_signer_chose() -> None:
    key = rsa.generate_private_key(65537, 2048)
    n = key.public_key().public_numbers().n
    digest = hashlib.sha256(b"salt").digest()
    for salt in (0, 20, 32, 64, padding.PSS.MAX_LENGTH):
        sig = key.sign(digest, padding.PSS(padding.MGF1(hashes.SHA256()), salt),
                       utils.Prehashed(hashes.SHA256()))
        expected = 256 - 32 - 2 if salt is padding.PSS.MAX_LENGTH else salt
        assert pss.salt_length(sig, n, 65537, digest, "sha256") == expected
    pkcs1 = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert pss.salt_length(pkcs1, n, 65537, digest, "sha256") is None
    assert pss.salt_length(os.urandom(256), n, 65537, digest, "sha256") is None
    good = key.sign(digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                    utils.Prehashed(hashes.SHA256()))
    assert pss.salt_length(good, n, 65537, hashlib.sha256(b"other").digest(), "sha256") is None


# --- through the TPM --------------------------------------------------------------------------

def _verify(public_der: bytes, signature: bytes, digest: bytes, hash_alg: Hash) -> None:
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    algorithm = HASHES[hash_alg]
    public.verify(signature, digest, padding.PSS(padding.MGF1(algorithm),
                                                 algorithm.digest_size),
                  utils.Prehashed(algorithm))


def test_worker_pads_pss_itself(swtpm: Swtpm) -> None:
    worker = TpmWorker(swtpm.tcti, pss_padding="broker")
    deadline = time.monotonic() + 60
    worker.open(deadline)
    try:
        der, spki = generate_key(worker, KeyType.RSA, 2048, b"pw", 0, deadline,
                                        usage=Usage.SIGN_DECRYPT)
        info = load_key(worker, KeySource.TSS2_DER, der, deadline)
        for hash_alg in HASHES:
            digest = hashlib.new(hash_alg.hashlib_name, b"padded here").digest()
            sig = sign_digest(worker, info.key_id, b"pw", Scheme.PSS, hash_alg, digest, deadline)
            assert len(sig) == 256
            _verify(spki, sig, digest, hash_alg)
        # PKCS#1 still goes to the TPM as it is
        digest = hashlib.sha256(b"pkcs1").digest()
        sig = sign_digest(worker, info.key_id, b"pw", Scheme.PKCS1, Hash.SHA256, digest, deadline)
        public = serialization.load_der_public_key(spki)
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    finally:
        worker.close()


def test_auto_keeps_the_tpms_pss_when_its_salt_is_right(swtpm: Swtpm) -> None:
    worker = TpmWorker(swtpm.tcti)  # pss_padding="auto"
    deadline = time.monotonic() + 60
    worker.open(deadline)
    try:
        der, spki = generate_key(worker, KeyType.RSA, 2048, b"", 0, deadline)
        info = load_key(worker, KeySource.TSS2_DER, der, deadline)
        for _ in range(3):
            digest = os.urandom(32)
            _verify(spki, sign_digest(worker, info.key_id, b"", Scheme.PSS, Hash.SHA256, digest,
                                      deadline), digest, Hash.SHA256)
        # swtpm's own PSS salt is the digest length: the TPM keeps signing PSS itself,
        # so the event loop may serve the next PSS signatures too.
        assert sign_lane(worker, info.key_id, b"", Scheme.PSS, Hash.SHA256,
                                      bytes(32)) is not None
    finally:
        worker.close()


def test_a_sign_only_key_cannot_be_padded_by_the_broker(swtpm: Swtpm) -> None:
    with ESAPI(TCTILdr.parse(swtpm.tcti)) as ectx:
        template = TPM2B_PUBLIC.parse(
            "rsa2048:null:null", objectAttributes="userwithauth|sign|fixedtpm|fixedparent|"
            "sensitivedataorigin").publicArea
        der: bytes = TSSPrivKey.create(ectx, template).to_der()
    worker = TpmWorker(swtpm.tcti, pss_padding="broker")
    deadline = time.monotonic() + 60
    worker.open(deadline)
    try:
        info = load_key(worker, KeySource.TSS2_DER, der, deadline)
        assert info.key_id == key_id_for(KeySource.TSS2_DER, der)
        with pytest.raises(UnsupportedError, match="decrypt attribute"):
            sign_digest(worker, info.key_id, b"", Scheme.PSS, Hash.SHA256, bytes(32), deadline)
        assert sign_digest(worker, info.key_id, b"", Scheme.PKCS1, Hash.SHA256, bytes(32), deadline)
    finally:
        worker.close()


def test_tls13_with_broker_padded_pss(swtpm: Swtpm, tmp_path: Path) -> None:
    """What a hardware TPM needs for TLS 1.3 with an RSA key, end to end."""
    broker = Broker(swtpm.tcti, tmp_path / "broker",
                    extra_args=("--pss-padding", "broker")).start()
    proc = None
    try:
        key = tmp_path / "rsa.pem"
        subprocess.run([TPMBROKER, "keygen", "--alg", "rsa:2048", "--usage", "sign,decrypt",
                        "-o", str(key), "--socket", broker.socket], check=True, timeout=120)
        env = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)
        prov = ["-provider-path", str(provider_path().parent), "-provider", "default",
                "-provider", "tpmbroker"]
        cert = tmp_path / "rsa.crt"
        subprocess.run(["openssl", "req", "-new", "-x509", *prov, "-key", str(key),
                        "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest",
                        "-subj", "/CN=localhost", "-days", "1", "-out", str(cert)],
                       env=env, check=True, capture_output=True, timeout=60)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(["openssl", "s_server", *prov, "-accept", f"127.0.0.1:{port}",
                                 "-cert", str(cert), "-key", str(key), "-www"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                              "-tls1_3", "-CAfile", str(cert), "-verify_return_error", "-msg"],
                             input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30,
                             env=dict(os.environ, OPENSSL_CONF=os.devnull))
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        assert tls_transcript.signature_scheme(out.stdout.decode()) == "rsa_pss_rsae_sha256"
        assert b"Verify return code: 0 (ok)" in out.stdout
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        broker.stop()


def test_keys_the_broker_can_pad_for_are_asked_for(swtpm: Swtpm) -> None:
    """Sign and decrypt by default (docs/security.md, Key usage) gives the broker the raw
    RSA operation it pads PSS with; a key narrowed to sign that would need it says how to
    make one that has it."""
    worker = TpmWorker(swtpm.tcti, pss_padding="broker")
    deadline = time.monotonic() + 60
    worker.open(deadline)
    try:
        der, _ = generate_key(worker, KeyType.RSA, 2048, b"", 0, deadline)
        signer, _ = generate_key(worker, KeyType.RSA, 2048, b"", 0, deadline,
                                 usage=Usage.SIGN)
        info = load_key(worker, KeySource.TSS2_DER, signer, deadline)
        with pytest.raises(UnsupportedError, match="without `--usage sign`"):
            sign_digest(worker, info.key_id, b"", Scheme.PSS, Hash.SHA256, bytes(32), deadline)
    finally:
        worker.close()
    attributes = int(TSSPrivKey.from_der(der).public.publicArea.objectAttributes)
    signer_attributes = int(TSSPrivKey.from_der(signer).public.publicArea.objectAttributes)
    assert attributes & TPMA_OBJECT.DECRYPT and attributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert signer_attributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert not signer_attributes & TPMA_OBJECT.DECRYPT
