"""DERIVE end to end: ECDH with TPM EC keys through the real broker on swtpm, by the
openssl CLI (pkeyutl -derive, with and without a KDF; CMS with an EC recipient), by the
Python client and cryptography's `exchange`; keys from tpm2-openssl, tpm2-tools and
tpm2-pytss; and proof that the shared secret crosses the TPM link encrypted."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMT_PUBLIC

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import AuthFailedError, BadDigestError, UnsupportedError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.ops.derive import DeriveResult
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .relay import Relay
from .tpmfixtures import Broker, BrokerEnv, raise_max_tries, running_swtpm

MODULE = provider_path()
OPENSSL = shutil.which("openssl") or "openssl"
PROV = ["-provider-path", str(MODULE.parent), "-provider", "tpmbroker", "-provider", "default"]
DEFAULT_FIRST = ["-provider-path", str(MODULE.parent), "-provider", "default",
                 "-provider", "tpmbroker"]
CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
PASSWORD = "s3cret"
HANDLE = "0x81000021"

pytestmark = [
    pytest.mark.skipif(not MODULE.exists(), reason="provider not built"),
    pytest.mark.skipif(shutil.which("tpm2_create") is None, reason="tpm2-tools not installed"),
]


def tpm2_openssl(tcti: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The openssl CLI with tpm2-openssl, straight on a TPM (no broker)."""
    env = dict(os.environ, TPM2OPENSSL_TCTI=tcti)
    return subprocess.run([OPENSSL, *args], capture_output=True, env=env, cwd=cwd, timeout=120)


def ecdh_template(*, sign: bool, scheme: int = TPM2_ALG.NULL, curve: str = "ecc256") -> TPMT_PUBLIC:
    attributes = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
                  | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                  | TPMA_OBJECT.NODA)
    if sign:
        attributes |= TPMA_OBJECT.SIGN_ENCRYPT
    template = TPMT_PUBLIC.parse(f"{curve}:null:null", objectAttributes=attributes)
    template.parameters.eccDetail.scheme.scheme = scheme
    if scheme == TPM2_ALG.ECDH:
        template.parameters.eccDetail.scheme.details.ecdh.hashAlg = TPM2_ALG.SHA256
    return template


def make_keys(tpm: Swtpm, d: Path) -> None:
    """Every key the tests use, made before the broker owns the TPM (swtpm serves one
    client at a time)."""
    # tpm2-openssl's own keys, with its default attributes (sign and decrypt)
    for curve in CURVES:
        res = tpm2_openssl(tpm.tcti, d, "genpkey", "-provider", "tpm2", "-provider", "base",
                           "-algorithm", "EC", "-pkeyopt", f"group:{curve}",
                           "-out", f"{curve}.pem")
        assert res.returncode == 0, res.stderr
    res = tpm2_openssl(tpm.tcti, d, "genpkey", "-provider", "tpm2", "-provider", "base",
                       "-algorithm", "EC", "-pkeyopt", "group:P-256",
                       "-pkeyopt", f"user-auth:{PASSWORD}", "-out", "pw.pem")
    assert res.returncode == 0, res.stderr
    # tpm2-tools: tpm2_create -G ecc gives sign|decrypt; persisted, with its -o file
    tenv = dict(os.environ, TPM2TOOLS_TCTI=tpm.tcti)
    for args in (["tpm2_createprimary", "-C", "o", "-c", "prim.ctx", "-Q"],
                 ["tpm2_create", "-C", "prim.ctx", "-G", "ecc256", "-u", "t.pub", "-r", "t.priv",
                  "-Q"],
                 ["tpm2_load", "-C", "prim.ctx", "-u", "t.pub", "-r", "t.priv", "-c", "t.ctx",
                  "-Q"],
                 ["tpm2_evictcontrol", "-C", "o", "-c", "t.ctx", HANDLE, "-o", "t.tr"]):
        subprocess.run(args, check=True, capture_output=True, env=tenv, cwd=d, timeout=60)
        subprocess.run(["tpm2_flushcontext", "-t"], check=True, capture_output=True, env=tenv,
                       timeout=60)
    # an ECDH-only key (decrypt without sign, scheme ECDH)
    with ESAPI(tpm.tcti) as ectx:
        key = TSSPrivKey.create(ectx, ecdh_template(sign=False, scheme=TPM2_ALG.ECDH),
                                parent=0x40000001)
    (d / "ecdh-only.pem").write_bytes(key.to_pem())


