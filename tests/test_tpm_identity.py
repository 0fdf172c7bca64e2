"""The TPM's identity, and an active interposer on its bus.

A broker given trust anchors (`serve --ek-ca`) starts only on a TPM whose EK certificate
chains to them and whose EK, made now, is the certified key; one given a pin
(`tpmbroker enroll`) only on a TPM whose EK is the pinned one. Sessions are then salted
to that EK. The TPMs here are swtpm states with EK certificates from a local CA
(swtpm_setup with swtpm_localca, tests/tpmfixtures.py CertifiedTpm).

The interposer is tests/relay.py's TamperingRelay between the broker and swtpm's
command port. Case 1: it puts its own public key in the answer that carries the EK,
and the broker refuses to start, saying why. Case 2: it flips bits in a signature on
its way back; the broker drops the answer, replaces the session, audits the event,
answers the client an error and keeps serving. Nothing secret crosses the relay in
the clear.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import secrets
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPM2B_PUBLIC

from tpmbroker import keypolicy
from tpmbroker.client import Client
from tpmbroker.errors import TpmBrokerError, TpmError, TpmUnavailableError
from tpmbroker.keyfile import der_to_pem, pyca_curve
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm import session_crypto as sc

from .relay import TamperingRelay
from .tpmfixtures import Broker, CertifiedTpm, running_swtpm

TPMBROKER = [sys.executable, "-m", "tpmbroker.cli"]
CC_SIGN = 0x15D
CC_START_AUTH_SESSION = 0x176
CC_CREATE = 0x153
RH_OWNER = 0x40000001
CC_CREATE_PRIMARY = 0x131
RH_ENDORSEMENT = 0x4000000B
_U32 = struct.Struct(">I")
HASHES = {0x0B: "sha256", 0x0C: "sha384", 0x0D: "sha512"}


def refused_start(tcti: str, workdir: Path, *args: str) -> str:
    """Start a broker that must refuse the TPM: its log (the reason, the audit line)."""
    broker = Broker(tcti, workdir, extra_args=args)
    with pytest.raises(RuntimeError, match="broker exited 1"):
        broker.start()
    broker.stop()
    return broker.log_path.read_text()


def enroll(tcti: str, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TPMBROKER, "enroll", "--tcti", tcti, "--state-dir", str(state),
                           *args], capture_output=True, text=True, timeout=120)


def signs(client: Client, key_der: bytes) -> None:
    """A signature by the key, verified with its public key."""
    key = client.load_key(der_to_pem(key_der))
    digest = hashlib.sha256(b"identity").digest()
    public = serialization.load_der_public_key(key.public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    public.verify(client.sign(key, digest), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# --- verified and refused starts ------------------------------------------------------------

def test_a_certified_tpm_starts_verified(certified_swtpm: Swtpm, certified_tpm: CertifiedTpm,
                                          tmp_path: Path) -> None:
    with Broker(certified_swtpm.tcti, tmp_path / "broker",
                extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker:
        with Client(broker.socket) as client:
            status = client.status()
            der, _ = client.generate_key(KeyType.EC, Curve.P256)
            signs(client, der)
        assert status["tpm_identity"] == "verified-by-certificate"
        assert str(status["tpm_ek"]).startswith("sha256:")
        assert "swtpm-localca" in str(status["tpm_ek_certificate"])
        log = broker.log_path.read_text()
    assert re.search(r"TPM identity: verified-by-certificate, EK EK-\S+ sha256:[0-9a-f]{64} "
                     r"\(issuer CN=swtpm-localca", log), log


def test_a_tpm_without_an_ek_certificate_is_refused(swtpm: Swtpm, certified_tpm: CertifiedTpm,
                                                     tmp_path: Path) -> None:
    log = refused_start(swtpm.tcti, tmp_path / "broker", "--ek-ca", str(certified_tpm.anchors))
    assert "tpmbroker: the TPM holds no EK certificate" in log
    assert "tpmbroker enroll" in log
    assert "event=tpm_identity_refused" in log


def test_a_certificate_from_another_ca_is_refused(certified_swtpm: Swtpm,
                                                  tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(self_signed_ca("another TPM maker"))
    log = refused_start(certified_swtpm.tcti, tmp_path / "broker", "--ek-ca", str(other))
    assert "no EK certificate of this TPM chains to the trust anchors" in log
    assert "event=tpm_identity_refused" in log


def test_unverified_is_said_and_can_be_chosen(certified_swtpm: Swtpm,
                                              certified_tpm: CertifiedTpm,
                                              tmp_path: Path) -> None:
    with Broker(certified_swtpm.tcti, tmp_path / "plain") as broker:
        with Client(broker.socket) as client:
            assert client.status()["tpm_identity"] == "unverified"
        assert "TPM identity: unverified (no --ek-ca and no EK pin" in broker.log()
    with Broker(certified_swtpm.tcti, tmp_path / "chosen",
                extra_args=("--ek-ca", str(certified_tpm.anchors), "--tpm-unverified")
                ) as broker:
        with Client(broker.socket) as client:
            assert client.status()["tpm_identity"] == "unverified"
        assert "TPM identity: unverified (--tpm-unverified)" in broker.log()


def test_enroll_pins_the_ek_and_later_starts_compare(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_swtpm(tmp_path / "tpm-a") as tpm:
        out = enroll(tpm.tcti, state)
        assert out.returncode == 0, out.stderr
        assert "pinned this TPM's EK (EK-ECC256, sha256:" in out.stdout
        assert "Trust on first use" in out.stdout
        assert (state / "ek-pin.json").exists()
        again = enroll(tpm.tcti, state)
        assert again.returncode == 0 and "is pinned in" in again.stdout
        with Broker(tpm.tcti, tmp_path / "broker",
                    extra_args=("--state-dir", str(state))) as broker, \
                Client(broker.socket) as client:
            status = client.status()
            der, _ = client.generate_key(KeyType.EC, Curve.P256)
            signs(client, der)
        assert status["tpm_identity"] == "verified-by-pin"
        assert str(status["tpm_ek"]) in out.stdout
    with running_swtpm(tmp_path / "tpm-b") as other:  # another TPM: other seeds
        log = refused_start(other.tcti, tmp_path / "broker-b", "--state-dir", str(state))
        assert "is not the pinned one" in log
        assert "event=tpm_identity_refused" in log
        replaced = enroll(other.tcti, state)
        assert replaced.returncode == 1 and "--force replaces it" in replaced.stderr


# --- the interposer ---------------------------------------------------------------------------

@pytest.fixture
def relay(certified_swtpm: Swtpm) -> Iterator[TamperingRelay]:
    relay = TamperingRelay(certified_swtpm.port)
    try:
        yield relay
    finally:
        relay.close()


def substitute_ek(command: bytes, response: bytes) -> bytes:
    """The interposer's own key in place of the EK in TPM2_CreatePrimary's answer under
    the endorsement hierarchy, with the Name in the answer made to match it."""
    if (_U32.unpack_from(command, 6)[0] != CC_CREATE_PRIMARY
            or _U32.unpack_from(command, 10)[0] != RH_ENDORSEMENT
            or _U32.unpack_from(response, 6)[0] != 0):
        return response
    start = 10 + 4 + 4  # header, objectHandle, parameterSize
    public, used = TPM2B_PUBLIC.unmarshal(response[start:])
    area = public.publicArea
    name_hash = HASHES[int(area.nameAlg)]
    old_digest = hashlib.new(name_hash, bytes(area.marshal())).digest()
    if area.type == TPM2_ALG.ECC:
        curve = pyca_curve(int(area.parameters.eccDetail.curveID))
        assert curve is not None
        numbers = ec.generate_private_key(curve).public_key().public_numbers()
        size = len(bytes(area.unique.ecc.x))
        area.unique.ecc.x = numbers.x.to_bytes(size, "big")
        area.unique.ecc.y = numbers.y.to_bytes(size, "big")
    else:
        bits = int(area.parameters.rsaDetail.keyBits)
        modulus = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
        area.unique.rsa = modulus.to_bytes(bits // 8, "big")
    new_digest = hashlib.new(name_hash, bytes(area.marshal())).digest()
    replaced = (response[:start] + bytes(TPM2B_PUBLIC(publicArea=area).marshal())
                + response[start + used:])
    assert len(replaced) == len(response)
    return replaced.replace(old_digest, new_digest)


def test_case_1_a_substituted_ek_is_refused(relay: TamperingRelay,
                                            certified_tpm: CertifiedTpm,
                                            tmp_path: Path) -> None:
    relay.tamper = substitute_ek
    log = refused_start(relay.tcti, tmp_path / "broker", "--ek-ca",
                        str(certified_tpm.anchors))
    assert [cc for cc, _, _ in relay.tampered] == [CC_CREATE_PRIMARY]
    # Refused before any session was salted to the interposer's key.
    assert CC_START_AUTH_SESSION not in relay.commands
    assert "is not the key its certificate certifies" in log, log
    assert "an interposer on the TPM's bus?" in log
    assert re.search(r"WARNING tpmbroker\.audit: event=tpm_identity_refused reason=", log)


def test_case_1_with_a_pin(relay: TamperingRelay, certified_swtpm: Swtpm,
                           tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert enroll(certified_swtpm.tcti, state).returncode == 0  # pinned on the true TPM
    relay.tamper = substitute_ek
    log = refused_start(relay.tcti, tmp_path / "broker", "--state-dir", str(state))
    assert relay.tampered and "is not the pinned one" in log, log
    assert CC_START_AUTH_SESSION not in relay.commands
    assert "event=tpm_identity_refused" in log


def test_case_1_after_a_tpm_restart(relay: TamperingRelay, certified_swtpm: Swtpm,
                                    certified_tpm: CertifiedTpm, tmp_path: Path) -> None:
    """The interposer waits for the broker to make the EK again (the TPM restarted): the
    new answer is checked against the key verified at start, and no session is salted
    to the interposer's key."""
    with Broker(relay.tcti, tmp_path / "broker",
                extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker, \
            Client(broker.socket) as client:
        assert client.status()["tpm_identity"] == "verified-by-certificate"
        relay.tamper = substitute_ek
        certified_swtpm.restart()  # a TPM reset: sessions and the EK's handle are gone
        sent_before = len(relay.commands)
        with pytest.raises(TpmUnavailableError, match="another EK than the one verified"):
            client.random(16)
        assert CC_START_AUTH_SESSION not in relay.commands[sent_before:]
        relay.tamper = lambda command, response: response  # the interposer goes away
        assert len(client.random(16)) == 16
        log = broker.log_path.read_text()
    assert "event=tpm_identity_refused" in log


class KeyThief:
    """An interposer that puts its own key in the storage primary's answer (TPM2_CreatePrimary
    under the owner hierarchy), then works out the salt of every session salted to it
    and reads what the broker encrypts in TPM2_Create: a new key's password."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.substituted = False
        self.session_keys: dict[int, tuple[bytes, bytes]] = {}  # handle -> (key, nonceTPM)
        self.read: list[bytes] = []  # what it decrypted of TPM2_Create's inSensitive

    def __call__(self, command: bytes, response: bytes) -> bytes:
        code = _U32.unpack_from(command, 6)[0]
        if code == CC_CREATE:  # what the broker sent is readable, whatever the TPM says
            self._read(command)
        if _U32.unpack_from(response, 6)[0] != 0:
            return response
        if code == CC_CREATE_PRIMARY and _U32.unpack_from(command, 10)[0] == RH_OWNER:
            return self._substitute(response)
        if code == CC_START_AUTH_SESSION:
            self._salt(command, response)
        return response

    def _substitute(self, response: bytes) -> bytes:
        start = 10 + 4 + 4
        public, used = TPM2B_PUBLIC.unmarshal(response[start:])
        area = public.publicArea
        old = hashlib.sha256(bytes(area.marshal())).digest()
        numbers = self.key.public_key().public_numbers()
        area.unique.ecc.x = numbers.x.to_bytes(32, "big")
        area.unique.ecc.y = numbers.y.to_bytes(32, "big")
        self.substituted = True
        replaced = (response[:start] + bytes(TPM2B_PUBLIC(publicArea=area).marshal())
                    + response[start + used:])
        return replaced.replace(old, hashlib.sha256(bytes(area.marshal())).digest())

    def _salt(self, command: bytes, response: bytes) -> None:
        pos = 10 + 8  # header, tpmKey, bind
        nonce_caller, pos = _sized(command, pos)
        point, pos = _sized(command, pos)
        x, at = _sized(point, 0)
        y, _ = _sized(point, at)
        if len(x) != 32:
            return  # salted to a key on another curve: not the thief's
        ephemeral = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"),
                                                  int.from_bytes(y, "big"),
                                                  ec.SECP256R1()).public_key()
        z = self.key.exchange(ec.ECDH(), ephemeral)
        mine = self.key.public_key().public_numbers().x.to_bytes(32, "big")
        salt = sc.kdfe("sha256", z, b"SECRET", x, mine, 256)
        handle = _U32.unpack_from(response, 10)[0]
        nonce_tpm, _ = _sized(response, 14)
        self.session_keys[handle] = (sc.session_key("sha256", b"", salt, nonce_tpm,
                                                    nonce_caller), nonce_tpm)

    def _read(self, command: bytes) -> None:
        session = _U32.unpack_from(command, 18)  # after the parent handle and authSize
        known = self.session_keys.get(session[0])
        if known is None:
            return
        nonce_caller, pos = _sized(command, 22)
        pos += 1  # session attributes
        _, pos = _sized(command, pos)  # the HMAC
        encrypted, _ = _sized(command, pos)  # inSensitive
        key, nonce_tpm = known
        self.read.append(sc.cfb_decrypt("sha256", key, nonce_caller, nonce_tpm, encrypted))


def _sized(data: bytes, pos: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">H", data, pos)
    return data[pos + 2:pos + 2 + size], pos + 2 + size


@pytest.mark.parametrize("verified", [False, True], ids=["unverified", "verified"])
def test_what_verification_prevents(relay: TamperingRelay, certified_tpm: CertifiedTpm,
                                    tmp_path: Path, verified: bool) -> None:
    """Unverified, an interposer that substitutes the key sessions are salted to reads
    what they encrypt: here the password of a key being made. Verified, sessions are
    salted to the EK and the same interposer reads nothing. (The key is never made: the
    TPM, which holds the real key, refuses the command.)"""
    thief = KeyThief()
    relay.tamper = thief
    password = "pw-" + secrets.token_hex(8)
    args = ("--ek-ca", str(certified_tpm.anchors)) if verified else ()
    with Broker(relay.tcti, tmp_path / "broker", extra_args=args) as broker, \
            Client(broker.socket) as client, pytest.raises(TpmBrokerError):
        client.generate_key(KeyType.EC, Curve.P256, password=password)
    assert thief.substituted and CC_CREATE in relay.commands
    assert not relay.sent(password.encode(), window=len(password))  # never in the clear
    stolen = any(password.encode() in plain for plain in thief.read)
    assert stolen is not verified, thief.read


def flip_signature_bit(command: bytes, response: bytes) -> bytes:
    """One bit of the signature in TPM2_Sign's answer flipped; the HMAC left as it is."""
    if _U32.unpack_from(command, 6)[0] != CC_SIGN or _U32.unpack_from(response, 6)[0] != 0:
        return response
    (parameters,) = _U32.unpack_from(response, 10)
    last = 14 + parameters - 1  # the signature's last byte
    return response[:last] + bytes([response[last] ^ 0x01]) + response[last + 1:]


@pytest.mark.parametrize("policy", [False, True], ids=["pool-session", "policy-session"])
def test_case_2_a_forged_answer_is_dropped(relay: TamperingRelay,
                                           certified_tpm: CertifiedTpm,
                                           tmp_path: Path, policy: bool) -> None:
    """A key without a policy signs in a pool session (on the event loop's lane), a
    PCR-locked key in a policy session (on the worker thread): either way the forged
    answer is dropped and its session replaced."""
    request = (keypolicy.encode_request([keypolicy.pcr_step(keypolicy.parse_pcr_lock("16"))])
               if policy else b"")
    with Broker(relay.tcti, tmp_path / "broker",
                extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker, \
            Client(broker.socket) as client:
        assert client.status()["tpm_identity"] == "verified-by-certificate"
        der, _ = client.generate_key(KeyType.EC, Curve.P256, policy=request)
        signs(client, der)
        relay.tamper = flip_signature_bit
        key = client.load_key(der_to_pem(der))
        with pytest.raises(TpmError, match="failed its HMAC check: it was altered on "
                                           "the TPM's bus or did not come from the TPM"):
            client.sign(key, bytes(32))
        relay.tamper = lambda command, response: response
        assert [cc for cc, _, _ in relay.tampered] == [CC_SIGN]
        for _ in range(20):  # the next requests are served, with a new session
            signs(client, der)
        status = client.status()
        assert status["tpm_forged_answers"] == 1
        assert status["pool_sessions"] == status["pool_size"] == 2
        # The session of the forged answer was flushed, not left in the TPM.
        assert status["tpm_active_sessions"] == 2 + int(policy)
        assert status["policy_pool_sessions"] == int(policy)
        drawn = client.random(64)
        log = broker.log_path.read_text()
    forged = re.findall(r"WARNING tpmbroker\.audit: event=tpm_response_forged "
                        r"command=TPM2_CC_Sign session=(0x0[23][0-9a-f]{6}) ", log)
    # Policy sessions have handles 0x03..., HMAC sessions 0x02...
    assert [handle[:4] for handle in forged] == ["0x03" if policy else "0x02"], log
    assert not relay.seen(drawn, window=16)


# --- helpers ------------------------------------------------------------------------------

def self_signed_ca(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)
