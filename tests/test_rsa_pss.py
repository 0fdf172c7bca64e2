"""RSA-PSS keys: TPM keys whose scheme is bound to RSASSA-PSS, as OpenSSL's RSA-PSS key type.

With tpmbroker listed first, `openssl genpkey -algorithm RSA-PSS` must make a TPM key,
not fall through to the default provider's software key; RSA-PSS key files from
tpm2-openssl load and sign; the public key is an RSA-PSS key with the bound digest, so
the default provider alone verifies what the TPM signed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PUBLIC

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import UnsupportedError
from tpmbroker.paths import provider_path

from .test_interop import tpm2_openssl
from .tpmfixtures import Abrmd, Broker, BrokerEnv, swtpm_broker

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
# tpmbroker first: the RSA-PSS keymgmt that generates must be ours.
PROV = ["-provider-path", str(provider_path().parent), "-provider", "tpmbroker",
        "-provider", "default"]
RSASSA_PSS_OID_DER = bytes.fromhex("06092a864886f70d01010a")


Env = BrokerEnv


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("rsa-pss")
    with swtpm_broker(base) as broker:
        yield Env(broker, base)


def _public_area(pem: Path) -> object:
    return TSSPrivKey.from_pem(pem.read_bytes()).public.publicArea


@pytest.mark.parametrize(("opts", "md"), [([], "sha256"),
                                          (["-pkeyopt", "digest:sha384"], "sha384"),
                                          (["-pkeyopt", "rsa_keygen_bits:3072", "-pkeyopt",
                                            "digest:sha512"], "sha512")])
def test_genpkey_rsa_pss_makes_a_tpm_key_that_signs_pss(env: Env, opts: list[str],
                                                         md: str) -> None:
    key = env.dir / f"pss-{md}.pem"
    env.openssl("genpkey", *PROV, "-algorithm", "RSA-PSS", *opts, "-out", str(key))
    text = key.read_text()
    assert text.startswith("-----BEGIN TSS2 PRIVATE KEY-----"), text[:40]
    public = _public_area(key)
    scheme = public.parameters.rsaDetail.scheme  # type: ignore[attr-defined]
    assert scheme.scheme == TPM2_ALG.RSAPSS
    assert scheme.details.anySig.hashAlg == p.Hash.from_name(md)
    attributes = int(public.objectAttributes)  # type: ignore[attr-defined]
    assert attributes & TPMA_OBJECT.SIGN_ENCRYPT and not attributes & TPMA_OBJECT.DECRYPT
    # the public key is an RSA-PSS key, bound to the digest
    pub = env.dir / f"pss-{md}.pub"
    env.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-outform", "DER", "-out", str(pub))
    assert RSASSA_PSS_OID_DER in pub.read_bytes()[:30]
    data = env.dir / "data"
    data.write_bytes(os.urandom(1000))
    sig = env.dir / f"pss-{md}.sig"
    env.openssl("dgst", f"-{md}", *PROV, "-sign", str(key), "-out", str(sig), str(data))
    # the default provider alone verifies
    res = env.openssl("dgst", f"-{md}", "-keyform", "DER", "-verify", str(pub), "-signature",
                      str(sig), str(data))
    assert b"Verified OK" in res.stdout
    # a signature without options is PSS with the bound digest too
    env.openssl("pkeyutl", *PROV, "-sign", "-inkey", str(key), "-rawin", "-in", str(data),
                "-out", str(sig))
    res = env.openssl("pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", str(pub),
                      "-rawin", "-in", str(data), "-sigfile", str(sig), "-digest", md)
    assert b"Signature Verified Successfully" in res.stdout


def test_rsa_pss_keys_refuse_other_digests_and_pkcs1_with_a_reason(env: Env) -> None:
    key = env.dir / "bound.pem"
    env.openssl("genpkey", *PROV, "-algorithm", "RSA-PSS", "-pkeyopt", "digest:sha384",
                "-out", str(key))
    data = env.dir / "data"
    data.write_bytes(b"x")
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-out", os.devnull,
                      str(data), check=False)
    assert res.returncode != 0 and b"bound to SHA2-384" in res.stderr
    res = env.openssl("dgst", "-sha384", *PROV, "-sign", str(key), "-sigopt",
                      "rsa_padding_mode:pkcs1", "-out", os.devnull, str(data), check=False)
    assert res.returncode != 0 and b"PSS only" in res.stderr
    res = env.openssl("genpkey", *PROV, "-algorithm", "RSA-PSS", "-pkeyopt", "digest:md5",
                      "-out", str(env.dir / "md5.pem"), check=False)
    assert res.returncode != 0 and b"digest md5" in res.stderr


def test_req_and_x509_with_an_rsa_pss_key(env: Env) -> None:
    key = env.dir / "ca.pem"
    env.openssl("genpkey", *PROV, "-algorithm", "RSA-PSS", "-out", str(key))
    cert = env.dir / "ca.crt"
    # A CA says so: OpenSSL 3.5 refuses to chain to a v3 certificate without
    # basicConstraints CA:TRUE ("invalid CA certificate"), which 3.0 let pass.
    env.openssl("req", "-new", "-x509", *PROV, "-key", str(key), "-subj", "/CN=pss ca",
                "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(cert))
    text = env.openssl("x509", "-in", str(cert), "-noout", "-text").stdout
    assert b"Signature Algorithm: rsassaPss" in text
    assert b"Public Key Algorithm: rsassaPss" in text
    # a CSR signed by the TPM key, then a certificate issued by it
    csr = env.dir / "leaf.csr"
    leaf_key = env.dir / "leaf.pem"
    env.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                str(leaf_key))
    env.openssl("req", "-new", "-key", str(leaf_key), "-subj", "/CN=leaf", "-out", str(csr))
    leaf = env.dir / "leaf.crt"
    env.openssl("x509", "-req", *PROV, "-in", str(csr), "-CA", str(cert), "-CAkey", str(key),
                "-CAcreateserial", "-days", "1", "-out", str(leaf))
    res = env.openssl("verify", "-CAfile", str(cert), str(leaf))  # default provider alone
    assert b"OK" in res.stdout


def test_tpmbroker_keygen_and_python_rsa_pss(env: Env) -> None:
    key = env.dir / "cli-pss.pem"
    subprocess.run([TPMBROKER, "keygen", "--alg", "rsa-pss:2048", "--digest", "sha512",
                    "-o", str(key), "--socket", env.broker.socket], check=True, timeout=120)
    public = _public_area(key)
    assert public.parameters.rsaDetail.scheme.scheme == TPM2_ALG.RSAPSS  # type: ignore[attr-defined]
    tpm_key = tpmbroker.load_private_key(key, socket=env.broker.socket)
    assert isinstance(tpm_key, rsa.RSAPrivateKey)
    pss = padding.PSS(padding.MGF1(hashes.SHA512()), padding.PSS.DIGEST_LENGTH)
    sig = tpm_key.sign(b"message", pss, hashes.SHA512())
    tpm_key.public_key().verify(sig, b"message", pss, hashes.SHA512())
    with pytest.raises(UnsupportedError, match="PSS only"):
        tpm_key.sign(b"message", padding.PKCS1v15(), hashes.SHA512())
    with Client(env.broker.socket) as client:
        loaded = client.load_key(key)
        assert loaded.key_type == p.KeyType.RSA_PSS
        # no scheme given: PSS, the only one the key has
        digest = hashlib.sha512(b"m").digest()
        client.sign(loaded, digest, p.Hash.SHA512)
        with pytest.raises(UnsupportedError, match=r"only signs with .*RSAPSS.*SHA512"):
            client.sign(loaded, hashlib.sha256(b"m").digest(), p.Hash.SHA256, p.Scheme.PSS)
        with pytest.raises(UnsupportedError, match="only signs"):
            client.generate_key(p.KeyType.RSA_PSS, 2048, usage=p.Usage.SIGN_DECRYPT)


@pytest.fixture
def theirs(abrmd: Abrmd, abrmd_broker: Broker, tmp_path: Path) -> tuple[Env, Path, Path]:
    """RSA-PSS key files by two other writers, on the TPM the broker uses: tpm2-openssl
    (`genpkey -provider tpm2 -algorithm RSA-PSS`) and tpm2-pytss (an unrestricted key with
    scheme RSAPSS/SHA-256)."""
    openssl_key = tmp_path / "tpm2-openssl.pem"
    # tpm2-openssl 1.1.1 needs the digest given: without it the TPM refuses its template
    # (TPM_RC_HASH).
    out = tpm2_openssl(abrmd, "genpkey", "-provider", "tpm2", "-provider", "base",
                       "-algorithm", "RSA-PSS", "-pkeyopt", "digest:sha384", "-out",
                       str(openssl_key))
    assert out.returncode == 0, out.stderr
    with ESAPI(TCTILdr.parse(abrmd.tcti)) as ectx:
        template = TPM2B_PUBLIC.parse(
            "rsa2048:rsapss-sha256:null", objectAttributes="userwithauth|sign|fixedtpm|"
            "fixedparent|sensitivedataorigin|noda").publicArea
        pytss_key = tmp_path / "tpm2-pytss.pem"
        pytss_key.write_bytes(TSSPrivKey.create(ectx, template).to_pem())
    return Env(abrmd_broker, tmp_path), openssl_key, pytss_key


def _sign_and_verify(env: Env, key: Path, md: str) -> None:
    data = env.dir / "data"
    data.write_bytes(os.urandom(500))
    sig = env.dir / "sig"
    env.openssl("dgst", f"-{md}", *PROV, "-sign", str(key), "-out", str(sig), str(data))
    pub = env.dir / "pub.pem"
    env.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub))
    res = env.openssl("dgst", f"-{md}", "-verify", str(pub), "-signature", str(sig),
                      str(data))
    assert b"Verified OK" in res.stdout


def test_rsa_pss_key_files_of_other_writers_decode_as_rsa_pss(
        theirs: tuple[Env, Path, Path], abrmd: Abrmd) -> None:
    env, openssl_key, pytss_key = theirs
    # why tpmbroker refused tpm2-openssl's files before it knew RSA-PSS keys: besides the
    # scheme, tpm2-openssl makes them restricted (signing them is the restricted-key path)
    attributes = int(_public_area(openssl_key).objectAttributes)  # type: ignore[attr-defined]
    assert attributes & TPMA_OBJECT.RESTRICTED
    for key, md in ((openssl_key, "SHA2-384"), (pytss_key, "SHA2-256")):
        text = env.openssl("pkey", *PROV, "-in", str(key), "-text_pub", "-noout").stdout
        assert b"RSA-PSS" in text or b"PSS parameter restrictions" in text, text
        assert f"Hash Algorithm: {md}".encode() in text
    # the public key tpmbroker reads from tpm2-openssl's file is the one tpm2-openssl reads
    ours = env.openssl("pkey", *PROV, "-in", str(openssl_key), "-pubout", "-outform",
                       "DER").stdout
    out = subprocess.run(["openssl", "pkey", "-provider", "tpm2", "-provider", "base", "-in",
                          str(openssl_key), "-pubout", "-outform", "DER"],
                         env=dict(abrmd.env(), TPM2OPENSSL_TCTI=abrmd.tcti),
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mine, peer = load_der_public_key(ours), load_der_public_key(out.stdout)
    assert isinstance(mine, rsa.RSAPublicKey) and isinstance(peer, rsa.RSAPublicKey)
    assert mine.public_numbers() == peer.public_numbers()


def test_an_unrestricted_rsa_pss_key_file_of_another_writer_signs(
        theirs: tuple[Env, Path, Path]) -> None:
    env, _, pytss_key = theirs
    _sign_and_verify(env, pytss_key, "sha256")


def test_tpm2_openssl_rsa_pss_key_files_sign(theirs: tuple[Env, Path, Path]) -> None:
    env, openssl_key, _ = theirs
    # tpm2-openssl makes its RSA-PSS keys restricted: the TPM hashes the message.
    _sign_and_verify(env, openssl_key, "sha384")
