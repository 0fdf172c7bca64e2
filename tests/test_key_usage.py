"""What keys may do: sign and decrypt by default, as tpm2-openssl makes them; `usage:sign`
narrows a key; the key policy's `operations` grant sign, decrypt and derive per key.

Real swtpm, real `tpmbroker serve`, the real openssl CLI. Keys are made the way
tpm2-openssl users make them, `openssl genpkey -provider tpmbroker -provider default`, and
every ciphertext by OpenSSL's default provider alone. A refused decryption must say why
even through CMS, which clears OpenSSL's error queue after a failed key decryption and
would otherwise show only "bad decrypt".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpmbroker.access import AccessPolicyError, Peer, load_policy
from tpmbroker.client import Client
from tpmbroker.keyfile import der_to_pem
from tpmbroker.paths import provider_path
from tpmbroker.protocol import Curve, KeySource, KeyType, Usage, key_id_for
from tpmbroker.simulator import Swtpm

from .test_audit import events, full_log
from .tpmfixtures import Broker, BrokerEnv, running_swtpm

MODULE = provider_path()
MODDIR = str(MODULE.parent)
PROV = ["-provider-path", MODDIR, "-provider", "default", "-provider", "tpmbroker"]
# tpm2-openssl's users list the TPM provider first for genpkey; with `default` first,
# genpkey makes a software key.
GENPKEY = ["genpkey", "-provider-path", MODDIR, "-provider", "tpmbroker", "-provider",
           "default"]
MESSAGE = b"for the TPM key's eyes only\n"

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


@dataclass
class Keys:
    """Key files and what openssl makes from them, in one directory."""

    env: BrokerEnv

    @property
    def dir(self) -> Path:
        return self.env.dir

    def genpkey(self, name: str, algorithm: str, *options: str) -> Path:
        path = self.dir / f"{name}.pem"
        self.env.openssl(*GENPKEY, "-algorithm", algorithm, *options, "-out", str(path))
        return path

    def certificate(self, key: Path) -> Path:
        cert = key.with_suffix(".crt")
        if not cert.exists():
            self.env.openssl("req", "-x509", *PROV, "-key", str(key), "-subj",
                             f"/CN={key.stem}", "-days", "1", "-out", str(cert))
        return cert

    def pubkey(self, key: Path) -> Path:
        pub = key.with_suffix(".pub")
        if not pub.exists():
            self.env.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub))
        return pub

    def cms_encrypted(self, key: Path) -> Path:
        """MESSAGE encrypted to the key's certificate by the default provider alone."""
        plain, out = self.dir / "message.txt", self.dir / f"{key.stem}.cms"
        plain.write_bytes(MESSAGE)
        self.env.openssl("cms", "-encrypt", "-binary", "-aes256", "-in", str(plain),
                         "-out", str(out), str(self.certificate(key)))
        return out

    def cms_decrypt(self, key: Path, *, recip: bool = True,
                    check: bool = True) -> tuple[int, bytes, str]:
        cms = self.cms_encrypted(key)
        res = self.env.openssl("cms", "-decrypt", *PROV, "-binary", "-in", str(cms),
                               "-inkey", str(key),
                               *(["-recip", str(self.certificate(key))] if recip else []),
                               check=check)
        return res.returncode, res.stdout, res.stderr.decode(errors="replace")

    def rsa_encrypted(self, key: Path, data: bytes, *options: str) -> Path:
        plain, out = self.dir / "plain.bin", self.dir / f"{key.stem}.enc"
        plain.write_bytes(data)
        self.env.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(self.pubkey(key)),
                         *options, "-in", str(plain), "-out", str(out))
        return out

    def decrypt(self, key: Path, data: bytes, *options: str,
                check: bool = True) -> tuple[int, bytes, str]:
        # implicit-rejection is for decryption only (and OpenSSL 3.0's own RSA lacks it)
        pairs = zip(options[::2], options[1::2], strict=True)  # -pkeyopt NAME:VALUE
        padding = [o for pair in pairs if not pair[1].startswith("implicit-rejection")
                   for o in pair]
        ciphertext = self.rsa_encrypted(key, data, *padding)
        res = self.env.openssl("pkeyutl", "-decrypt", *PROV, "-inkey", str(key), *options,
                               "-in", str(ciphertext), check=check)
        return res.returncode, res.stdout, res.stderr.decode(errors="replace")

    def peer(self) -> Path:
        """A software EC P-256 key: the other side of ECDH."""
        peer = self.dir / "peer.pem"
        if not peer.exists():
            self.env.openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
                             "ec_paramgen_curve:P-256", "-out", str(peer))
            self.env.openssl("pkey", "-in", str(peer), "-pubout", "-out",
                             str(peer.with_suffix(".pub")))
        return peer

    def derive(self, key: Path, check: bool = True) -> tuple[int, bytes, str]:
        peer = self.peer()
        res = self.env.openssl("pkeyutl", "-derive", *PROV, "-inkey", str(key), "-peerkey",
                               str(peer.with_suffix(".pub")), check=check)
        return res.returncode, res.stdout, res.stderr.decode(errors="replace")

    def software_derive(self, key: Path) -> bytes:
        """The same secret from the peer's side, by the default provider alone."""
        return self.env.openssl("pkeyutl", "-derive", "-inkey", str(self.peer()),
                                "-peerkey", str(self.pubkey(key))).stdout

    def sign(self, key: Path, check: bool = True) -> tuple[int, bytes, str]:
        data = self.dir / "data.txt"
        data.write_bytes(MESSAGE)
        sig = self.dir / f"{key.stem}.sig"
        res = self.env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-out", str(sig),
                               str(data), check=check)
        if res.returncode == 0:
            self.env.openssl("dgst", "-sha256", "-verify", str(self.pubkey(key)),
                             "-signature", str(sig), str(data))
        return res.returncode, b"", res.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    base = tmp_path_factory.mktemp("usage")
    with running_swtpm(base / "tpm") as tpm, Broker(tpm.tcti, base / "broker") as broker:
        yield Keys(BrokerEnv(broker, base))


