"""Keys under a parent with a password, end to end: swtpm, tpm2-tools making a persistent
parent with a password at 0x81000002 and a key under it, tpm2-openssl making another,
the real broker (through a recording relay), the Python client, the `tpmbroker` command
and the openssl CLI with tpmbroker.so. Every signature is verified with the public key by
software alone.

The parent password reaches the broker by `-pkeyopt parent-auth:`, the provider's
`parent-auth` configuration, $TPMBROKER_PARENT_AUTH or tpm2-openssl's
$TPM2OPENSSL_PARENT_AUTH, `tpmbroker keygen --parent-auth-file`, and the Python API. The
TPM sees it only inside a session HMAC: the relay's record of everything sent to the TPM
never holds it, while tpm2-openssl's password sessions through the same relay do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import LockoutError, ParentAuthFailedError, Status
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .relay import Relay
from .tpmfixtures import Broker, BrokerEnv, raise_max_tries, running_swtpm

PARENT = "0x81000002"
PARENT_PASS = "parentpass"
MODULE = provider_path()
MODDIR = str(MODULE.parent)
PROV = ["-provider-path", MODDIR, "-provider", "default", "-provider", "tpmbroker"]
GEN_PROV = ["-provider-path", MODDIR, "-provider", "tpmbroker", "-provider", "default"]
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
OPENSSL = shutil.which("openssl") or "openssl"
TPM2_OPENSSL = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")

pytestmark = pytest.mark.skipif(
    shutil.which("tpm2_evictcontrol") is None or not TPM2_OPENSSL.exists(),
    reason="tpm2-tools or tpm2-openssl not installed")


def tools(tpm: Swtpm, workdir: Path, *args: str) -> None:
    """One tpm2-tools command on swtpm (before the broker owns it), then free the slots."""
    env = dict(os.environ, TPM2TOOLS_TCTI=tpm.tcti)
    for cmd in (list(args), ["tpm2_flushcontext", "-t"]):
        res = subprocess.run(cmd, capture_output=True, env=env, cwd=workdir, timeout=60)
        assert res.returncode == 0, (cmd, res.stderr)


def make_parent(tpm: Swtpm, workdir: Path, *keys: str) -> dict[str, Path]:
    """A persistent ECC storage parent with a password at PARENT (DA-protected: no noDA),
    and a tpm2-tools key under it for each name in `keys`, as TSS2 PRIVATE KEY files."""
    tools(tpm, workdir, "tpm2_createprimary", "-C", "o", "-G", "ecc256", "-p", PARENT_PASS,
          "-c", "parent.ctx", "-Q")
    tools(tpm, workdir, "tpm2_evictcontrol", "-C", "o", "-c", "parent.ctx", PARENT)
    made = {}
    for name in keys:
        tools(tpm, workdir, "tpm2_create", "-C", PARENT, "-P", PARENT_PASS, "-G", "ecc256",
              "-u", f"{name}.pub", "-r", f"{name}.priv", "-Q")
        tools(tpm, workdir, "tpm2_encodeobject", "-C", PARENT, "-P", PARENT_PASS, "-u",
              f"{name}.pub", "-r", f"{name}.priv", "-o", f"{name}.pem")
        made[name] = workdir / f"{name}.pem"
    return made


def tpm2_openssl_key(tpm: Swtpm, workdir: Path, name: str) -> Path:
    """A key tpm2-openssl makes under PARENT with its parent-auth (before the broker)."""
    out = workdir / f"{name}.pem"
    res = subprocess.run(
        [OPENSSL, "genpkey", "-provider", "tpm2", "-provider", "base", "-algorithm", "EC",
         "-pkeyopt", "group:P-256", "-pkeyopt", f"parent:{PARENT}", "-pkeyopt",
         f"parent-auth:{PARENT_PASS}", "-out", str(out)],
        capture_output=True, env=dict(os.environ, TPM2OPENSSL_TCTI=tpm.tcti), timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def verify(key: LoadedKey, signature: bytes, digest: bytes) -> None:
    public = load_der_public_key(key.public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def lockout_counter(client: Client) -> int:
    value = client.status()["tpm_lockout_counter"]
    assert isinstance(value, int)
    return value


class World(BrokerEnv):
    def __init__(self, tpm: Swtpm, relay: Relay, broker: Broker, base: Path,
                 keys: dict[str, Path]) -> None:
        super().__init__(broker, base, openssl_conf=None)
        self.tpm = tpm
        self.relay = relay
        self.keys = keys
        for name in ("TPMBROKER_PARENT_AUTH", "TPM2OPENSSL_PARENT_AUTH"):
            self.environ.pop(name, None)  # each test says which parent password it gives

    def env(self, **extra: str) -> dict[str, str]:
        return dict(self.environ, **extra)

    def sign_and_verify(self, key: Path, env: dict[str, str]) -> None:
        """openssl pkey -pubout and dgst -sign through tpmbroker.so, verified by the
        default provider alone."""
        data, sig, pub = self.dir / "data", self.dir / "sig", self.dir / f"{key.stem}.spki"
        data.write_bytes(b"under a parent with a password")
        res = self.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub), env=env,
                           check=False)
        assert res.returncode == 0, (res.stderr, self.broker.log())
        # tpm2_encodeobject (tpm2-tools 5.4) writes emptyAuth FALSE for a key without a
        # password: give the empty one rather than be asked
        res = self.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-passin", "pass:",
                           "-out", str(sig), str(data), env=env, check=False)
        assert res.returncode == 0, (res.stderr, self.broker.log())
        res = self.openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(sig),
                           str(data), env=self.env(), check=False)
        assert b"Verified OK" in res.stdout, res.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("parent-auth")
    with running_swtpm(base / "tpm") as tpm:
        # Tests here try wrong parent passwords on purpose, one count each: more tries
        # than swtpm's 3 keep the shield's reserve out of their way (the lockout test
        # below has a TPM of its own with 3).
        raise_max_tries(tpm)
        keys = make_parent(tpm, base, "tools", "tools2", "tools3")
        keys["tpm2-openssl"] = tpm2_openssl_key(tpm, base, "tpm2-openssl")
        relay = Relay(tpm.port)
        try:
            with Broker(relay.tcti, base / "broker") as broker:
                yield World(tpm, relay, broker, base, keys)
        finally:
            relay.close()


# --- the Python API ----------------------------------------------------------------------

def test_python_loads_and_signs_a_tpm2_tools_key_with_the_parent_password(world: World) -> None:
    digest = hashlib.sha256(b"python").digest()
    with world.client() as client:
        key = client.load_key(world.keys["tools"], parent_auth=PARENT_PASS)
        verify(key, client.sign(key, digest), digest)


def test_python_generates_under_the_parent_and_the_key_signs(world: World) -> None:
    digest = hashlib.sha256(b"generated").digest()
    with world.client() as client:
        der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256, parent=0x81000002,
                                     parent_auth=PARENT_PASS)
        key = client.load_key(der, parent_auth=PARENT_PASS)
        verify(key, client.sign(key, digest), digest)


def test_the_owner_password_is_the_storage_primarys_parent_password(world: World) -> None:
    """For parent 0x40000001 a parent password is the owner hierarchy's (tpm2-openssl gives
    it to CreatePrimary): swtpm's is empty, so any other is wrong, and costs no count."""
    with world.client() as client:
        before = lockout_counter(client)
        der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256)
        with pytest.raises(ParentAuthFailedError) as info:
            client.load_key(der, parent_auth="owner?")
        assert "0x40000001" in info.value.message and info.value.tpm_rc != 0
        with pytest.raises(ParentAuthFailedError) as info:
            client.generate_key(p.KeyType.EC, p.Curve.P256, parent_auth="owner?")
        assert info.value.tpm_rc == 0  # remembered: not asked again
        client.load_key(der)
        assert lockout_counter(client) == before