class Env(BrokerEnv):
    def __init__(self, tpm: Swtpm, relay: Relay, broker: Broker, base: Path) -> None:
        super().__init__(broker, base)
        self.tpm = tpm
        self.relay = relay

    def derivations(self) -> int:
        return self.counter("derivations")

    def peer(self, curve: str, name: str) -> ec.EllipticCurvePrivateKey:
        """A software peer key, written as name.pem (private) and name.pub.pem."""
        key = ec.generate_private_key(CURVES[curve])
        (self.dir / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (self.dir / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return key

    def tpm_public(self, key: str, name: str) -> ec.EllipticCurvePublicKey:
        """The TPM key's public key, through the provider, written as name."""
        self.ok("pkey", *PROV, "-in", key, "-pubout", "-out", name)
        public = serialization.load_pem_public_key((self.dir / name).read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return public


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("derive")
    with running_swtpm(base / "tpm") as tpm:
        make_keys(tpm, base)
        raise_max_tries(tpm)  # the wrong-password test spends one; the right one follows
        relay = Relay(tpm.port)
        try:
            with Broker(relay.tcti, base / "broker") as broker:
                yield Env(tpm, relay, broker, base)
        finally:
            relay.close()


# --- the openssl CLI --------------------------------------------------------------------

@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("providers", [PROV, DEFAULT_FIRST], ids=["tpmbroker-first",
                                                                  "default-first"])
def test_pkeyutl_derive_matches_the_default_provider(env: Env, curve: str,
                                                     providers: list[str]) -> None:
    peer = env.peer(curve, f"peer-{curve}")
    tpm_pub = env.tpm_public(f"{curve}.pem", f"{curve}.pub.pem")
    before = env.derivations()
    ours = env.ok("pkeyutl", "-derive", *providers, "-inkey", f"{curve}.pem",
                  "-peerkey", f"peer-{curve}.pub.pem")
    # the software side, with the default provider alone
    theirs = env.ok("pkeyutl", "-derive", "-inkey", f"peer-{curve}.pem",
                    "-peerkey", f"{curve}.pub.pem")
    assert len(ours) == (CURVES[curve].key_size + 7) // 8
    assert ours == theirs == peer.exchange(ec.ECDH(), tpm_pub)
    assert env.derivations() == before + 1


@pytest.mark.parametrize(("digest", "outlen", "ukm"), [("SHA256", 32, None),
                                                       ("SHA384", 70, "0a0b0c")])
def test_pkeyutl_derive_with_x963_kdf(env: Env, digest: str, outlen: int,
                                      ukm: str | None) -> None:
    env.peer("P-256", "kdf-peer")
    env.tpm_public("P-256.pem", "P-256.pub.pem")
    kdf = ["-pkeyopt", "kdf-type:X963KDF", "-pkeyopt", f"kdf-digest:{digest}",
           "-pkeyopt", f"kdf-outlen:{outlen}"]
    if ukm:
        kdf += ["-pkeyopt", f"hexkdf-ukm:{ukm}"]
    ours = env.ok("pkeyutl", "-derive", *PROV, "-inkey", "P-256.pem",
                  "-peerkey", "kdf-peer.pub.pem", *kdf)
    theirs = env.ok("pkeyutl", "-derive", "-inkey", "kdf-peer.pem",
                    "-peerkey", "P-256.pub.pem", *kdf)
    plain = env.ok("pkeyutl", "-derive", "-inkey", "kdf-peer.pem",
                   "-peerkey", "P-256.pub.pem")
    assert len(ours) == outlen
    assert ours == theirs != plain[:outlen]


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_cms_decrypt_with_an_ec_recipient(env: Env, curve: str) -> None:
    cert = f"cms-{curve}.crt"
    env.ok("req", "-x509", *PROV, "-key", f"{curve}.pem", "-subj", f"/CN=ecdh {curve}",
           "-days", "1", "-out", cert)
    message = f"for the TPM's EC key on {curve}\n".encode()
    (env.dir / "plain.txt").write_bytes(message)
    # encrypted with the default provider alone: ECDH with an ephemeral key, X9.63 KDF,
    # AES key wrap
    env.ok("cms", "-encrypt", "-binary", "-aes-256-cbc", "-in", "plain.txt",
           "-out", "msg.cms", "-recip", cert)
    before = env.derivations()
    out = env.ok("cms", "-decrypt", "-binary", *PROV, "-in", "msg.cms",
                 "-inkey", f"{curve}.pem", "-recip", cert)
    assert out == message
    assert env.derivations() == before + 1


def test_software_keys_keep_their_own_ecdh(env: Env) -> None:
    """With tpmbroker first, a software EC key still derives with the default provider's
    ECDH: the broker is not asked."""
    env.peer("P-256", "soft-a")
    env.peer("P-256", "soft-b")
    before = env.derivations()
    ours = env.ok("pkeyutl", "-derive", *PROV, "-inkey", "soft-a.pem",
                  "-peerkey", "soft-b.pub.pem")
    theirs = env.ok("pkeyutl", "-derive", "-inkey", "soft-b.pem",
                    "-peerkey", "soft-a.pub.pem")
    assert ours == theirs and len(ours) == 32
    assert env.derivations() == before


def test_tpm2_tools_key_by_handle_and_object_uri(env: Env) -> None:
    env.peer("P-256", "tools-peer")
    tpm_pub = env.tpm_public(f"handle:{HANDLE}", "tools.pub.pem")
    peer_key = serialization.load_pem_private_key((env.dir / "tools-peer.pem").read_bytes(),
                                                  None)
    assert isinstance(peer_key, ec.EllipticCurvePrivateKey)
    secret = peer_key.exchange(ec.ECDH(), tpm_pub)
    for uri in (f"handle:{HANDLE}", f"object:{env.dir / 't.tr'}"):
        out = env.ok("pkeyutl", "-derive", *PROV, "-inkey", uri,
                     "-peerkey", "tools-peer.pub.pem")
        assert out == secret, uri


def test_ecdh_only_key_derives_and_refuses_to_sign(env: Env) -> None:
    peer = env.peer("P-256", "only-peer")
    tpm_pub = env.tpm_public("ecdh-only.pem", "ecdh-only.pub.pem")
    out = env.ok("pkeyutl", "-derive", *PROV, "-inkey", "ecdh-only.pem",
                 "-peerkey", "only-peer.pub.pem")
    assert out == peer.exchange(ec.ECDH(), tpm_pub)
    with env.client() as client:
        loaded = client.load_key(env.dir / "ecdh-only.pem")
        with pytest.raises(UnsupportedError, match="not a signing key"):
            client.sign(loaded, bytes(32))


def test_sign_only_key_is_refused_with_the_reason(env: Env) -> None:
    with env.client() as client:
        der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256, usage=p.Usage.SIGN)
        (env.dir / "sign-only.pem").write_bytes(der_to_pem(der))
        loaded = client.load_key(env.dir / "sign-only.pem")
        point = _point(ec.generate_private_key(ec.SECP256R1()).public_key())
        with pytest.raises(UnsupportedError, match="sign-only key"):
            client.derive(loaded, point)
    env.peer("P-256", "so-peer")
    res = env.openssl("pkeyutl", "-derive", *PROV, "-inkey", "sign-only.pem",
                      "-peerkey", "so-peer.pub.pem", check=False)
    assert res.returncode != 0 and res.stdout == b""
    assert b"sign-only key" in res.stderr, res.stderr


# --- the broker's checks -------------------------------------------------------------------

def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _loaded(env: Env, client: Client, name: str, password: str | None = None) -> LoadedKey:
    return client.load_key(env.dir / name, password)


def test_bad_peer_points_are_refused_without_a_tpm_command(env: Env) -> None:
    good = _point(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve = good[:-1] + bytes([good[-1] ^ 1])
    other_curve = _point(ec.generate_private_key(ec.SECP384R1()).public_key())
    compressed = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    with env.client() as client:
        loaded = _loaded(env, client, "P-256.pem")
        client.derive(loaded, good)  # the key is resident and the connection warm
        sent = len(env.relay.to_tpm)
        for point, reason in ((off_curve, "not a point on P-256"),
                              (other_curve, "not an uncompressed P-256 point"),
                              (compressed, "uncompressed"),
                              (b"\x00", "uncompressed"),
                              (b"\x04" + bytes(64), "not a point on P-256")):
            with pytest.raises(BadDigestError, match=reason):
                client.derive(loaded, point)
        assert len(env.relay.to_tpm) == sent  # not one byte went to the TPM
        assert len(client.derive(loaded, good)) == 32  # and the connection still serves


def test_wrong_password_is_refused_and_the_right_one_works(env: Env) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    with env.client() as client:
        counted = client.status()["tpm_lockout_counter"]
        assert isinstance(counted, int)
        wrong = _loaded(env, client, "pw.pem", "wrong")
        for _ in range(3):  # the broker sends a refused password to the TPM once
            with pytest.raises(AuthFailedError):
                client.derive(wrong, _point(peer.public_key()))
        assert client.status()["tpm_lockout_counter"] == counted + 1
    with env.client() as client:
        right = _loaded(env, client, "pw.pem", PASSWORD)
        public = serialization.load_der_public_key(right.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert client.derive(right, _point(peer.public_key())) == peer.exchange(ec.ECDH(),
                                                                                public)
    env.peer("P-256", "pw-peer")
    res = env.openssl("pkeyutl", "-derive", *PROV, "-inkey", "pw.pem",
                      "-peerkey", "pw-peer.pub.pem", "-passin", f"pass:{PASSWORD}",
                      check=False)
    assert res.returncode == 0, res.stderr


def test_result_repr_never_shows_the_secret() -> None:
    assert "abcdef" not in repr(DeriveResult(bytes.fromhex("abcdef")))


# --- Python -----------------------------------------------------------------------------------

@pytest.mark.parametrize("curve", sorted(CURVES))
def test_python_exchange_round_trip(env: Env, curve: str) -> None:
    key = tpmbroker.load_private_key(str(env.dir / f"{curve}.pem"), socket=env.broker.socket)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    peer = ec.generate_private_key(CURVES[curve])
    secret = key.exchange(ec.ECDH(), peer.public_key())
    assert secret == peer.exchange(ec.ECDH(), key.public_key())
    other = next(c for name, c in CURVES.items() if name != curve)
    with pytest.raises(ValueError, match="same curve"):
        key.exchange(ec.ECDH(), ec.generate_private_key(other).public_key())


# --- the bus ------------------------------------------------------------------------------------

def test_shared_secret_crosses_the_tpm_link_encrypted(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tpm:
        res = tpm2_openssl(tpm.tcti, tmp_path, "genpkey", "-provider", "tpm2", "-provider",
                           "base", "-algorithm", "EC", "-pkeyopt", "group:P-256",
                           "-out", "key.pem")
        assert res.returncode == 0, res.stderr
        relay = Relay(tpm.port)
        try:
            # Control: tpm2-openssl derives through the same relay, without sessions; its
            # shared secret shows up in the recording, so the check below can fail.
            peer_a = ec.generate_private_key(ec.SECP256R1())
            (tmp_path / "a.pub.pem").write_bytes(peer_a.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            res = tpm2_openssl(relay.tcti, tmp_path, "pkeyutl", "-derive", "-provider", "tpm2",
                               "-provider", "base", "-inkey", "key.pem",
                               "-peerkey", "a.pub.pem")
            assert res.returncode == 0, res.stderr
            clear = res.stdout
            assert len(clear) == 32 and relay.seen(clear, window=32)
            with Broker(relay.tcti, tmp_path / "broker") as broker, \
                    Client(broker.socket) as client:
                loaded = client.load_key(tmp_path / "key.pem")
                public = serialization.load_der_public_key(loaded.public_key)
                assert isinstance(public, ec.EllipticCurvePublicKey)
                assert client.derive(loaded, _point(peer_a.public_key())) == clear
                secrets = []
                for _ in range(4):
                    peer = ec.generate_private_key(ec.SECP256R1())
                    secret = client.derive(loaded, _point(peer.public_key()))
                    assert secret == peer.exchange(ec.ECDH(), public)
                    secrets.append(secret)
            for secret in secrets:
                assert not relay.seen(secret)
            assert relay.seen(clear, window=32)  # the recording was kept throughout
        finally:
            relay.close()
