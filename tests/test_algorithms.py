"""Every curve and RSA size the TPM has, asked of the TPM; the key usage of new keys.

swtpm 0.7 (libtpms) here has P-192, P-224, P-256, P-384, P-521 (and BN P-256, BN P-638,
SM2, which OpenSSL has no ECDSA for) and RSA 1024, 2048 and 3072, not 4096. The tests
take what the broker's STATUS says the TPM has: every such key is made and signs, and
every other one is refused with the TPM's reason.
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
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import UnsupportedError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.paths import provider_path

from .test_interop import tpm2_openssl
from .tpmfixtures import Abrmd, Broker, BrokerEnv, swtpm_broker

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
PROV = ["-provider-path", str(provider_path().parent), "-provider", "tpmbroker",
        "-provider", "default"]
CURVES = {"P-192": p.Curve.P192, "P-224": p.Curve.P224, "P-256": p.Curve.P256,
          "P-384": p.Curve.P384, "P-521": p.Curve.P521}
RSA_BITS = [1024, 2048, 3072, 4096]
ALGS = [f"ec:{name}" for name in CURVES] + [f"rsa:{bits}" for bits in RSA_BITS]


class Env(BrokerEnv):
    def __init__(self, broker: Broker, base: Path) -> None:
        super().__init__(broker, base)
        with Client(broker.socket) as client:
            status = client.status()
        self.curves = status["tpm_curves"]
        self.rsa_bits = status["tpm_rsa_bits"]

    def has(self, alg: str) -> bool:
        kind, _, param = alg.partition(":")
        if kind == "ec":
            return isinstance(self.curves, list) and param in self.curves
        return isinstance(self.rsa_bits, list) and int(param) in self.rsa_bits


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("algorithms")
    with swtpm_broker(base) as broker:
        yield Env(broker, base)


def _attributes(pem: Path | bytes) -> int:
    data = pem.read_bytes() if isinstance(pem, Path) else pem
    return int(TSSPrivKey.from_pem(data).public.publicArea.objectAttributes)


def test_status_says_what_the_tpm_has(env: Env) -> None:
    assert isinstance(env.curves, list) and isinstance(env.rsa_bits, list)
    assert {"P-256", "P-384"} <= set(env.curves)
    assert 2048 in env.rsa_bits and set(env.rsa_bits) <= set(RSA_BITS)


def _genpkey_args(alg: str) -> list[str]:
    kind, _, param = alg.partition(":")
    if kind == "ec":
        return ["-algorithm", "EC", "-pkeyopt", f"group:{param}"]
    return ["-algorithm", "RSA", "-pkeyopt", f"bits:{param}"]


@pytest.mark.parametrize("alg", ALGS)
def test_openssl_makes_and_signs_with_every_key_the_tpm_has(env: Env, alg: str) -> None:
    key = env.dir / f"{alg.replace(':', '-')}.pem"
    res = env.openssl("genpkey", *PROV, *_genpkey_args(alg), "-out", str(key), check=False)
    if not env.has(alg):
        # refused with the TPM's word, not the provider's guess
        assert res.returncode != 0
        assert b"this TPM has no " in res.stderr, res.stderr
        assert (b"TPM2_TestParms: TPM_RC_" in res.stderr if alg.startswith("rsa")
                else b"TPM_CAP_ECC_CURVES" in res.stderr), res.stderr
        return
    assert res.returncode == 0, res.stderr
    data = env.dir / "data"
    data.write_bytes(os.urandom(700))
    pub = env.dir / f"{alg.replace(':', '-')}.pub"
    env.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub))
    for md in ("sha256", "sha512"):
        sig = env.dir / f"{alg.replace(':', '-')}-{md}.sig"
        env.openssl("dgst", f"-{md}", *PROV, "-sign", str(key), "-out", str(sig), str(data))
        # the default provider alone verifies
        res = env.openssl("dgst", f"-{md}", "-verify", str(pub), "-signature", str(sig),
                          str(data))
        assert b"Verified OK" in res.stdout
        if alg == "ec:P-521":
            assert 137 <= len(sig.read_bytes()) <= 139  # DER of two 521-bit integers
        if alg.startswith("rsa"):
            assert len(sig.read_bytes()) == int(alg[4:]) // 8


@pytest.mark.parametrize("alg", ALGS)
def test_python_makes_and_signs_with_every_key_the_tpm_has(env: Env, alg: str) -> None:
    kind, _, param = alg.partition(":")
    key_type, value = ((p.KeyType.EC, CURVES[param]) if kind == "ec"
                       else (p.KeyType.RSA, int(param)))
    with Client(env.broker.socket) as client:
        if not env.has(alg):
            with pytest.raises(UnsupportedError, match="this TPM has no") as refused:
                client.generate_key(key_type, value)
            if kind == "rsa":
                assert refused.value.tpm_rc != 0
            return
        der, _ = client.generate_key(key_type, value)
    key = tpmbroker.load_private_key(der_to_pem(der), socket=env.broker.socket)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert key.curve.key_size == {"P-192": 192, "P-224": 224, "P-256": 256,
                                      "P-384": 384, "P-521": 521}[param]
        sig = key.sign(b"message", ec.ECDSA(hashes.SHA384()))
        key.public_key().verify(sig, b"message", ec.ECDSA(hashes.SHA384()))
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == int(param)
        sig = key.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
        assert len(sig) == int(param) // 8
        key.public_key().verify(sig, b"message", padding.PKCS1v15(), hashes.SHA256())


def test_sizes_and_curves_no_tpm_has_are_refused_with_the_tpms_reason(env: Env) -> None:
    """The refusal path on any TPM: RSA-1536 exists nowhere, so TestParms answers."""
    with Client(env.broker.socket) as client:
        with pytest.raises(UnsupportedError,
                           match=r"this TPM has no RSA-1536 \(TPM2_TestParms: TPM_RC_") as e:
            client.generate_key(p.KeyType.RSA, 1536)
        assert e.value.tpm_rc & 0xBF == 0x84  # TPM_RC_VALUE, a parameter number aside
        # BN P-256: the TPM may have it, OpenSSL has no ECDSA name for it
        with pytest.raises(UnsupportedError, match="no ECDSA"):
            client.generate_key(p.KeyType.EC, 0x0010)
    res = subprocess.run([TPMBROKER, "keygen", "--alg", "rsa:1536", "-o",
                          str(env.dir / "x.pem"), "--socket", env.broker.socket],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "TPM2_TestParms" in res.stderr


@pytest.mark.parametrize(("usage", "sign", "decrypt"), [
    (None, True, True), ("sign", True, False), ("decrypt", False, True),
    ("sign,decrypt", True, True)])
def test_usage_sets_the_key_attributes(env: Env, usage: str | None, sign: bool,
                                       decrypt: bool) -> None:
    """The same usage through openssl, tpmbroker keygen and Python gives the same TPM
    attributes, read back from each key file's public area. Without a usage, keys sign
    and decrypt, as tpm2-openssl's genpkey makes them; `sign` and `decrypt` narrow."""
    name = usage.replace(",", "-") if usage else "default"
    made: dict[str, int] = {}
    for alg, args in (("ec", ["-algorithm", "EC", "-pkeyopt", "group:P-256"]),
                      ("rsa", ["-algorithm", "RSA", "-pkeyopt", "bits:2048"])):
        key = env.dir / f"usage-{name}-{alg}.pem"
        env.openssl("genpkey", *PROV, *args,
                    *(["-pkeyopt", f"usage:{usage}"] if usage else []), "-out", str(key))
        made[f"openssl {alg}"] = _attributes(key)
        cli_key = env.dir / f"usage-{name}-{alg}-cli.pem"
        subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-256" if alg == "ec" else "rsa:2048",
                        *(["--usage", usage] if usage else []), "-o", str(cli_key),
                        "--socket", env.broker.socket], check=True, timeout=120)
        made[f"cli {alg}"] = _attributes(cli_key)
    with Client(env.broker.socket) as client:
        wire = {None: p.Usage.DEFAULT, "sign": p.Usage.SIGN, "decrypt": p.Usage.DECRYPT,
                "sign,decrypt": p.Usage.SIGN_DECRYPT}[usage]
        der, _ = client.generate_key(p.KeyType.RSA, 2048, usage=wire)
        made["python rsa"] = _attributes(der_to_pem(der))
        if usage in (None, "sign"):  # RSA-PSS keys only sign, whatever the default
            der, _ = client.generate_key(p.KeyType.RSA_PSS, 2048, usage=wire)
            pss = _attributes(der_to_pem(der))
            assert pss & TPMA_OBJECT.SIGN_ENCRYPT and not pss & TPMA_OBJECT.DECRYPT
    for where, attributes in made.items():
        assert bool(attributes & TPMA_OBJECT.SIGN_ENCRYPT) == sign, where
        assert bool(attributes & TPMA_OBJECT.DECRYPT) == decrypt, where
        assert not attributes & TPMA_OBJECT.RESTRICTED, where


