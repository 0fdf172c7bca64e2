"""tpm2-openssl users' commands with `-provider tpmbroker` alone, with `-provider base` beside
it, and after `-provider default`: public keys written in every form by tpmbroker's own
encoders, RSA-PSS public keys without the caller's digests, `genrsa`, store errors where the
apps expect them, PEM certificates in NV indexes, and an error line of tpmbroker's on every
failure.

One swtpm, tpm2-abrmd and one broker serve the module; tpm2-tools persist the keys and write
the NV indexes beside the broker, as users do.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss.tsskey import TSSPrivKey

import tpmbroker

from .tpmfixtures import Abrmd, Broker, BrokerEnv, DbusDaemon, have, running_swtpm

pytestmark = pytest.mark.skipif(not have("tpm2_evictcontrol"), reason="tpm2-tools not installed")

MODDIR = str(Path(tpmbroker.__file__).parent)
ALONE = ("tpmbroker",)
WITH_BASE = ("tpmbroker", "base")
DEFAULT_FIRST = ("default", "tpmbroker")
ORDERS = [ALONE, WITH_BASE, DEFAULT_FIRST]
EC_HANDLE = "0x81000000"
RSA_HANDLE = "0x81000001"
PASSWORD_HANDLE = "0x81000002"  # EC, password "secret", noDA: a wrong one costs no count
NV_PEM = "0x01000001"          # a PEM certificate, the index exactly its size
NV_PEM_PADDED = "0x01000002"   # the same in a larger index: what follows it is padding
NV_DER_PADDED = "0x01000003"
NV_JUNK = "0x01000004"
NV_SPKI_PEM_PADDED = "0x01000005"  # a public key (SubjectPublicKeyInfo), PEM, padded
NV_SPKI_DER_PADDED = "0x01000006"  # the same as DER


def prov(order: tuple[str, ...]) -> list[str]:
    args = ["-provider-path", MODDIR]
    for name in order:
        args += ["-provider", name]
    return args


def order_id(order: tuple[str, ...]) -> str:
    return "+".join(order)


class World(BrokerEnv):
    def __init__(self, base: Path, broker: Broker, tpm_public: dict[str, bytes],
                 certificate: bytes) -> None:
        super().__init__(broker, base)
        self.tpm_public = tpm_public  # handle -> SubjectPublicKeyInfo DER, as tpm2-tools read it
        self.certificate = certificate  # DER of the certificate in the NV indexes


def self_signed_certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certificate in NV")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_bus: DbusDaemon) -> Iterator[World]:
    d = tmp_path_factory.mktemp("alone")
    with running_swtpm(d / "tpmstate") as tpm:
        rm = Abrmd(tpm.tcti, d / "abrmd", session_bus, max_connections=100)
        rm.start()
        try:
            tools_env = dict(os.environ, **rm.env(), TPM2TOOLS_TCTI=rm.tcti)

            def tools(*args: str) -> None:
                res = subprocess.run(list(args), capture_output=True, env=tools_env, cwd=d,
                                     timeout=120)
                assert res.returncode == 0, (args, res.stderr.decode())

            tools("tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
            for name, alg, handle, extra in (
                    ("ec", "ecc256", EC_HANDLE, ()),
                    ("rsa", "rsa2048", RSA_HANDLE, ()),
                    ("pw", "ecc256", PASSWORD_HANDLE, (
                        "-p", "secret", "-a", "fixedtpm|fixedparent|sensitivedataorigin|"
                        "userwithauth|noda|sign"))):
                tools("tpm2_create", "-C", "prim.ctx", "-G", alg, *extra, "-u", f"{name}.pub",
                      "-r", f"{name}.priv")
                tools("tpm2_load", "-C", "prim.ctx", "-u", f"{name}.pub", "-r", f"{name}.priv",
                      "-c", f"{name}.ctx")
                tools("tpm2_evictcontrol", "-C", "o", "-c", f"{name}.ctx", handle, "-o",
                      f"{name}.tr")
                tools("tpm2_flushcontext", "-t")
            public = {}
            for handle in (EC_HANDLE, RSA_HANDLE):
                tools("tpm2_readpublic", "-c", handle, "-f", "pem", "-o", f"{handle}.pem")
                public[handle] = serialization.load_pem_public_key(
                    (d / f"{handle}.pem").read_bytes()).public_bytes(
                        serialization.Encoding.DER,
                        serialization.PublicFormat.SubjectPublicKeyInfo)
            cert = self_signed_certificate()
            pem = cert.public_bytes(serialization.Encoding.PEM)
            der = cert.public_bytes(serialization.Encoding.DER)
            (d / "cert.pem").write_bytes(pem)
            (d / "cert.der").write_bytes(der)
            (d / "junk").write_bytes(b"no certificate here\n")
            (d / "spki.der").write_bytes(public[EC_HANDLE])
            tools("openssl", "pkey", "-pubin", "-inform", "DER", "-in", "spki.der",
                  "-out", "spki.pem")
            for index, size, source in ((NV_PEM, len(pem), "cert.pem"),
                                        (NV_PEM_PADDED, 1500, "cert.pem"),
                                        (NV_DER_PADDED, 1500, "cert.der"),
                                        (NV_JUNK, 64, "junk"),
                                        (NV_SPKI_PEM_PADDED, 400, "spki.pem"),
                                        (NV_SPKI_DER_PADDED, 400, "spki.der")):
                tools("tpm2_nvdefine", index, "-C", "o", "-s", str(size), "-a",
                      "ownerread|ownerwrite|authread|authwrite")
                tools("tpm2_nvwrite", index, "-C", "o", "-i", source)
            with Broker(rm.tcti, d / "broker", env=rm.env()) as broker:
                yield World(d, broker, public, der)
        finally:
            rm.stop()


def spki_of(world: World, path: Path, der: bool = False) -> bytes:
    """What the default provider alone reads in a public key file, as SPKI DER."""
    res = world.openssl("pkey", "-pubin", "-in", str(path), "-inform", "DER" if der else "PEM",
                        "-pubout", "-outform", "DER")
    return res.stdout


# --- 1. public keys in every form, whatever the providers -------------------------------

@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("uri", ["handle", "object"])
def test_pkey_pubout_of_persistent_keys(world: World, order: tuple[str, ...], uri: str) -> None:
    for name, handle in (("ec", EC_HANDLE), ("rsa", RSA_HANDLE)):
        source = f"handle:{handle}" if uri == "handle" else f"object:{world.dir / name}.tr"
        tag = f"{name}-{uri}-{order_id(order)}"
        pem, der = world.dir / f"{tag}.pub", world.dir / f"{tag}.pub.der"
        # tpm2-openssl's documented line, -propquery included
        res = world.openssl("pkey", *prov(order), "-propquery", "?provider=tpmbroker",
                            "-in", source, "-pubout", "-out", str(pem))
        assert res.stderr == b""
        assert pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
        world.openssl("pkey", *prov(order), "-in", source, "-pubout", "-outform", "DER",
                      "-out", str(der))
        # The TPM's key, as tpm2_readpublic reads it, read back by the default provider
        assert spki_of(world, pem) == world.tpm_public[handle]
        assert spki_of(world, der, der=True) == der.read_bytes() == world.tpm_public[handle]
        if order != ALONE:
            # and by tpmbroker's own key management, which takes the public key in
            again = world.openssl("pkey", *prov(order), "-pubin", "-in", str(pem), "-pubout")
            assert again.stdout == pem.read_bytes()


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
def test_rsa_and_ec_commands_write_public_keys(world: World, order: tuple[str, ...]) -> None:
    rsa_key, ec_key = f"handle:{RSA_HANDLE}", f"object:{world.dir / 'ec.tr'}"
    spki = world.openssl("rsa", *prov(order), "-in", rsa_key, "-pubout").stdout
    assert spki.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    (world.dir / "rsa-spki.pem").write_bytes(spki)
    assert spki_of(world, world.dir / "rsa-spki.pem") == world.tpm_public[RSA_HANDLE]

    # PKCS#1 RSAPublicKey, PEM and DER: the same modulus as the TPM's key
    modulus = world.openssl("rsa", "-pubin", "-in", str(world.dir / "rsa-spki.pem"),
                            "-modulus", "-noout").stdout
    pkcs1 = world.openssl("rsa", *prov(order), "-in", rsa_key, "-RSAPublicKey_out").stdout
    assert pkcs1.startswith(b"-----BEGIN RSA PUBLIC KEY-----\n")
    (world.dir / "pkcs1.pem").write_bytes(pkcs1)
    assert world.openssl("rsa", "-RSAPublicKey_in", "-in", str(world.dir / "pkcs1.pem"),
                         "-modulus", "-noout").stdout == modulus
    world.openssl("rsa", *prov(order), "-in", rsa_key, "-RSAPublicKey_out", "-outform", "DER",
                  "-out", str(world.dir / "pkcs1.der"))
    assert world.openssl("rsa", "-RSAPublicKey_in", "-inform", "DER", "-in",
                         str(world.dir / "pkcs1.der"), "-modulus", "-noout").stdout == modulus
    assert world.openssl("rsa", *prov(order), "-in", rsa_key, "-modulus",
                         "-noout").stdout == modulus

    ec_pem = world.openssl("ec", *prov(order), "-in", ec_key, "-pubout").stdout
    (world.dir / "ec-spki.pem").write_bytes(ec_pem)
    assert spki_of(world, world.dir / "ec-spki.pem") == world.tpm_public[EC_HANDLE]


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
def test_text_of_persistent_keys(world: World, order: tuple[str, ...]) -> None:
    text = world.openssl("pkey", *prov(order), "-in", f"handle:{EC_HANDLE}", "-text",
                         "-noout").stdout.decode()
    assert f"TPM EC-256 key at persistent handle {EC_HANDLE}" in text
    assert "Public-Key: (256 bit)" in text and "ASN1 OID: prime256v1" in text
    text = world.openssl("pkey", *prov(order), "-in", f"object:{world.dir / 'rsa.tr'}",
                         "-text_pub", "-noout").stdout.decode()
    assert "Public-Key: (2048 bit)" in text and "Exponent: 65537" in text
    assert "TPM" not in text  # the public half only


# --- 2. RSA-PSS: the parameters are written without the caller's digests --------------------

@pytest.fixture(scope="module")
def pss_key(world: World) -> Path:
    path = world.dir / "pss.pem"
    world.openssl("genpkey", *prov(("tpmbroker", "default")), "-algorithm", "RSA-PSS",
                  "-pkeyopt", "digest:sha384", "-out", str(path))
    return path


@pytest.mark.parametrize("order", [WITH_BASE, DEFAULT_FIRST], ids=order_id)
def test_rsa_pss_key_file_public_key(world: World, pss_key: Path,
                                     order: tuple[str, ...]) -> None:
    out = world.dir / f"pss-{order_id(order)}.pub"
    res = world.openssl("pkey", *prov(order), "-in", str(pss_key), "-pubout", "-out", str(out))
    assert b"unsupported" not in res.stderr
    text = world.openssl("pkey", "-pubin", "-in", str(out), "-text", "-noout").stdout.decode()
    assert "PSS parameter restrictions:" in text
    assert "Hash Algorithm: SHA2-384" in text and "MGF1 with SHA2-384" in text
    assert "Minimum Salt Length: 48" in text
    # the modulus is the one in the key file
    tss = TSSPrivKey.from_pem(pss_key.read_bytes())
    n = bytes(tss.public.publicArea.unique.rsa)
    modulus = world.openssl("rsa", "-pubin", "-in", str(out), "-modulus", "-noout").stdout
    assert modulus.strip() == b"Modulus=" + n.hex().upper().encode()
    der = world.openssl("pkey", *prov(order), "-in", str(pss_key), "-pubout",
                        "-outform", "DER").stdout
    assert der == spki_of(world, out)


# --- 3. genrsa -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [ALONE, WITH_BASE, ("tpmbroker", "default")], ids=order_id)
def test_genrsa(world: World, order: tuple[str, ...]) -> None:
    key = world.dir / f"genrsa-{order_id(order)}.pem"
    res = world.openssl("genrsa", *prov(order), "-verbose", "-out", str(key), "1024")
    assert b"e is 65537" in res.stderr
    assert key.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    # a TPM key: it signs through the broker, and the default provider verifies
    data = world.dir / "genrsa-data"
    data.write_bytes(b"made by genrsa")
    world.openssl("pkey", *prov(WITH_BASE), "-in", str(key), "-pubout", "-out",
                  f"{key}.pub")
    world.openssl("dgst", "-sha256", *prov(WITH_BASE), "-sign", str(key), "-out",
                  f"{key}.sig", str(data))
    verified = world.openssl("dgst", "-sha256", "-verify", f"{key}.pub", "-signature",
                             f"{key}.sig", str(data))
    assert b"Verified OK" in verified.stdout


def test_genrsa_refuses_other_prime_counts(world: World) -> None:
    res = world.openssl("genrsa", *prov(ALONE), "-primes", "3", "-out",
                        str(world.dir / "three.pem"), "1024", check=False)
    assert res.returncode != 0
    assert re.search(rb":tpmbroker:.*3 primes: the TPM makes two-prime keys only", res.stderr)
    assert not (world.dir / "three.pem").exists() or (world.dir / "three.pem").stat().st_size == 0


# --- 6. store errors where the apps expect them ----------------------------------------------

@pytest.mark.parametrize("order", ORDERS, ids=order_id)
def test_store_errors(world: World, order: tuple[str, ...]) -> None:
    large = world.dir / "largefile"
    large.write_bytes(bytes(10241))  # tpm2-openssl's test: dd ... count=1 seek=10240

    def fails(uri: str) -> str:
        res = world.openssl("rsa", *prov(order), "-in", uri, "-modulus", "-noout", check=False)
        assert res.returncode != 0
        return res.stderr.decode()

    err = fails("object:unknown")
    assert "Could not open file or uri" in err
    assert re.search(r":tpmbroker:.*object:unknown: cannot open unknown: No such file", err)
    err = fails(f"object:{large}")
    assert re.search(r"Could not (find|read)", err)
    assert re.search(r":tpmbroker:.*not a serialized TPM object \(more than 4096 bytes\)", err)
    err = fails("handle:0xBAD")
    assert re.search(r"Could not (find|read)", err)
    assert re.search(r":tpmbroker:.*handle:0xBAD: give a persistent handle", err)


# --- 7. certificates in NV indexes, DER or PEM -----------------------------------------------

@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("index", [NV_PEM, NV_PEM_PADDED, NV_DER_PADDED])
def test_nv_certificate_pem_or_der(world: World, order: tuple[str, ...], index: str) -> None:
    der = world.openssl("x509", *prov(order), "-in", f"handle:{index}", "-outform",
                        "DER").stdout
    assert der == world.certificate
    if order != ALONE:  # printing the certificate's key needs a decoder for it
        text = world.openssl("x509", *prov(order), "-in", f"handle:{index}", "-text",
                             "-noout")
        # OpenSSL 3.0 writes "CN = ...", 3.5 "CN=..."
        assert re.search(rb"Subject: CN ?= ?certificate in NV", text.stdout), text.stdout
        assert b"Public-Key: (256 bit)" in text.stdout and text.stderr == b""


def test_nv_index_without_a_certificate(world: World) -> None:
    res = world.openssl("x509", *prov(WITH_BASE), "-in", f"handle:{NV_JUNK}", "-noout",
                        check=False)
    assert res.returncode != 0
    assert re.search(rb":tpmbroker:.*NV index 0x01000004 holds no certificate or public key: "
                     rb"neither DER nor PEM", res.stderr)


@pytest.mark.parametrize("order", [WITH_BASE, DEFAULT_FIRST], ids=order_id)
@pytest.mark.parametrize("index", [NV_SPKI_PEM_PADDED, NV_SPKI_DER_PADDED])
def test_nv_public_key_pem_or_der(world: World, order: tuple[str, ...], index: str) -> None:
    """A public key in NV (tpm2-openssl's keys.md keeps a -peerkey there) is handed on
    as a SubjectPublicKeyInfo, for the decoders of -provider base or default to read."""
    res = world.openssl("pkey", *prov(order), "-pubin", "-in", f"handle:{index}", "-pubout",
                        "-outform", "DER")
    assert res.stdout == world.tpm_public[EC_HANDLE]
    # a certificate index is not a public key
    res = world.openssl("pkey", *prov(order), "-pubin", "-in", f"handle:{NV_DER_PADDED}",
                        "-noout", check=False)
    assert res.returncode != 0


# --- 8. digests where no provider has them ---------------------------------------------------

DIGESTS = ("sha1", "sha224", "sha256", "sha384", "sha512")
DEFAULT_QUERIED = ("tpmbroker", "default")


@pytest.mark.parametrize("order", [ALONE, WITH_BASE, DEFAULT_FIRST, DEFAULT_QUERIED],
                         ids=order_id)
def test_digests_only_where_no_provider_has_them(world: World, order: tuple[str, ...]) -> None:
    """tpmbroker's software digests serve `-provider base` (req's subject key identifier
    needs SHA-1) and tpmbroker alone; with the default provider loaded, in either order
    and even when the query prefers tpmbroker, hashing stays with the default provider."""
    query = ["-propquery", "?provider=tpmbroker"] if order == DEFAULT_QUERIED else []
    listed = world.openssl("list", "-digest-algorithms", *prov(order), *query).stdout
    ours = b"@ tpmbroker" in listed
    assert ours == ("default" not in order), listed.decode()
    data = world.dir / "digest-input"
    data.write_bytes(b"hash me" * 1000)
    for md in DIGESTS:
        out = world.openssl("dgst", f"-{md}", "-r", *prov(order), *query, str(data)).stdout
        assert out.split()[0].decode() == hashlib.new(md, data.read_bytes()).hexdigest()


@pytest.mark.parametrize("order", [ALONE, WITH_BASE, DEFAULT_FIRST], ids=order_id)
def test_ec_parameters_make_tpm_keys_only_where_no_provider_reads_them(
        world: World, order: tuple[str, ...]) -> None:
    """`genpkey -paramfile` (parameters from `openssl ecparam`) makes a TPM key with
    tpmbroker alone or with base; beside the default provider, which reads EC parameters
    itself, tpmbroker's decoder stays out and the key is the default provider's, as before."""
    params = world.dir / "p256.pem"
    world.openssl("ecparam", "-name", "prime256v1", "-out", str(params))
    key = world.dir / f"paramfile-{order_id(order)}.pem"
    world.openssl("genpkey", *prov(order), "-paramfile", str(params), "-out", str(key))
    first = key.read_text().splitlines()[0]
    tpm = "default" not in order
    assert first == ("-----BEGIN TSS2 PRIVATE KEY-----" if tpm else "-----BEGIN PRIVATE KEY-----")


# --- 9. no silent failure --------------------------------------------------------------------

def test_every_failure_says_why(world: World) -> None:
    data = world.dir / "data"
    data.write_bytes(b"to sign")
    down = dict(world.environ, TPMBROKER_SOCKET=str(world.dir / "no-broker.sock"))
    cases: list[tuple[list[str], dict[str, str] | None, str]] = [
        (["pkey", "-in", "handle:0x81000099", "-pubout"], None,
         "no persistent key at 0x81000099"),
        (["pkey", "-in", f"handle:{EC_HANDLE}", "-pubout"], down, "cannot reach tpmbroker"),
        (["genrsa", "-out", str(world.dir / "down.pem"), "1024"], down,
         "cannot reach tpmbroker"),
        (["x509", "-in", f"handle:{NV_PEM}", "-noout"], down, "cannot reach tpmbroker"),
        (["pkeyutl", "-sign", "-rawin", "-digest", "sha256", "-in", str(data), "-inkey",
          f"handle:{PASSWORD_HANDLE}?pass", "-passin", "pass:wrong"], None,
         "wrong TPM key password"),
        (["dgst", "-sha256", "-sign", f"handle:{PASSWORD_HANDLE}?pass", "-passin",
          "pass:wrong", str(data)], None, "wrong TPM key password"),
        (["pkey", "-in", f"handle:{EC_HANDLE}", "-out", str(world.dir / "priv.pem")], None,
         "no key file to write"),
        (["x509", "-in", "handle:0x01000099", "-noout"], None, "no NV index at 0x01000099"),
        (["genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-999"], None, "curve P-999"),
    ]
    for args, env, reason in cases:
        res = world.openssl(args[0], *prov(ALONE), *args[1:], check=False, env=env)
        assert res.returncode != 0, args
        lines = [line for line in res.stderr.decode().splitlines() if ":tpmbroker:" in line]
        assert lines and reason in "\n".join(lines), (args, res.stderr.decode())
    # the right password signs (the refusals above cost nothing: the key is noDA)
    world.openssl("pkeyutl", *prov(ALONE), "-sign", "-rawin", "-digest", "sha256", "-in",
                  str(data), "-inkey", f"handle:{PASSWORD_HANDLE}?pass", "-passin",
                  "pass:secret", "-out", str(world.dir / "data.sig"))