def test_genpkey_keys_sign_decrypt_and_derive_by_default(keys: Keys) -> None:
    """`openssl genpkey` with no usage option makes keys as tpm2-openssl does: an RSA key
    that signs and decrypts (cms, pkeyutl), an EC key that signs and derives."""
    rsa = keys.genpkey("rsa-default", "RSA")
    assert keys.sign(rsa)[0] == 0
    for recip in (True, False):  # with -recip, and trying every recipient
        assert keys.cms_decrypt(rsa, recip=recip)[1] == MESSAGE
    assert keys.decrypt(rsa, MESSAGE)[1] == MESSAGE
    oaep = ("-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256")
    assert keys.decrypt(rsa, MESSAGE, *oaep)[1] == MESSAGE

    ec = keys.genpkey("ec-default", "EC", "-pkeyopt", "group:P-256")
    assert keys.sign(ec)[0] == 0
    secret = keys.derive(ec)[1]
    assert len(secret) == 32 and secret == keys.software_derive(ec)
    assert keys.cms_decrypt(ec)[1] == MESSAGE  # an EC recipient: ECDH and a KDF

    # tpmbroker keygen and Python make the same keys (test_algorithms.py reads the
    # attributes back); here: they decrypt and derive too.
    with Client(keys.env.broker.socket) as client:
        for name, key_type, param in (("py-rsa", KeyType.RSA, 2048),
                                      ("py-ec", KeyType.EC, Curve.P256)):
            der, _ = client.generate_key(key_type, param)
            (keys.dir / f"{name}.pem").write_bytes(der_to_pem(der))
    assert keys.decrypt(keys.dir / "py-rsa.pem", MESSAGE)[1] == MESSAGE
    assert keys.derive(keys.dir / "py-ec.pem")[1] == keys.software_derive(keys.dir / "py-ec.pem")