# --- the tpmbroker command -------------------------------------------------------------------

def test_keygen_with_parent_auth_file_and_the_key_signs(world: World) -> None:
    pw = world.dir / "parent.pw"
    pw.write_text(PARENT_PASS + "\n")
    out = world.dir / "cli-key.pem"
    res = subprocess.run([TPMBROKER, "keygen", "--parent", PARENT, "--parent-auth-file",
                          str(pw), "-o", str(out)], capture_output=True, text=True,
                         env=world.env(), timeout=60)
    assert res.returncode == 0, res.stderr
    world.sign_and_verify(out, world.env(TPMBROKER_PARENT_AUTH=PARENT_PASS))
    res = subprocess.run([TPMBROKER, "pubkey", str(out), "--parent-auth-file", str(pw)],
                         capture_output=True, text=True, env=world.env(), timeout=60)
    assert res.returncode == 0 and "BEGIN PUBLIC KEY" in res.stdout, res.stderr


# --- the openssl CLI -------------------------------------------------------------------------

def test_genpkey_with_pkeyopt_parent_auth_makes_a_key_that_signs(world: World) -> None:
    out = world.dir / "genpkey.pem"
    res = world.openssl("genpkey", *GEN_PROV, "-algorithm", "EC", "-pkeyopt", "group:P-256",
                        "-pkeyopt", f"parent:{PARENT}", "-pkeyopt",
                        f"parent-auth:{PARENT_PASS}", "-out", str(out), check=False)
    assert res.returncode == 0, (res.stderr, world.broker.log())
    assert out.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    world.sign_and_verify(out, world.env(TPMBROKER_PARENT_AUTH=PARENT_PASS))


