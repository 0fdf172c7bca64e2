"""Clients against a lying broker (tests/malicious_broker.py, 60 misbehaviours).

For every misbehaviour, the Python client and the provider (through `openssl dgst -sign`)
must: never hand back anything but a signature that verifies with the key file's public
key; end every wait by the deadline, and at once when nothing more can come; never
crash. The provider is also built with AddressSanitizer and UBSan and run against every
misbehaviour, with no sanitizer report allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

import tpmbroker
from tpmbroker.client import Client
from tpmbroker.errors import ProtocolError, TpmBrokerError
from tpmbroker.paths import provider_path

from .malicious_broker import (
    MISBEHAVIOURS,
    RSA_MISBEHAVIOURS,
    UNSOLICITED_AFTER,
    UNSOLICITED_LATER,
    FakeBroker,
)

ROOT = Path(__file__).resolve().parent.parent
MODULE = provider_path()
OPENSSL = shutil.which("openssl") or "openssl"
# Misbehaviours that leave the client nothing to do but wait for its deadline (TIMEOUT);
# every other one must be refused at once, long before a deadline of LONG_TIMEOUT.
WAITS = {"truncated-then-hang", "never-answer", "slow-drip", "length-longer-than-body"}
TIMEOUT = 1.0
LONG_TIMEOUT = 10.0
AT_ONCE = 0.8  # seconds: "at once", with room for a busy machine


def deadline_for(behaviour: str) -> float:
    return TIMEOUT if behaviour in WAITS else LONG_TIMEOUT
REFUSED = sorted(set(MISBEHAVIOURS) - {UNSOLICITED_AFTER, UNSOLICITED_LATER})


def test_the_fake_has_forty_misbehaviours_or_more() -> None:
    assert len(MISBEHAVIOURS) + len(RSA_MISBEHAVIOURS) >= 40


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeBroker]:
    with FakeBroker(str(tmp_path / "fake.sock")) as broker:
        yield broker


@pytest.fixture
def rsa_fake(tmp_path: Path) -> Iterator[FakeBroker]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with FakeBroker(str(tmp_path / "fake-rsa.sock"), key=key) as broker:
        yield broker


def verifies(fake: FakeBroker, signature: bytes, digest: bytes) -> bool:
    public = fake.key.public_key()
    algorithm = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(algorithm))
        else:
            public.verify(signature, digest, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        return False
    return True


# --- the Python client ------------------------------------------------------------------

def python_sign(fake: FakeBroker, behaviour: str, timeout: float | None = None,
                verify: bool = True) -> tuple[bytes | BaseException, float]:
    timeout = deadline_for(behaviour) if timeout is None else timeout
    fake.behaviour = "honest"
    digest = os.urandom(32)
    with Client(fake.path, timeout=timeout, verify=verify) as client:
        key = client.load_key(fake.key_pem())
        fake.behaviour = behaviour
        t0 = time.monotonic()
        try:
            return client.sign(key, digest), time.monotonic() - t0
        except TpmBrokerError as exc:  # anything else (AssertionError, ValueError) fails
            return exc, time.monotonic() - t0
        finally:
            assert digest  # the digest the fake saw is the one we check against


def test_the_honest_fake_signs_for_the_python_client(fake: FakeBroker,
                                                      rsa_fake: FakeBroker) -> None:
    for broker in (fake, rsa_fake):
        with Client(broker.path, timeout=TIMEOUT) as client:
            key = client.load_key(broker.key_pem())
            digest = os.urandom(32)
            assert verifies(broker, client.sign(key, digest), digest)


@pytest.mark.parametrize("behaviour", REFUSED)
def test_python_client_refuses(fake: FakeBroker, behaviour: str) -> None:
    result, elapsed = python_sign(fake, behaviour)
    assert isinstance(result, TpmBrokerError), f"{behaviour}: accepted {result!r}"
    assert elapsed < (TIMEOUT + 0.5 if behaviour in WAITS else AT_ONCE), (behaviour, elapsed)
    if behaviour in WAITS:
        assert elapsed >= TIMEOUT * 0.9  # it did wait: nothing else ended it early


@pytest.mark.parametrize("behaviour", sorted(RSA_MISBEHAVIOURS))
def test_python_client_refuses_rsa(rsa_fake: FakeBroker, behaviour: str) -> None:
    result, elapsed = python_sign(rsa_fake, behaviour)
    assert isinstance(result, ProtocolError), f"{behaviour}: accepted {result!r}"
    assert elapsed < AT_ONCE


def test_connection_error_without_close_ends_the_wait_at_once(fake: FakeBroker) -> None:
    result, elapsed = python_sign(fake, "connection-error-no-close", timeout=30)
    assert isinstance(result, TpmBrokerError)
    assert elapsed < AT_ONCE, elapsed


@pytest.mark.parametrize("behaviour", [UNSOLICITED_AFTER, UNSOLICITED_LATER])
def test_a_connection_with_an_unsolicited_frame_is_not_used_again(fake: FakeBroker,
                                                                  behaviour: str) -> None:
    with Client(fake.path, timeout=TIMEOUT) as client:
        key = client.load_key(fake.key_pem())
        fake.behaviour = behaviour
        before = fake.connections
        for _ in range(3):
            digest = os.urandom(32)
            assert verifies(fake, client.sign(key, digest), digest)
            time.sleep(0.3)  # the later frame is there before the next request
        # each answer was followed by a frame nobody asked for: a new connection each time
        assert fake.connections == before + 2


def test_shape_checks_stay_on_without_verification(fake: FakeBroker) -> None:
    result, _ = python_sign(fake, "garbage-72", verify=False)
    assert isinstance(result, ProtocolError)
    # what only verification catches passes without it: the option does turn it off
    result, _ = python_sign(fake, "wrong-digest", verify=False)
    assert isinstance(result, bytes)
    result, _ = python_sign(fake, "wrong-digest", verify=True)
    assert isinstance(result, ProtocolError)


def test_a_broker_lying_about_the_public_key_is_caught_at_load(fake: FakeBroker) -> None:
    fake.lie_on_load = "other-public-key"
    with Client(fake.path, timeout=TIMEOUT) as client, \
            pytest.raises(ProtocolError, match="another public key"):
        client.load_key(fake.key_pem())
    fake.lie_on_load = "other-key-id"
    with Client(fake.path, timeout=TIMEOUT) as client, \
            pytest.raises(ProtocolError, match="id of another key"):
        client.load_key(fake.key_pem())


def test_cryptography_key_refuses_garbage(fake: FakeBroker, tmp_path: Path) -> None:
    keyfile = tmp_path / "fake.pem"
    keyfile.write_bytes(fake.key_pem())
    key = tpmbroker.load_private_key(keyfile, socket=fake.path, timeout=TIMEOUT)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        fake.key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    key.public_key().verify(key.sign(b"data", ec.ECDSA(hashes.SHA256())), b"data",
                            ec.ECDSA(hashes.SHA256()))
    fake.behaviour = "garbage-4096"
    with pytest.raises(ProtocolError):
        key.sign(b"data", ec.ECDSA(hashes.SHA256()))


# --- the provider, through the openssl CLI -------------------------------------------------

def openssl_conf(tmp_path: Path, module: Path, sock: str, extra: str = "",
                 timeout: float = LONG_TIMEOUT) -> Path:
    cnf = tmp_path / f"openssl-{module.parent.name}-{timeout}.cnf"
    cnf.write_text((ROOT / "openssl.cnf.example").read_text()
                   .replace("/usr/lib/x86_64-linux-gnu/ossl-modules/tpmbroker.so", str(module))
                   .replace("/run/tpmbroker/tpmbroker.sock", sock)
                   .replace("timeout = 30", f"timeout = {timeout}\n{extra}"))
    return cnf


def openssl_sign(fake: FakeBroker, tmp_path: Path, cnf: Path,
                 env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes],
                                                            float, bytes, bytes]:
    """(result, seconds, data, signature file contents) of one `openssl dgst -sign`."""
    key = tmp_path / "fake-key.pem"
    if not key.exists():
        key.write_bytes(fake.key_pem())
    data = os.urandom(100)
    (tmp_path / "data").write_bytes(data)
    sig = tmp_path / "sig"
    sig.unlink(missing_ok=True)
    penv = dict(os.environ, OPENSSL_CONF=str(cnf), **(env or {}))
    penv.pop("TPMBROKER_SOCKET", None)
    t0 = time.monotonic()
    res = subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", str(key), "-out", str(sig),
                          str(tmp_path / "data")], capture_output=True, env=penv, timeout=60)
    elapsed = time.monotonic() - t0
    return res, elapsed, data, sig.read_bytes() if sig.exists() else b""


def check_openssl_refuses(fake: FakeBroker, tmp_path: Path, module: Path, behaviour: str,
                          env: dict[str, str] | None = None,
                          extra: str = "") -> subprocess.CompletedProcess[bytes]:
    cnf = openssl_conf(tmp_path, module, fake.path, extra, deadline_for(behaviour))
    fake.behaviour = behaviour
    res, elapsed, data, sig = openssl_sign(fake, tmp_path, cnf, env)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    assert res.returncode > 0, (behaviour, res.returncode, res.stderr)  # < 0: a signal
    assert not sig or not verifies(fake, sig, digest.finalize()), behaviour
    assert sig == b"", (behaviour, sig[:80])
    # openssl's own start-up is part of the time measured
    assert elapsed < deadline_for(behaviour) + 1.0 if behaviour in WAITS \
        else elapsed < AT_ONCE + 0.4, (behaviour, elapsed)
    return res


needs_provider = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


@needs_provider
def test_the_honest_fake_signs_through_openssl(fake: FakeBroker, tmp_path: Path) -> None:
    cnf = openssl_conf(tmp_path, MODULE, fake.path)
    res, _, data, sig = openssl_sign(fake, tmp_path, cnf)
    assert res.returncode == 0, res.stderr
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    assert verifies(fake, sig, digest.finalize())


@needs_provider
def test_a_connection_a_stopping_broker_answers_is_made_again(fake: FakeBroker,
                                                               tmp_path: Path) -> None:
    """A broker that begins to stop as a connection arrives answers its HELLO
    SHUTTING_DOWN; nothing of the request went out, so it waits for the successor."""
    fake.stopping_hellos = 2
    cnf = openssl_conf(tmp_path, MODULE, fake.path)
    res, _, data, sig = openssl_sign(fake, tmp_path, cnf)
    assert res.returncode == 0, res.stderr
    assert fake.stopping_hellos == 0 and fake.connections >= 3
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    assert verifies(fake, sig, digest.finalize())


@needs_provider
def test_openssl_refuses_every_misbehaviour(fake: FakeBroker, rsa_fake: FakeBroker,
                                            tmp_path: Path) -> None:
    for behaviour in REFUSED:
        check_openssl_refuses(fake, tmp_path, MODULE, behaviour)
    rsa_dir = tmp_path / "rsa"
    rsa_dir.mkdir()
    for behaviour in sorted(RSA_MISBEHAVIOURS):
        check_openssl_refuses(rsa_fake, rsa_dir, MODULE, behaviour)


@needs_provider
def test_openssl_says_the_signature_was_refused(fake: FakeBroker, tmp_path: Path) -> None:
    res = check_openssl_refuses(fake, tmp_path, MODULE, "garbage-72")
    assert b"72 bytes that are not a DER ECDSA signature" in res.stderr, res.stderr
    res = check_openssl_refuses(fake, tmp_path, MODULE, "wrong-digest")
    assert b"does not verify with the key's public key" in res.stderr, res.stderr
    fake.lie_on_load = "other-public-key"
    res = check_openssl_refuses(fake, tmp_path, MODULE, "honest")
    assert b"does not verify" in res.stderr, res.stderr


@needs_provider
@pytest.mark.parametrize("how", ["config", "environment"])
def test_openssl_verification_can_be_turned_off(fake: FakeBroker, tmp_path: Path,
                                                how: str) -> None:
    extra, env = ("verify = 0", None) if how == "config" else ("", {"TPMBROKER_VERIFY": "0"})
    check_openssl_refuses(fake, tmp_path, MODULE, "garbage-72", env, extra)  # always checked
    cnf = openssl_conf(tmp_path, MODULE, fake.path, extra)
    fake.behaviour = "wrong-digest"
    res, _, _, sig = openssl_sign(fake, tmp_path, cnf, env)
    assert res.returncode == 0 and sig, res.stderr  # only verification catches this one


# --- the provider under AddressSanitizer and UBSan ---------------------------------------

def sanitizer_runtime() -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    path = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tpmbroker.so compiled with -fsanitize=address,undefined into a temporary dir."""
    if sanitizer_runtime() is None:
        pytest.skip("gcc with libasan is needed")
    import build_provider

    build_provider.write_definitions_header()
    out = tmp_path_factory.mktemp("asan") / "tpmbroker.so"
    sources = sorted(str(p) for p in (ROOT / "provider").glob("*.c"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    *build_provider.WARNINGS, "-std=gnu11", "-fvisibility=hidden",
                    f"-I{ROOT / 'provider'}", *sources, "-o", str(out),
                    f"-Wl,--version-script={ROOT / 'provider' / 'tpmbroker.map'}",
                    "-lcrypto", "-lpthread"], check=True, capture_output=True)
    return out