def test_usage_sign_narrows_and_the_refusal_says_why(keys: Keys) -> None:
    """`-pkeyopt usage:sign` makes a sign-only key. Decryption and ECDH are refused, and
    the reason reaches the user even through CMS (stderr), not only "bad decrypt"."""
    rsa = keys.genpkey("rsa-sign", "RSA", "-pkeyopt", "usage:sign")
    assert keys.sign(rsa)[0] == 0
    why = "decrypt attribute is clear (a sign-only key, made with usage sign)"
    for recip in (True, False):
        code, out, err = keys.cms_decrypt(rsa, recip=recip, check=False)
        assert MESSAGE not in out, err  # CMS writes what a random key gave
        assert why in err, err  # printed before CMS clears the error queue
        # Refused, CMS goes on with a random content key (its answer to Bleichenbacher), and
        # its padding check says "bad decrypt"; about one random key in 256 unpads by
        # chance, and CMS then exits 0 with garbage.
        assert code == 0 or "bad decrypt" in err, err
    code, out, err = keys.decrypt(rsa, MESSAGE, check=False)
    assert code != 0 and out == b"" and why in err, err

    ec = keys.genpkey("ec-sign", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "usage:sign")
    assert keys.sign(ec)[0] == 0
    code, out, err = keys.derive(ec, check=False)
    assert code != 0 and out == b"" and "sign-only key" in err, err
    code, out, err = keys.cms_decrypt(ec, check=False)
    assert code != 0 and MESSAGE not in out and "sign-only key" in err, err

    # usage:decrypt narrows the other way: no signatures.
    rsa_dec = keys.genpkey("rsa-decrypt", "RSA", "-pkeyopt", "usage:decrypt")
    assert keys.decrypt(rsa_dec, MESSAGE)[1] == MESSAGE
    code, _, err = keys.sign(rsa_dec, check=False)
    assert code != 0 and "sign attribute clear" in err, err


def test_a_padding_failure_stays_silent(keys: Keys) -> None:
    """What is written to stderr is a refusal, never whether a ciphertext's padding
    decoded: CMS's defence against padding oracles stays whole. A ciphertext for another
    key, decrypted with a key that may decrypt: through CMS (implicit rejection) nothing
    from tpmbroker at all; through pkeyutl without implicit rejection, the error is on
    OpenSSL's queue only."""
    rsa = keys.genpkey("rsa-other", "RSA")
    other = keys.genpkey("rsa-recipient", "RSA")
    cms = keys.cms_encrypted(other)
    res = keys.env.openssl("cms", "-decrypt", *PROV, "-binary", "-in", str(cms), "-inkey",
                           str(rsa), "-recip", str(keys.certificate(other)), check=False)
    err = res.stderr.decode(errors="replace")
    assert res.returncode != 0 and MESSAGE not in res.stdout, err
    assert "tpmbroker" not in err, err
    ciphertext = keys.rsa_encrypted(other, MESSAGE)
    res = keys.env.openssl("pkeyutl", "-decrypt", *PROV, "-inkey", str(rsa), "-pkeyopt",
                           "implicit-rejection:0", "-in", str(ciphertext), check=False)
    err = res.stderr.decode(errors="replace")
    # "decryption error", or "not below the key's modulus" when the other key's is larger
    assert res.returncode != 0 and "decrypting with the TPM key: " in err, err
    assert not any(line.startswith("tpmbroker: ") for line in err.splitlines()), err


POLICY_KEYS = {
    # name: (key type, usage, operations or None for the entry without it)
    "rsa_all": (KeyType.RSA, Usage.DEFAULT, None),
    "rsa_sign": (KeyType.RSA, Usage.DEFAULT, ["sign"]),
    "rsa_decrypt": (KeyType.RSA, Usage.DEFAULT, ["decrypt"]),
    "rsa_raw": (KeyType.RSA, Usage.DEFAULT, ["decrypt", "sign"]),
    "rsa_decrypt_only": (KeyType.RSA, Usage.DECRYPT, ["decrypt"]),
    "ec_derive": (KeyType.EC, Usage.DEFAULT, ["derive"]),
    "ec_sign": (KeyType.EC, Usage.DEFAULT, ["sign"]),
}