@pytest.mark.parametrize("key", ["tools", "tpm2-openssl"])
@pytest.mark.parametrize("how", ["TPMBROKER_PARENT_AUTH", "TPM2OPENSSL_PARENT_AUTH", "config"])
def test_key_files_under_the_parent_sign_with_its_password(world: World, key: str,
                                                           how: str) -> None:
    if how == "config":
        conf = world.dir / f"openssl-{key}.cnf"
        conf.write_text(f"""openssl_conf = init
[init]
providers = provider_sect
[provider_sect]
default = default_sect
tpmbroker = tpmbroker_sect
[default_sect]
activate = 1
[tpmbroker_sect]
module = {MODULE}
parent-auth = {PARENT_PASS}
activate = 1
""")
        env = world.env(OPENSSL_CONF=str(conf))
    else:
        env = world.env(**{how: PARENT_PASS})
    world.sign_and_verify(world.keys[key], env)


# --- wrong and missing parent passwords (last: the module's swtpm counts them) -----------

def test_wrong_and_missing_parent_passwords_name_the_parent(world: World) -> None:
    """Each refusal names the parent, whichever way the password came. Two wrong ones
    reach the TPM; after those the broker's shield holds uid 0 back for a while, so the
    rest repeat passwords the TPM refused already: the broker answers those from memory."""
    def named(exc: ParentAuthFailedError) -> None:
        assert exc.status is Status.PARENT_AUTH_FAILED
        assert "parent 0x81000002" in exc.message and "for the key" not in exc.message

    with world.client() as first, world.client() as second:
        # A key in the TPM already, LOADed by another client with a wrong password: the
        # broker tries it (loading a second copy), and the TPM refuses.
        first.load_key(world.keys["tools3"], parent_auth=PARENT_PASS)
        with pytest.raises(ParentAuthFailedError) as info:
            second.load_key(world.keys["tools3"], parent_auth="wrong")
        named(info.value)
        assert info.value.tpm_rc != 0
        # None at all, for a key not loaded yet: the TPM refuses.
        with pytest.raises(ParentAuthFailedError) as info:
            second.load_key(world.keys["tools2"])
        named(info.value)
        assert info.value.tpm_rc != 0
        # The same two again, any key under the parent, LOAD or GENERATE: from memory.
        for wrong in (None, "wrong"):
            with pytest.raises(ParentAuthFailedError) as info:
                second.load_key(world.keys["tools2"], parent_auth=wrong)
            named(info.value)
            assert info.value.tpm_rc == 0
            with pytest.raises(ParentAuthFailedError) as info:
                second.generate_key(p.KeyType.EC, p.Curve.P256, parent=0x81000002,
                                    parent_auth=wrong)
            named(info.value)
            assert info.value.tpm_rc == 0
        # The right one after wrong ones works (known good: no attempt, no hold-back).
        second.load_key(world.keys["tools2"], parent_auth=PARENT_PASS)

    # tpmbroker keygen used to blame the key's password.
    res = subprocess.run([TPMBROKER, "keygen", "--parent", PARENT, "-o",
                          str(world.dir / "never.pem")], capture_output=True, text=True,
                         env=world.env(TPMBROKER_PARENT_AUTH="wrong"), timeout=60)
    assert res.returncode != 0
    assert "wrong password for the parent 0x81000002" in res.stderr
    assert "for the key" not in res.stderr
    assert not (world.dir / "never.pem").exists()

    # openssl signing with a key file under the parent, without its password.
    (world.dir / "data").write_bytes(b"never signed")
    out = world.openssl("dgst", "-sha256", *PROV, "-sign", str(world.keys["tpm2-openssl"]),
                        "-out", str(world.dir / "never.sig"), str(world.dir / "data"),
                        check=False)
    assert out.returncode != 0
    assert b"password for the parent 0x81000002" in out.stderr, out.stderr
    assert b"parent-auth" in out.stderr  # says where to give it