def test_p521_key_files_from_tpm2_openssl_load_and_sign(abrmd: Abrmd, abrmd_broker: Broker,
                                                        tmp_path: Path) -> None:
    key = tmp_path / "p521.pem"
    out = tpm2_openssl(abrmd, "genpkey", "-provider", "tpm2", "-provider", "base",
                       "-algorithm", "EC", "-pkeyopt", "group:P-521", "-out", str(key))
    assert out.returncode == 0, out.stderr
    with Client(abrmd_broker.socket) as client:
        loaded = client.load_key(key)
        assert loaded.curve == p.Curve.P521 and loaded.bits == 521
        digest = hashlib.sha512(b"p521").digest()
        sig = client.sign(loaded, digest, p.Hash.SHA512, p.Scheme.ECDSA)
    public = tpmbroker.load_private_key(key, socket=abrmd_broker.socket).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    from cryptography.hazmat.primitives.asymmetric import utils
    public.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA512())))
    # and through the provider, checked by the default provider alone
    env = dict(os.environ, TPMBROKER_SOCKET=abrmd_broker.socket, OPENSSL_CONF=os.devnull)
    data, sig_path, pub = tmp_path / "data", tmp_path / "sig", tmp_path / "pub.pem"
    data.write_bytes(os.urandom(300))
    for args in (["dgst", "-sha512", *PROV, "-sign", str(key), "-out", str(sig_path),
                  str(data)],
                 ["pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub)]):
        res = subprocess.run(["openssl", *args], env=env, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
    res = subprocess.run(["openssl", "dgst", "-sha512", "-verify", str(pub), "-signature",
                          str(sig_path), str(data)], capture_output=True, timeout=60)
    assert b"Verified OK" in res.stdout