def test_policy_operations_grant_and_refuse(swtpm: Swtpm, tmp_path: Path) -> None:
    """Each key entry's `operations` grants sign, decrypt and derive; an entry without it
    grants all. Raw decryption, and PKCS#1 v1.5 without implicit rejection, with a key
    that can sign need sign too; with a key that cannot, decrypt alone. Every refusal
    names the entry and the right, reaches the user through CMS, and is audited."""
    paths: dict[str, Path] = {}
    uid = os.getuid()
    keygen = Broker(swtpm.tcti, tmp_path / "keygen").start()
    try:
        with Client(keygen.socket) as client:
            for name, (key_type, usage, _) in POLICY_KEYS.items():
                der, _ = client.generate_key(
                    key_type, Curve.P256 if key_type is KeyType.EC else 2048, usage=usage)
                paths[name] = tmp_path / f"{name}.pem"
                paths[name].write_bytes(der_to_pem(der))
    finally:
        keygen.stop()
    policy = tmp_path / "policy.toml"
    entries = []
    for name, (_, _, operations) in POLICY_KEYS.items():
        entries.append(f'[keys.{name}]\nfile = "{paths[name]}"\nuids = [{uid}]\n'
                       + (f"operations = {operations!r}\n".replace("'", '"')
                          if operations is not None else ""))
    policy.write_text('default = "deny"\n\n' + "\n".join(entries))
    broker = Broker(swtpm.tcti, tmp_path / "broker",
                    extra_args=("--policy", str(policy))).start()
    try:
        env = BrokerEnv(broker, tmp_path)
        keys = Keys(env)
        for name in paths:  # certificates and public keys while signing is still allowed
            keys.pubkey(paths[name])
        raw = bytes(1) + bytes(range(1, 256))  # one RSA block below any 2048-bit modulus
        none = ("-pkeyopt", "rsa_padding_mode:none")

        # No operations: everything the key can do.
        assert keys.sign(paths["rsa_all"])[0] == 0
        assert keys.decrypt(paths["rsa_all"], MESSAGE)[1] == MESSAGE
        assert keys.decrypt(paths["rsa_all"], raw, *none)[1] == raw

        # Sign only: signatures; decryptions refused, and CMS says why.
        assert keys.sign(paths["rsa_sign"])[0] == 0
        refused = f"policy key rsa_sign does not grant decrypt to uid {uid}"
        code, out, err = keys.decrypt(paths["rsa_sign"], MESSAGE, check=False)
        assert code != 0 and out == b"" and "PERMISSION_DENIED" in err and refused in err, err

        # Decrypt only: padded decryptions (PKCS#1 v1.5 with implicit rejection, OAEP);
        # no signatures, and none of the decryptions that give signatures with this key
        # (it can sign): raw, and PKCS#1 v1.5 that reports a bad padding (Bleichenbacher).
        oaep = ("-pkeyopt", "rsa_padding_mode:oaep")
        explicit = ("-pkeyopt", "implicit-rejection:0")
        assert keys.decrypt(paths["rsa_decrypt"], MESSAGE)[1] == MESSAGE
        assert keys.decrypt(paths["rsa_decrypt"], MESSAGE, *oaep)[1] == MESSAGE
        code, _, err = keys.sign(paths["rsa_decrypt"], check=False)
        assert code != 0 and "does not grant sign" in err, err
        for data, options in ((raw, none), (MESSAGE, explicit)):
            code, out, err = keys.decrypt(paths["rsa_decrypt"], data, *options, check=False)
            assert code != 0 and out == b"", err
            assert f"policy key rsa_decrypt does not grant sign to uid {uid}" in err, err
            assert "(operations = [decrypt]); this decrypt needs sign too" in err, err

        # Decrypt and sign: those too.
        assert keys.decrypt(paths["rsa_raw"], raw, *none)[1] == raw
        assert keys.decrypt(paths["rsa_raw"], MESSAGE, *explicit)[1] == MESSAGE
        # A key that cannot sign gives no signatures: the decrypt right alone will do.
        assert keys.decrypt(paths["rsa_decrypt_only"], raw, *none)[1] == raw
        assert keys.decrypt(paths["rsa_decrypt_only"], MESSAGE, *explicit)[1] == MESSAGE

        # ECDH: derive, not sign; and the other way round.
        ec_derive, ec_sign = paths["ec_derive"], paths["ec_sign"]
        assert keys.derive(ec_derive)[1] == keys.software_derive(ec_derive)
        code, _, err = keys.sign(ec_derive, check=False)
        assert code != 0 and "policy key ec_derive does not grant sign" in err, err
        assert keys.sign(ec_sign)[0] == 0
        code, out, err = keys.derive(ec_sign, check=False)
        assert code != 0 and out == b"" and "ec_sign does not grant derive" in err, err

        # Through CMS (the certificate is signed by the key itself, which may sign): the
        # refusal is printed, the plaintext is not.
        for recip in (True, False):
            code, out, err = keys.cms_decrypt(paths["rsa_sign"], recip=recip, check=False)
            assert code != 0 and MESSAGE not in out and refused in err, err

        log = full_log(broker)
        audited = {(e["key"], e.get("operation")) for e in events(log, "key_refused")}
        assert {("rsa_sign", "decrypt"), ("rsa_decrypt", "sign"), ("ec_derive", "sign"),
                ("ec_sign", "derive")} <= audited, audited
        assert all(e.get("operation") for e in events(log, "key_refused")), log
    finally:
        broker.stop()