# --- the dictionary-attack count ------------------------------------------------------------

def test_a_hundred_wrong_parent_passwords_cost_one_count_while_others_sign(
        tmp_path: Path) -> None:
    """swtpm with its own maxTries 3: 100 LOADs with one wrong parent password spend one
    dictionary-attack count (the first reaches the TPM, the rest are refused from memory),
    while another client signs throughout without a failure; then the right password
    loads the same key."""
    with running_swtpm(tmp_path / "tpm") as tpm:
        keys = make_parent(tpm, tmp_path, "known", "target")
        with Broker(tpm.tcti, tmp_path / "broker") as broker:
            with Client(broker.socket) as admin:
                assert admin.status()["tpm_max_tries"] == 3
                admin.load_key(keys["known"], parent_auth=PARENT_PASS)  # right, known good
                signer_key, _ = admin.generate_key(p.KeyType.EC, p.Curve.P256)
                before = lockout_counter(admin)
            stop = threading.Event()
            signed, failures = [0], []

            def sign_on() -> None:
                digest = hashlib.sha256(b"meanwhile").digest()
                with Client(broker.socket) as client:
                    key = client.load_key(signer_key)
                    while not stop.is_set():
                        try:
                            verify(key, client.sign(key, digest), digest)
                            signed[0] += 1
                        except Exception as exc:  # every failure is counted
                            failures.append(exc)

            signer = threading.Thread(target=sign_on)
            signer.start()
            refused = []
            try:
                with Client(broker.socket) as attacker:
                    for _ in range(100):
                        with pytest.raises((ParentAuthFailedError, LockoutError)) as info:
                            attacker.load_key(keys["target"], parent_auth="guess")
                        refused.append(info.value)
            finally:
                stop.set()
                signer.join(30)
            with Client(broker.socket) as admin:
                after = lockout_counter(admin)
                status = admin.status()
                admin.load_key(keys["target"], parent_auth=PARENT_PASS)
        assert not failures, failures[:3]
        assert signed[0] > 0
        assert all(isinstance(e, ParentAuthFailedError) for e in refused)
        assert all("parent 0x81000002" in e.message for e in refused)
        # The first wrong password reached the TPM (a count: the parent is DA-protected),
        # the 99 others did not.
        assert after - before == 1
        assert sum(1 for e in refused if e.tpm_rc) == 1
        assert status["parent_auth_refusals"] == 99


# --- what crosses the bus ----------------------------------------------------------------------

def test_the_parent_password_never_crosses_the_bus(tmp_path: Path) -> None:
    """Loading and making keys under the parent through the broker sends the parent
    password only inside session HMACs; tpm2-openssl doing the same through the same relay
    sends it in the clear (a password session), which shows the check can fail."""
    with running_swtpm(tmp_path / "tpm") as tpm:
        keys = make_parent(tpm, tmp_path, "tools")
        tkey = tpm2_openssl_key(tpm, tmp_path, "tpm2-openssl")
        relay = Relay(tpm.port)
        try:
            with (Broker(relay.tcti, tmp_path / "broker") as broker,
                  Client(broker.socket) as client):
                digest = hashlib.sha256(b"bus").digest()
                for path in (keys["tools"], tkey):
                    key = client.load_key(path, parent_auth=PARENT_PASS)
                    verify(key, client.sign(key, digest), digest)
                der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256,
                                             parent=0x81000002, parent_auth=PARENT_PASS)
                client.load_key(der, parent_auth=PARENT_PASS)
            assert relay.to_tpm, "nothing crossed the relay"
            assert not relay.sent(PARENT_PASS.encode())
            # tpm2-openssl through the same relay (the broker is gone: one swtpm client)
            res = subprocess.run(
                [OPENSSL, "pkey", "-provider", "tpm2", "-provider", "base", "-in", str(tkey),
                 "-pubout"], capture_output=True, timeout=60,
                env=dict(os.environ, TPM2OPENSSL_TCTI=relay.tcti,
                         TPM2OPENSSL_PARENT_AUTH=PARENT_PASS))
            assert res.returncode == 0, res.stderr
            assert relay.sent(PARENT_PASS.encode())
        finally:
            relay.close()
