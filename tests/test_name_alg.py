"""A key's hash (`-pkeyopt digest:`, `tpmbroker keygen --digest`) is its TPM nameAlg.

tpm2-openssl users type `openssl genpkey ... -pkeyopt digest:sha384`; the key is then
named with SHA-384, may have a password as long as a SHA-384 digest (48 bytes), and must
still sign, decrypt and work by persistent handle: everything that computes the key's
Name has to use its nameAlg, or the TPM refuses the session's HMAC.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.tsskey import TSSPrivKey

from .test_provider import MODULE, PROV, TPMBROKER
from .tpmfixtures import BrokerEnv, swtpm_broker

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")
PASSWORD_48 = "p" * 48  # a SHA-384 digest's length: longer than SHA-256 names allow
HANDLE = "0x81000020"
# tpmbroker first: the keymgmt that generates must be ours
GEN_PROV = [*PROV[:2], "-provider", "tpmbroker", "-provider", "default"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerEnv]:
    base = tmp_path_factory.mktemp("name-alg")
    with swtpm_broker(base) as broker:
        yield BrokerEnv(broker, base)


def _name_alg(pem: Path) -> int:
    return int(TSSPrivKey.from_pem(pem.read_bytes()).public.publicArea.nameAlg)


def _genpkey(env: BrokerEnv, out: Path, *opts: str, check: bool = True
             ) -> subprocess.CompletedProcess[bytes]:
    return env.openssl("genpkey", *GEN_PROV, *opts, "-out", str(out), check=check)


def test_ec_key_named_with_sha384_signs_with_a_48_byte_password(env: BrokerEnv) -> None:
    key, pub, sig = env.dir / "ec384.pem", env.dir / "ec384.pub", env.dir / "ec384.sig"
    data = env.dir / "data"
    data.write_bytes(b"named with SHA-384")
    _genpkey(env, key, "-algorithm", "EC", "-pkeyopt", "group:P-384",
             "-pkeyopt", "digest:sha384", "-pkeyopt", f"user-auth:{PASSWORD_48}")
    assert _name_alg(key) == TPM2_ALG.SHA384
    env.openssl("pkey", *PROV, "-in", str(key), "-passin", f"pass:{PASSWORD_48}",
                "-pubout", "-out", str(pub))
    # any digest still signs: the name hash does not bind the signature's
    for md in ("sha256", "sha384"):
        env.openssl("dgst", f"-{md}", *PROV, "-sign", str(key), "-passin",
                    f"pass:{PASSWORD_48}", "-out", str(sig), str(data))
        res = env.openssl("dgst", f"-{md}", "-verify", str(pub), "-signature", str(sig),
                          str(data))
        assert b"Verified OK" in res.stdout


def test_password_longer_than_the_name_hash_is_refused(env: BrokerEnv) -> None:
    res = _genpkey(env, env.dir / "toolong.pem", "-algorithm", "EC", "-pkeyopt",
                   "group:P-256", "-pkeyopt", "digest:sha384", "-pkeyopt",
                   f"user-auth:{PASSWORD_48}x", check=False)
    assert res.returncode != 0
    assert b"at most 48 bytes" in res.stderr, res.stderr.decode()
    # and a SHA-1 name allows 20
    res = _genpkey(env, env.dir / "sha1.pem", "-algorithm", "EC", "-pkeyopt", "group:P-256",
                   "-pkeyopt", "digest:sha1", "-pkeyopt", "user-auth:" + "q" * 21,
                   check=False)
    assert b"at most 20 bytes" in res.stderr, res.stderr.decode()


@pytest.mark.parametrize("md", ["sha1", "sha512"])
def test_ec_key_other_name_hashes(env: BrokerEnv, md: str) -> None:
    key = env.dir / f"ec-{md}.pem"
    _genpkey(env, key, "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
             f"digest:{md}")
    assert _name_alg(key) == {"sha1": TPM2_ALG.SHA1, "sha512": TPM2_ALG.SHA512}[md]
    data = env.dir / "data"
    data.write_bytes(b"x")
    env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-out",
                str(env.dir / f"{md}.sig"), str(data))


def test_rsa_key_named_with_sha384_decrypts(env: BrokerEnv) -> None:
    key, pub = env.dir / "rsa384.pem", env.dir / "rsa384.pub"
    plain, enc, dec = env.dir / "plain", env.dir / "enc", env.dir / "dec"
    plain.write_bytes(b"secret for a SHA-384 named key")
    _genpkey(env, key, "-algorithm", "RSA", "-pkeyopt", "bits:2048", "-pkeyopt",
             "digest:sha384", "-pkeyopt", "user-auth:rsa-pass")
    assert _name_alg(key) == TPM2_ALG.SHA384
    env.openssl("pkey", *PROV, "-in", str(key), "-passin", "pass:rsa-pass", "-pubout",
                "-out", str(pub))
    env.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(pub), "-pkeyopt",
                "rsa_padding_mode:oaep", "-in", str(plain), "-out", str(enc))
    env.openssl("pkeyutl", *PROV, "-decrypt", "-inkey", str(key), "-passin", "pass:rsa-pass",
                "-pkeyopt", "rsa_padding_mode:oaep", "-in", str(enc), "-out", str(dec))
    assert dec.read_bytes() == plain.read_bytes()


def test_sha384_named_key_by_persistent_handle(env: BrokerEnv) -> None:
    key, pub, sig = env.dir / "persist.pem", env.dir / "persist.pub", env.dir / "persist.sig"
    data = env.dir / "data"
    data.write_bytes(b"by handle")
    subprocess.run([TPMBROKER, "keygen", "--alg", "ec:P-384", "--digest", "sha384",
                    "-o", str(key), "--socket", env.broker.socket], check=True, timeout=120)
    assert _name_alg(key) == TPM2_ALG.SHA384
    out = subprocess.run([TPMBROKER, "persist", str(key), HANDLE, "--socket",
                          env.broker.socket], check=True, capture_output=True, text=True,
                         timeout=120).stdout.split()
    assert out[0] == HANDLE
    assert out[1].startswith("000c")  # the Name: nameAlg SHA-384, then its digest
    assert len(bytes.fromhex(out[1])) == 2 + 48
    env.openssl("pkey", *PROV, "-in", f"handle:{HANDLE}", "-pubout", "-out", str(pub))
    env.openssl("dgst", "-sha384", *PROV, "-sign", f"handle:{HANDLE}", "-out", str(sig),
                str(data))
    res = env.openssl("dgst", "-sha384", "-verify", str(pub), "-signature", str(sig),
                      str(data))
    assert b"Verified OK" in res.stdout