def test_policy_operations_parse_and_decide(tmp_path: Path) -> None:
    """The policy file's `operations`: checked at load, granted per entry (entries for
    one key add up), all when absent; a refusal names the entry and the right."""
    handle_id = key_id_for(KeySource.PERSISTENT_HANDLE, (0x81000010).to_bytes(4, "big"))
    policy = tmp_path / "p.toml"
    policy.write_text("""
[keys.signer]
handle = 0x81000010
uids = [1000]
operations = ["sign"]

[keys.decrypter]
handle = 0x81000010
gids = [50]
operations = ["decrypt"]

[keys.everything]
handle = 0x81000011
""")
    loaded = load_policy(policy)
    user = Peer(1000, frozenset({1000}), None)
    both = Peer(1000, frozenset({1000, 50}), None)
    assert loaded.decide(user, handle_id, b"").allowed  # LOAD: admitted
    assert loaded.decide(user, handle_id, b"", ("sign",)).allowed
    refused = loaded.decide(user, handle_id, b"", ("decrypt",))
    assert not refused.allowed and refused.operation == "decrypt"
    assert "policy key signer does not grant decrypt to uid 1000" in refused.reason
    assert not loaded.decide(user, handle_id, b"", ("decrypt", "sign")).allowed
    staff = Peer(2000, frozenset({50}), None)  # the decrypter entry only
    assert loaded.decide(staff, handle_id, b"", ("decrypt",)).allowed
    needs_sign = loaded.decide(staff, handle_id, b"", ("decrypt", "sign"))
    assert not needs_sign.allowed and needs_sign.operation == "sign"
    assert "this decrypt needs sign too: with a key that can sign" in needs_sign.reason
    assert loaded.decide(both, handle_id, b"", ("decrypt", "sign")).allowed
    assert not loaded.decide(both, handle_id, b"", ("derive",)).allowed
    other = key_id_for(KeySource.PERSISTENT_HANDLE, (0x81000011).to_bytes(4, "big"))
    assert loaded.decide(user, other, b"", ("sign", "decrypt", "derive")).allowed

    for text, words in (('operations = ["sign", "encrypt"]', "unknown operation(s) encrypt"),
                        ('operations = "sign"', "operations must be a list"),
                        ("operations = [1]", "operations must be a list")):
        policy.write_text(f"[keys.a]\nhandle = 0x81000001\n{text}\n")
        with pytest.raises(AccessPolicyError, match=r"\[keys\.a\].*" + words.replace("(", r"\(")
                           .replace(")", r"\)")):
            load_policy(policy)
    policy.write_text("[keys.a]\nhandle = 0x81000001\noperations = []\n")
    nothing = load_policy(policy)
    key_a = key_id_for(KeySource.PERSISTENT_HANDLE, (0x81000001).to_bytes(4, "big"))
    assert nothing.decide(user, key_a, b"").allowed
    assert not nothing.decide(user, key_a, b"", ("sign",)).allowed
