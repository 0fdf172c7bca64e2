"""RSA decryption end to end: real swtpm, real `tpmbroker serve`, the real openssl CLI.

Every ciphertext is made by OpenSSL's default provider alone (or by cryptography), then
decrypted with the TPM key through tpmbroker: pkeyutl, cms and smime, the Python client
and the cryptography key class. Keys come from `tpmbroker keygen` and from tpm2-tools
through tpm2-abrmd; a relay on the TPM link shows the plaintexts cross it encrypted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from tpmbroker import load_private_key
from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import AuthFailedError, BadDigestError, ProtocolError, UnsupportedError
from tpmbroker.ops.decrypt import Decrypt, DecryptResult
from tpmbroker.paths import provider_path

from .malicious_broker import Action, FakeBroker
from .malicious_broker import Request as FakeRequest
from .relay import Relay
from .tpmfixtures import Abrmd, Broker, BrokerEnv, active_sessions, raise_max_tries, running_swtpm

MODULE = provider_path()
MODDIR = str(MODULE.parent)
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
OPENSSL = shutil.which("openssl") or "openssl"
PROV = ["-provider-path", MODDIR, "-provider", "default", "-provider", "tpmbroker"]
TPM2_OPENSSL = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
PLAINTEXT = b"the launch code is 0000, do not tell anyone"

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


class Env(BrokerEnv):
    def __init__(self, broker: Broker, base: Path) -> None:
        super().__init__(broker, base)
        self.keys: dict[str, Path] = {}

    def pubkey(self, name: str) -> Path:
        pub = self.dir / f"{name}.pub"
        if not pub.exists():
            self.openssl("pkey", *PROV, "-in", str(self.keys[name]), "-pubout", "-out", str(pub))
        return pub

    def certificate(self, name: str) -> Path:
        cert = self.dir / f"{name}.crt"
        if not cert.exists():
            self.openssl("req", "-x509", *PROV, "-key", str(self.keys[name]), "-subj",
                         f"/CN={name}", "-days", "1", "-out", str(cert))
        return cert

    def encrypt(self, name: str, data: bytes, *opts: str) -> Path:
        """`openssl pkeyutl -encrypt` with the default provider alone."""
        out = self.dir / "ciphertext.bin"
        self.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(self.pubkey(name)),
                     *opts, "-out", str(out), input=data)
        return out

    def decrypt(self, name: str, ciphertext: Path, *opts: str,
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.openssl("pkeyutl", "-decrypt", *PROV, "-inkey", str(self.keys[name]),
                            "-in", str(ciphertext), *opts, check=check)


def keygen(broker: Broker, alg: str, out: Path, *extra: str) -> Path:
    """`tpmbroker keygen` with its default usage: the keys sign and decrypt."""
    subprocess.run([TPMBROKER, "keygen", "--alg", alg, "-o", str(out), "--socket", broker.socket,
                    *extra], check=True, capture_output=True, timeout=180)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("decrypt")
    with running_swtpm(base / "tpm") as tpm, Broker(tpm.tcti, base / "broker") as broker:
        e = Env(broker, base)
        for name, alg in (("rsa2048", "rsa:2048"), ("rsa3072", "rsa:3072"), ("ec", "ec:P-256")):
            e.keys[name] = keygen(broker, alg, base / f"{name}.pem")
        yield e


# --- openssl pkeyutl --------------------------------------------------------------------------

OAEP = ["-pkeyopt", "rsa_padding_mode:oaep"]
PADDINGS = {
    "pkcs1": [],
    "oaep-sha1": OAEP,
    "oaep-sha256": [*OAEP, "-pkeyopt", "rsa_oaep_md:sha256"],
    "oaep-sha256-label": [*OAEP, "-pkeyopt", "rsa_oaep_md:sha256",
                          "-pkeyopt", "rsa_oaep_label:" + b"my label".hex()],
    "oaep-sha384-mgf1-sha1-label": [*OAEP, "-pkeyopt", "rsa_oaep_md:sha384", "-pkeyopt",
                                    "rsa_mgf1_md:sha1", "-pkeyopt", "rsa_oaep_label:00ff00"],
    "oaep-sha512-mgf1-sha256": [*OAEP, "-pkeyopt", "rsa_oaep_md:sha512", "-pkeyopt",
                                "rsa_mgf1_md:sha256"],
}


@pytest.mark.parametrize("key", ["rsa2048", "rsa3072"])
@pytest.mark.parametrize("pad", sorted(PADDINGS))
def test_pkeyutl_decrypts_what_the_default_provider_encrypted(env: Env, key: str,
                                                              pad: str) -> None:
    ciphertext = env.encrypt(key, PLAINTEXT, *PADDINGS[pad])
    assert env.decrypt(key, ciphertext, *PADDINGS[pad]).stdout == PLAINTEXT


def test_oaep_with_the_wrong_parameters_is_an_error_not_a_plaintext(env: Env) -> None:
    ciphertext = env.encrypt("rsa2048", PLAINTEXT, *PADDINGS["oaep-sha256-label"])
    for wrong in (PADDINGS["oaep-sha256"], PADDINGS["oaep-sha1"],
                  [*PADDINGS["oaep-sha256-label"], "-pkeyopt", "rsa_mgf1_md:sha1"]):
        res = env.decrypt("rsa2048", ciphertext, *wrong, check=False)
        assert res.returncode != 0 and PLAINTEXT not in res.stdout
        assert b"decrypting with the TPM key: decryption error" in res.stderr


def test_no_padding_gives_the_raw_block(env: Env) -> None:
    block = b"\x00" + os.urandom(255)
    ciphertext = env.encrypt("rsa2048", block, "-pkeyopt", "rsa_padding_mode:none")
    assert env.decrypt("rsa2048", ciphertext, "-pkeyopt",
                       "rsa_padding_mode:none").stdout == block


def test_encrypting_with_the_tpm_key_itself_works(env: Env) -> None:
    """Encryption needs only the public key: the provider does it in software."""
    for pad in ("pkcs1", "oaep-sha256-label"):
        out = env.dir / "self.bin"
        env.openssl("pkeyutl", "-encrypt", *PROV, "-inkey", str(env.keys["rsa2048"]),
                    *PADDINGS[pad], "-out", str(out), input=PLAINTEXT)
        assert env.decrypt("rsa2048", out, *PADDINGS[pad]).stdout == PLAINTEXT


def test_a_bad_pkcs1_padding_gives_a_synthetic_message_not_an_error(env: Env) -> None:
    """Implicit rejection: the same bad ciphertext always gives the same message, a
    different one gives another, and nothing says the padding was bad."""
    bad = [env.encrypt("rsa2048", b"\x00\x01" + os.urandom(254), "-pkeyopt",
                       "rsa_padding_mode:none").read_bytes() for _ in range(2)]
    outputs = []
    for ciphertext in (bad[0], bad[0], bad[1]):
        path = env.dir / "bad.bin"
        path.write_bytes(ciphertext)
        res = env.decrypt("rsa2048", path)
        assert res.returncode == 0 and res.stderr == b""
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1] != outputs[2]
    # Asked for explicitly (OpenSSL 3.2's parameter), a bad padding is an error.
    path.write_bytes(bad[0])
    res = env.decrypt("rsa2048", path, "-pkeyopt", "implicit-rejection:0", check=False)
    assert res.returncode != 0 and b"decryption error" in res.stderr
    good = env.encrypt("rsa2048", PLAINTEXT)
    assert env.decrypt("rsa2048", good, "-pkeyopt", "implicit-rejection:0").stdout == PLAINTEXT


def test_the_tpmbroker_command_decrypts(env: Env) -> None:
    for pad, opts in (("pkcs1", []), ("oaep", ["--oaep-hash", "sha384", "--mgf1-hash", "sha1",
                                               "--label-hex", "00ff00"])):
        ciphertext = env.encrypt("rsa2048", PLAINTEXT,
                                 *PADDINGS["pkcs1" if pad == "pkcs1"
                                           else "oaep-sha384-mgf1-sha1-label"])
        res = subprocess.run([TPMBROKER, "decrypt", "--key", str(env.keys["rsa2048"]),
                              "--padding", pad, *opts, "--in", str(ciphertext), "--socket",
                              env.broker.socket], capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stdout == PLAINTEXT, res.stderr
    res = subprocess.run([TPMBROKER, "decrypt", "--key", str(env.keys["rsa2048"]), "--padding",
                          "oaep", "--in", str(ciphertext), "--socket", env.broker.socket],
                         capture_output=True, timeout=60)
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr == b"tpmbroker decrypt: decryption error\n"


def test_an_ec_key_cannot_decrypt(env: Env) -> None:
    ciphertext = env.encrypt("rsa2048", PLAINTEXT)
    res = env.decrypt("ec", ciphertext, check=False)
    assert res.returncode != 0 and PLAINTEXT not in res.stdout


# --- openssl cms and smime --------------------------------------------------------------------

@pytest.mark.parametrize("keyopts", [[], ["-keyopt", "rsa_padding_mode:oaep", "-keyopt",
                                          "rsa_oaep_md:sha256"]],
                         ids=["pkcs1", "oaep-sha256"])
def test_cms_decrypts_a_message_to_the_tpm_key(env: Env, keyopts: list[str]) -> None:
    cert = env.certificate("rsa2048")
    msg = env.dir / "msg.cms"
    env.openssl("cms", "-encrypt", "-aes256", "-recip", str(cert), *keyopts, "-out", str(msg),
                input=PLAINTEXT)
    res = env.openssl("cms", "-decrypt", *PROV, "-in", str(msg), "-inkey",
                      str(env.keys["rsa2048"]), "-recip", str(cert))
    assert res.stdout == PLAINTEXT


def test_smime_decrypts_a_message_to_the_tpm_key(env: Env) -> None:
    cert = env.certificate("rsa3072")
    msg = env.dir / "msg.smime"
    env.openssl("smime", "-encrypt", "-aes256", "-out", str(msg), str(cert), input=PLAINTEXT)
    res = env.openssl("smime", "-decrypt", *PROV, "-in", str(msg), "-inkey",
                      str(env.keys["rsa3072"]), "-recip", str(cert))
    assert res.stdout.replace(b"\r\n", b"\n") == PLAINTEXT


def test_cms_message_built_by_cryptography(env: Env) -> None:
    cert = x509.load_pem_x509_certificate(env.certificate("rsa2048").read_bytes())
    smime = pkcs7.PKCS7EnvelopeBuilder().set_data(PLAINTEXT).add_recipient(cert).encrypt(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    msg = env.dir / "crypto.p7m"
    msg.write_bytes(smime)
    res = env.openssl("cms", "-decrypt", *PROV, "-inform", "DER", "-in", str(msg), "-inkey",
                      str(env.keys["rsa2048"]), "-binary")
    assert res.stdout == PLAINTEXT


# --- the Python client and the cryptography key class ---------------------------------------

def _public(loaded: LoadedKey) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(loaded.public_key)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def _raw_encrypt(pub: rsa.RSAPublicKey, block: bytes) -> bytes:
    numbers = pub.public_numbers()
    return pow(int.from_bytes(block, "big"), numbers.e, numbers.n).to_bytes(len(block), "big")


def test_client_round_trips(env: Env) -> None:
    with env.client() as client:
        loaded = client.load_key(env.keys["rsa2048"])
        pub = _public(loaded)
        ciphertext = pub.encrypt(PLAINTEXT, padding.PKCS1v15())
        assert client.decrypt(loaded, ciphertext) == PLAINTEXT
        ciphertext = pub.encrypt(PLAINTEXT, padding.OAEP(padding.MGF1(hashes.SHA1()),
                                                         hashes.SHA384(), b"lab"))
        assert client.decrypt(loaded, ciphertext, p.Padding.OAEP, "sha384", "sha1",
                              b"lab") == PLAINTEXT
        with pytest.raises(BadDigestError, match="decryption error"):
            client.decrypt(loaded, ciphertext, p.Padding.OAEP, "sha384", "sha1", b"lab\0")
        with pytest.raises(BadDigestError, match="256 bytes, not 255"):
            client.decrypt(loaded, ciphertext[1:], p.Padding.OAEP, "sha384")
        with pytest.raises(BadDigestError, match="not below the key's modulus"):
            client.decrypt(loaded, b"\xff" * 256)
        status = client.status()
    assert isinstance(status["decryptions"], int) and status["decryptions"] >= 2


def test_client_bad_padding_explicit_and_implicit(env: Env) -> None:
    with env.client() as client:
        loaded = client.load_key(env.keys["rsa2048"])
        bad = _raw_encrypt(_public(loaded), b"\x00\x01" + os.urandom(254))
        first, second = client.decrypt(loaded, bad), client.decrypt(loaded, bad)
        assert first == second and first != PLAINTEXT
        with pytest.raises(BadDigestError, match="decryption error"):
            client.decrypt(loaded, bad, implicit_rejection=False)


@pytest.mark.parametrize("pad", [
    padding.PKCS1v15(),
    padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
    padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA512(), b""),
], ids=["pkcs1", "oaep-sha256", "oaep-sha512-mgf1-sha1"])
def test_cryptography_key_decrypts(env: Env, pad: padding.AsymmetricPadding) -> None:
    key = load_private_key(env.keys["rsa3072"], socket=env.broker.socket)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.decrypt(key.public_key().encrypt(PLAINTEXT, pad), pad) == PLAINTEXT


def test_cryptography_key_with_an_oaep_label(env: Env) -> None:
    key = load_private_key(env.keys["rsa2048"], socket=env.broker.socket)
    assert isinstance(key, rsa.RSAPrivateKey)
    pad = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"label")
    ciphertext = key.public_key().encrypt(PLAINTEXT, pad)
    assert key.decrypt(ciphertext, pad, label=b"label") == PLAINTEXT
    with pytest.raises(Exception, match="label"):
        key.decrypt(ciphertext, pad)


# --- keys made by tpm2-tools, through tpm2-abrmd ------------------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("tpm2_encodeobject") is None,
                                 reason="tpm2-tools not installed")
DECRYPT_ONLY = "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
SIGN_ONLY = "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"


def tools_keys(abrmd: Abrmd, workdir: Path, kinds: dict[str, tuple[str, str]]) -> dict[str, Path]:
    """TSS2 PRIVATE KEY files tpm2-tools made under a persistent parent at 0x81000001."""
    tenv = dict(abrmd.env(), TPM2TOOLS_TCTI=abrmd.tcti)

    def tools(*args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, env=tenv, cwd=workdir,
                       timeout=120)

    tools("tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", "srk.ctx", "-Q")
    tools("tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", "0x81000001")
    made = {}
    for name, (alg, attributes) in kinds.items():
        tools("tpm2_create", "-C", "0x81000001", "-G", alg, "-a", attributes,
              "-u", f"{name}.pub", "-r", f"{name}.priv", "-Q")
        tools("tpm2_encodeobject", "-C", "0x81000001", "-u", f"{name}.pub", "-r",
              f"{name}.priv", "-o", f"{name}.pem")
        made[name] = workdir / f"{name}.pem"
    # The first key also persistent at 0x81000020, for handle: and object: URIs.
    first = next(iter(kinds))
    tools("tpm2_load", "-C", "0x81000001", "-u", f"{first}.pub", "-r", f"{first}.priv",
          "-c", "first.ctx", "-Q")
    tools("tpm2_evictcontrol", "-C", "o", "-c", "first.ctx", "0x81000020", "-o", "first.tr")
    tools("tpm2_flushcontext", "-t")
    return made


@needs_tools
def test_tpm2_tools_keys(abrmd: Abrmd, abrmd_broker: Broker, tmp_path: Path) -> None:
    keys = tools_keys(abrmd, tmp_path, {
        "null": ("rsa2048:null:null", DECRYPT_ONLY),
        "rsaes": ("rsa2048:rsaes:null", DECRYPT_ONLY),
        "oaep": ("rsa2048:oaep-sha256:null", DECRYPT_ONLY),
        "signonly": ("rsa2048:null:null", SIGN_ONLY),
    })
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    with Client(abrmd_broker.socket) as client:
        # A decryption-only key with scheme NULL: every padding; it refuses to sign.
        loaded = client.load_key(keys["null"])
        pub = _public(loaded)
        assert client.decrypt(loaded, pub.encrypt(PLAINTEXT, padding.PKCS1v15())) == PLAINTEXT
        assert client.decrypt(loaded, pub.encrypt(PLAINTEXT, oaep), p.Padding.OAEP) == PLAINTEXT
        with pytest.raises(UnsupportedError, match="not a signing key"):
            client.sign(loaded, bytes(32), p.Hash.SHA256, p.Scheme.PKCS1)
        # Its persistent copy gives the same synthetic message for a bad padding: the
        # secret comes from the TPM key, not from how it was named.
        bad = _raw_encrypt(pub, b"\x00\x01" + os.urandom(254))
        by_handle = client.load_key(0x81000020)
        assert client.decrypt(loaded, bad) == client.decrypt(by_handle, bad)
        # Scheme fixed to RSAES: the TPM removes the PKCS#1 padding; OAEP is refused.
        loaded = client.load_key(keys["rsaes"])
        pub = _public(loaded)
        assert client.decrypt(loaded, pub.encrypt(PLAINTEXT, padding.PKCS1v15())) == PLAINTEXT
        with pytest.raises(UnsupportedError, match="fixed to RSAES-PKCS1-v1_5"):
            client.decrypt(loaded, pub.encrypt(PLAINTEXT, oaep), p.Padding.OAEP)
        # Scheme fixed to OAEP-SHA256: the TPM's rules on hashes and labels.
        loaded = client.load_key(keys["oaep"])
        pub = _public(loaded)
        assert client.decrypt(loaded, pub.encrypt(PLAINTEXT, oaep), p.Padding.OAEP) == PLAINTEXT
        labelled = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"abc\0")
        assert client.decrypt(loaded, pub.encrypt(PLAINTEXT, labelled), p.Padding.OAEP,
                              label=b"abc\0") == PLAINTEXT
        with pytest.raises(UnsupportedError, match="end in a zero byte"):
            client.decrypt(loaded, pub.encrypt(PLAINTEXT, oaep), p.Padding.OAEP, label=b"abc")
        with pytest.raises(UnsupportedError, match="fixed to OAEP with SHA256"):
            client.decrypt(loaded, pub.encrypt(PLAINTEXT, oaep), p.Padding.OAEP, "sha256",
                           "sha1")
        # A signing-only key says why it cannot decrypt.
        loaded = client.load_key(keys["signonly"])
        with pytest.raises(UnsupportedError, match="decrypt attribute is clear"):
            client.decrypt(loaded, _public(loaded).encrypt(PLAINTEXT, padding.PKCS1v15()))
    # And the same through the provider and the openssl CLI.
    penv = dict(os.environ, TPMBROKER_SOCKET=abrmd_broker.socket)
    ciphertext = tmp_path / "c.bin"
    ciphertext.write_bytes(_public_of(keys["rsaes"], penv).encrypt(PLAINTEXT,
                                                                   padding.PKCS1v15()))
    # tpm2_encodeobject without -p leaves emptyAuth out, which means "has a password".
    nopass = ["-passin", "pass:"]
    res = subprocess.run([OPENSSL, "pkeyutl", "-decrypt", *PROV, "-inkey", str(keys["rsaes"]),
                          *nopass, "-in", str(ciphertext)], capture_output=True, env=penv,
                         timeout=60)
    assert res.returncode == 0 and res.stdout == PLAINTEXT, res.stderr
    # The persistent copy of the NULL-scheme key, by handle: and object: URI.
    ciphertext.write_bytes(_public_of(keys["null"], penv).encrypt(PLAINTEXT,
                                                                  padding.PKCS1v15()))
    for uri in ("handle:0x81000020", f"object:{tmp_path / 'first.tr'}"):
        res = subprocess.run([OPENSSL, "pkeyutl", "-decrypt", *PROV, "-inkey", uri, "-in",
                              str(ciphertext)], capture_output=True, env=penv, timeout=60)
        assert res.returncode == 0 and res.stdout == PLAINTEXT, (uri, res.stderr)
    res = subprocess.run([OPENSSL, "pkeyutl", "-decrypt", *PROV, "-inkey",
                          str(keys["signonly"]), *nopass, "-in", str(ciphertext)],
                         capture_output=True,
                         env=penv, timeout=60)
    assert res.returncode != 0 and b"decrypt attribute is clear" in res.stderr


def _public_of(key: Path, penv: dict[str, str]) -> rsa.RSAPublicKey:
    res = subprocess.run([OPENSSL, "pkey", *PROV, "-in", str(key), "-passin", "pass:",
                          "-pubout"],
                         capture_output=True, env=penv, check=True, timeout=60)
    pub = serialization.load_pem_public_key(res.stdout)
    assert isinstance(pub, rsa.RSAPublicKey)
    return pub


# --- passwords and the dictionary-attack counter ------------------------------------------------

def test_a_key_with_a_password_decrypts_with_passin(env: Env) -> None:
    pw = env.dir / "pw"
    pw.write_text("sesame\n")
    key = keygen(env.broker, "rsa:2048", env.dir / "pw.pem", "--password-file", str(pw))
    env.keys["pw"] = key
    pub = env.dir / "pw.pub"
    env.openssl("pkey", *PROV, "-in", str(key), "-passin", "pass:sesame", "-pubout", "-out",
                str(pub))
    env.keys["pw"] = key
    ciphertext = env.encrypt("pw", PLAINTEXT)
    assert env.decrypt("pw", ciphertext, "-passin", "pass:sesame").stdout == PLAINTEXT
    res = env.decrypt("pw", ciphertext, check=False)  # no password: refused before the TPM
    assert res.returncode != 0 and b"needs its password" in res.stderr


def test_a_wrong_password_costs_at_most_one_count(tmp_path: Path) -> None:
    """A wrong password is AUTH_FAILED once from the TPM, then refused by the broker
    without asking it again; the right one still works. (With swtpm's own 3 tries the
    broker's shield would refuse any new password after one wrong one: tests/test_da_shield.py.)
    """
    with running_swtpm(tmp_path / "tpm") as tpm:
        raise_max_tries(tpm, 8)
        with Broker(tpm.tcti, tmp_path / "b") as broker:
            _wrong_then_right(broker, tmp_path)


def _wrong_then_right(broker: Broker, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("right horse\n")
    key = keygen(broker, "rsa:2048", tmp_path / "k.pem", "--password-file", str(pw))
    with Client(broker.socket) as client:
        wrong = client.load_key(key, b"wrong")
        ciphertext = _public(wrong).encrypt(PLAINTEXT, padding.PKCS1v15())
        with pytest.raises(AuthFailedError) as first:
            client.decrypt(wrong, ciphertext)
        assert first.value.tpm_rc != 0  # the TPM said so
        for _ in range(5):
            with pytest.raises(AuthFailedError) as again:
                client.decrypt(wrong, ciphertext)
            assert again.value.tpm_rc == 0  # the broker did not ask the TPM again
        assert client.status()["tpm_lockout_counter"] == 1
    with Client(broker.socket) as client:
        right = client.load_key(key, b"right horse")
        assert client.decrypt(right, ciphertext) == PLAINTEXT
        assert client.status()["tpm_lockout_counter"] == 1



# --- concurrency --------------------------------------------------------------------------------

def test_decryptions_and_signatures_at_once_stay_within_the_pool(env: Env) -> None:
    """32 threads, half decrypting (PKCS#1 and OAEP), half signing, on one client: every
    result right, and the TPM never holds more sessions than the pool."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from tpmbroker.loadgen import verify

    with env.client() as client:
        key = client.load_key(env.keys["rsa2048"])
        pub = _public(key)
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)

        def work(i: int) -> bool:
            message = os.urandom(32)
            if i % 2:
                digest = hashlib.sha256(message).digest()
                sig = client.sign(key, digest, p.Hash.SHA256, p.Scheme.PKCS1)
                return verify(key.public_key, key.key_type, sig, digest, p.Hash.SHA256,
                              p.Scheme.PKCS1)
            if i % 4:
                return client.decrypt(key, pub.encrypt(message, oaep), p.Padding.OAEP) == message
            return client.decrypt(key, pub.encrypt(message, padding.PKCS1v15())) == message

        # the TPM's count of sessions, read while the load runs
        with active_sessions(env.broker.socket) as seen, ThreadPoolExecutor(32) as pool:
            results = list(pool.map(work, range(400)))
        pool_size = client.status()["pool_size"]
    assert all(results)
    assert seen and all(isinstance(n, int) and n <= int(str(pool_size)) for n in seen), seen


# --- a broker that lies -------------------------------------------------------------------------

class _LyingDecrypter(FakeBroker):
    """Answers DECRYPT with `lie`: a plaintext longer than any the key can hold, or a
    result with a field too many."""

    lie = "too-long"

    def _answer(self, q: FakeRequest) -> list[Action]:
        if isinstance(q.msg, Decrypt):
            if self.lie == "too-long":
                return [q.ok(DecryptResult(b"A" * 300))]
            frame = bytearray(q.ok(DecryptResult(PLAINTEXT)) + b"\0")
            frame[0:4] = (len(frame) - 4).to_bytes(4, "big")
            return [bytes(frame)]
        return super()._answer(q)


@pytest.mark.parametrize("lie", ["too-long", "trailing-byte"])
def test_a_lying_broker_gets_no_plaintext_out(tmp_path: Path, lie: str) -> None:
    path = str(tmp_path / "fake.sock")
    key = rsa.generate_private_key(65537, 2048)
    fake = _LyingDecrypter(path, key=key)
    fake.lie = lie
    with fake:
        keyfile = tmp_path / "k.pem"
        keyfile.write_bytes(fake.key_pem())
        ciphertext = tmp_path / "c.bin"
        ciphertext.write_bytes(key.public_key().encrypt(PLAINTEXT, padding.PKCS1v15()))
        res = subprocess.run([OPENSSL, "pkeyutl", "-decrypt", *PROV, "-inkey", str(keyfile),
                              "-in", str(ciphertext)], capture_output=True, timeout=60,
                             env=dict(os.environ, TPMBROKER_SOCKET=path))
        assert res.returncode != 0 and res.stdout == b""
        assert (b"exceeds the buffer" if lie == "too-long" else b"malformed DECRYPT") \
            in res.stderr, res.stderr
        with Client(path) as client, pytest.raises(ProtocolError):
            client.decrypt(client.load_key(keyfile), ciphertext.read_bytes())


# --- the TPM link -------------------------------------------------------------------------------

def test_plaintexts_cross_the_tpm_link_encrypted(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tpm:
        relay = Relay(tpm.port)
        try:
            with Broker(relay.tcti, tmp_path / "broker") as broker:
                key = keygen(broker, "rsa:2048", tmp_path / "k.pem")
                secret = os.urandom(48)
                with Client(broker.socket) as client:
                    loaded = client.load_key(key)
                    pub = _public(loaded)
                    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
                    pkcs1_ct = pub.encrypt(secret, padding.PKCS1v15())
                    assert client.decrypt(loaded, pkcs1_ct) == secret
                    assert client.decrypt(loaded, pub.encrypt(secret, oaep),
                                          p.Padding.OAEP) == secret
                    block = b"\0" + secret + os.urandom(207)
                    assert client.decrypt(loaded, _raw_encrypt(pub, block),
                                          p.Padding.NONE) == block
            assert not relay.seen(secret)
            assert not relay.seen(block)
            if not TPM2_OPENSSL.exists():
                return
            # Control: tpm2-openssl decrypts the same ciphertext through the same relay,
            # without sessions, and the secret shows up in the recording.
            ct_file = tmp_path / "c.bin"
            ct_file.write_bytes(pkcs1_ct)
            tenv = dict(os.environ, TPM2OPENSSL_TCTI=relay.tcti)
            tenv.pop("OPENSSL_CONF", None)
            res = subprocess.run([OPENSSL, "pkeyutl", "-provider", "tpm2", "-provider", "base",
                                  "-decrypt", "-inkey", str(key), "-in", str(ct_file)],
                                 capture_output=True, env=tenv, timeout=120)
            assert res.returncode == 0 and res.stdout == secret, res.stderr
            assert relay.seen(secret)
        finally:
            relay.close()
