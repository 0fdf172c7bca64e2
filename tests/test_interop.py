"""Keys cross over with tpm2-openssl, the provider users come from, in both directions.

The broker and tpm2-openssl share one swtpm through tpm2-abrmd, as they would share a
machine's TPM through /dev/tpmrm0.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.keyfile import der_to_pem
from tpmbroker.loadgen import verify

from .tpmfixtures import Abrmd, Broker


def tpm2_openssl(abrmd: Abrmd, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(abrmd.env(), TPM2OPENSSL_TCTI=abrmd.tcti)
    env.pop("OPENSSL_CONF", None)
    return subprocess.run(["openssl", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("algorithm", "opts", "password"), [
    ("EC", ["-pkeyopt", "group:P-256"], None),
    ("EC", ["-pkeyopt", "group:P-384", "-pkeyopt", "user-auth:s3cret"], "s3cret"),
    ("RSA", ["-pkeyopt", "bits:2048"], None),
])
def test_tpm2_openssl_keys_sign_through_the_broker(
        abrmd: Abrmd, abrmd_broker: Broker, tmp_path: Path, algorithm: str,
        opts: list[str], password: str | None) -> None:
    key = tmp_path / "key.pem"
    out = tpm2_openssl(abrmd, "genpkey", "-provider", "tpm2", "-provider", "base",
                       "-algorithm", algorithm, *opts, "-out", str(key))
    assert out.returncode == 0, out.stderr
    assert key.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    with Client(abrmd_broker.socket) as client:
        loaded = client.load_key(key, password)
        digest = hashlib.sha256(b"interop").digest()
        schemes = [p.Scheme.ECDSA] if algorithm == "EC" else [p.Scheme.PKCS1, p.Scheme.PSS]
        for scheme in schemes:
            sig = client.sign(loaded, digest, p.Hash.SHA256, scheme)
            assert verify(loaded.public_key, loaded.key_type, sig, digest, p.Hash.SHA256,
                          scheme)
    # The public key the broker reports is the one tpm2-openssl wrote.
    pub_path = tmp_path / "pub.der"
    pub = tpm2_openssl(abrmd, "pkey", "-provider", "tpm2", "-provider", "base",
                       "-in", str(key), "-pubout", "-outform", "DER", "-out", str(pub_path),
                       *(["-passin", f"pass:{password}"] if password else []))
    assert pub.returncode == 0, pub.stderr
    assert pub_path.read_bytes() == loaded.public_key


@pytest.mark.parametrize("alg", ["ec:P-256", "rsa:2048"])
def test_tpmbroker_keys_sign_in_tpm2_openssl(abrmd: Abrmd, abrmd_broker: Broker,
                                             tmp_path: Path, alg: str) -> None:
    key_type, param = {"ec:P-256": (p.KeyType.EC, p.Curve.P256),
                       "rsa:2048": (p.KeyType.RSA, 2048)}[alg]
    with Client(abrmd_broker.socket) as client:
        der, spki = client.generate_key(key_type, param)
    key = tmp_path / "key.pem"
    key.write_bytes(der_to_pem(der))
    data = tmp_path / "data"
    data.write_bytes(os.urandom(256))
    sig = tmp_path / "sig"
    # pkeyutl, not dgst: tpm2-openssl 1.1.1's dgst -sign fails even with its own keys
    # ("missing private key").
    out = tpm2_openssl(abrmd, "pkeyutl", "-provider", "tpm2", "-provider", "base", "-sign",
                       "-inkey", str(key), "-rawin", "-digest", "sha256", "-in", str(data),
                       "-out", str(sig))
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(data.read_bytes()).digest()
    scheme = p.Scheme.ECDSA if key_type == p.KeyType.EC else p.Scheme.PKCS1
    assert verify(spki, key_type, sig.read_bytes(), digest, p.Hash.SHA256, scheme)