def test_sanitized_provider_stays_clean(sanitized_module: Path, fake: FakeBroker,
                                        rsa_fake: FakeBroker, tmp_path: Path) -> None:
    runtime = sanitizer_runtime()
    assert runtime is not None
    needed = subprocess.run(["readelf", "-d", str(sanitized_module)], capture_output=True,
                            text=True, check=True).stdout
    assert "libasan" in needed and "libubsan" in needed  # the copy under test is sanitized
    env = {"LD_PRELOAD": runtime,
           # openssl's CLI keeps some allocations to exit; the provider's own are freed
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98"}
    cnf = openssl_conf(tmp_path, sanitized_module, fake.path)
    res, _, _, sig = openssl_sign(fake, tmp_path, cnf, env)  # honest: the module works
    assert res.returncode == 0 and sig, res.stderr
    for broker, behaviours in ((fake, REFUSED), (rsa_fake, sorted(RSA_MISBEHAVIOURS))):
        work = tmp_path / ("ec" if broker is fake else "rsa")
        work.mkdir()
        for behaviour in behaviours:
            res = check_openssl_refuses(broker, work, sanitized_module, behaviour, env)
            assert b"Sanitizer" not in res.stderr and b"runtime error" not in res.stderr, \
                (behaviour, res.stderr.decode(errors="replace"))
            assert res.returncode not in (98, 99), behaviour


@needs_provider
@pytest.mark.parametrize("key_type", ["EC", "RSA"])
def test_a_kept_verification_context_refuses_a_bad_signature_as_a_new_one_would(
        fake: FakeBroker, rsa_fake: FakeBroker, key_type: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider keeps a verification context per key and duplicates it for every
    signature: once honest signatures have made it, a signature over another digest is
    still refused, in both the digest-sign and the pkey-sign paths, and the next honest
    one passes."""
    from benchmarks.libcrypto import Libcrypto, LibcryptoError, Signer

    broker = fake if key_type == "EC" else rsa_fake
    monkeypatch.setenv("TPMBROKER_SOCKET", broker.path)
    monkeypatch.delenv("TPMBROKER_VERIFY", raising=False)
    crypto = Libcrypto(["default", "tpmbroker"], search_path=str(MODULE.parent))
    pkey = None
    signers: list[Signer] = []
    try:
        pkey = crypto.load_pem_key(broker.key_pem())
        for mode in ("digest-sign", "pkey-sign"):
            signer = Signer(crypto, pkey, mode)
            signers.append(signer)
            broker.behaviour = "honest"
            for _ in range(3):
                message = os.urandom(50)
                assert verifies(broker, signer.sign(message), _sha256(message))
            # A well-shaped signature over another digest: only the verification finds it.
            broker.behaviour = "wrong-digest"
            with pytest.raises(LibcryptoError, match="tpmbroker protocol error"):
                signer.sign(os.urandom(50))
            broker.behaviour = "honest"
            message = os.urandom(50)
            assert verifies(broker, signer.sign(message), _sha256(message))
    finally:
        # Everything the provider made goes before the library context that holds it.
        for signer in signers:
            crypto.ffi.release(signer.md_ctx)
            if signer.pctx is not None:
                crypto.ffi.release(signer.pctx)
        if pkey is not None:
            crypto.ffi.release(pkey)
        crypto.close()


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()
