"""Keys bound to PCRs, end to end: swtpm, the real broker, the `tpmbroker` command, the
Python client and the openssl CLI with tpmbroker.so.

A key locked to PCR 16 signs; after PCR 16 is extended it is refused with POLICY_FAILED
naming the PCR, and no dictionary-attack count is spent; after a TPM restart (PCRs reset)
it signs again. A key with a password and a PCR policy needs both. The policy encoding is
checked against the TPM's own policy digest (a trial session) and the TSS2 PRIVATE KEY
ASN.1 definition.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tpmbroker import keypolicy
from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import AuthFailedError, BadKeyError, PolicyFailedError, Status
from tpmbroker.keyfile import pem_to_der
from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker, active_sessions, raise_max_tries

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
MODDIR = str(provider_path().parent)
PROV = ["-provider-path", MODDIR, "-provider", "default", "-provider", "tpmbroker"]
OPENSSL = shutil.which("openssl") or "openssl"
SHA256_ZERO = bytes(32)


# --- the encoding, without a TPM ----------------------------------------------------------

def test_pcr_lock_spellings() -> None:
    sel = keypolicy.parse_pcr_lock
    assert sel("16") == [keypolicy.PcrSelection(p.Hash.SHA256, (16,))]
    assert sel("sha256:16,17") == [keypolicy.PcrSelection(p.Hash.SHA256, (16, 17))]
    assert sel("sha1:7+sha256:0-2") == [keypolicy.PcrSelection(p.Hash.SHA1, (7,)),
                                        keypolicy.PcrSelection(p.Hash.SHA256, (0, 1, 2))]
    for bad in ("24", "md5:1", "x", "3-1"):
        with pytest.raises(ValueError):
            sel(bad)


def test_selection_marshals_as_tpml_pcr_selection() -> None:
    selections = keypolicy.parse_pcr_lock("sha256:16,17")
    raw = keypolicy.marshal_selection(selections)
    # count 1, TPM_ALG_SHA256, sizeofSelect 3, PCRs 16 and 17 in the third byte
    assert raw == bytes.fromhex("00000001" "000b" "03" "000003")
    assert keypolicy.unmarshal_selection(raw) == (selections, len(raw))


def test_policy_digest_is_the_tpms(swtpm: Swtpm) -> None:
    """Our digest of PolicyPCR(16) + PolicyAuthValue equals the one the TPM computes in a
    trial session over the same PCRs."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPM2B_DIGEST, TPML_PCR_SELECTION, TPMT_SYM_DEF

    with ESAPI(swtpm.tcti) as ectx:
        pcr16_extend(ectx, b"boot")  # not all zero
        _, _, values = ectx.pcr_read(TPML_PCR_SELECTION.parse("sha256:16"))
        trial = ectx.start_auth_session(
            tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE, session_type=TPM2_SE.TRIAL,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), auth_hash=TPM2_ALG.SHA256)
        ectx.policy_pcr(trial, TPM2B_DIGEST(), TPML_PCR_SELECTION.parse("sha256:16"))
        ectx.policy_auth_value(trial)
        tpm_digest = bytes(ectx.policy_get_digest(trial))
        ectx.flush_context(trial)
    current = bytes(values.digests[0])
    steps = [keypolicy.pcr_step(keypolicy.parse_pcr_lock("16"),
                                keypolicy.pcr_digest([current])),
             keypolicy.auth_value_step()]
    assert keypolicy.policy_digest(steps) == tpm_digest


def pcr16_extend(ectx: Any, measured: bytes) -> None:
    """tpm2_pcrextend 16:sha256=H(measured), with tpm2-pytss."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    value = TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                    digest=TPMU_HA(sha256=hashlib.sha256(measured).digest()))
    ectx.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([value]))


def _elements(body: bytes) -> list[tuple[int, bytes]]:
    """(tag, contents) of each DER element in `body`, by hand."""
    pos, out = 0, []
    while pos < len(body):
        tag, length = body[pos], body[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(body[pos:pos + n], "big")
            pos += n
        out.append((tag, body[pos:pos + length]))
        pos += length
    assert pos == len(body)
    return out


# --- end to end ------------------------------------------------------------------------------

def keygen(broker: Broker, out: Path, *args: str, password: str | None = None,
           tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = []
    if password is not None:
        assert tmp is not None
        (tmp / "pw").write_text(password + "\n")
        extra = ["--password-file", str(tmp / "pw")]
    return subprocess.run([TPMBROKER, "keygen", "--socket", broker.socket, *args, *extra,
                           "-o", str(out)], capture_output=True, text=True, timeout=120)


def verify(spki: bytes, signature: bytes, digest: bytes) -> None:
    public = load_der_public_key(spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def extend_pcr16(broker: Broker, swtpm: Swtpm) -> None:
    """tpm2_pcrextend's job with tpm2-pytss, while the broker is stopped (swtpm serves
    one connection at a time)."""
    from tpm2_pytss import ESAPI

    broker.stop()
    with ESAPI(swtpm.tcti) as ectx:
        pcr16_extend(ectx, b"an update")
    broker.start()


def lockout_counter(client: Client) -> int:
    value = client.status()["tpm_lockout_counter"]
    assert isinstance(value, int)
    return value


def test_pcr_locked_key_signs_is_refused_after_extend_and_signs_after_restart(
        swtpm: Swtpm, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    with Broker(swtpm.tcti, tmp_path / "broker") as broker:
        made = keygen(broker, key, "--alg", "ec:P-256", "--pcr-lock", "sha256:16")
        assert made.returncode == 0, made.stderr
        der = pem_to_der(key.read_bytes())
        # TPMKey: type, emptyAuth [0], policy [1] (SEQUENCE OF TPMPolicy), parent, ...
        ((outer, contents),) = _elements(der)
        fields = _elements(contents)
        assert outer == 0x30
        assert [tag for tag, _ in fields] == [0x06, 0xA0, 0xA1, 0x02, 0x04, 0x04]
        ((seq_of, policies),) = _elements(fields[2][1])
        assert seq_of == 0x30
        ((entry, policy),) = _elements(policies)
        assert entry == 0x30
        code, body = _elements(policy)
        # commandCode [0] EXPLICIT INTEGER TPM_CC_PolicyPCR
        assert code == (0xA0, bytes.fromhex("0202017f"))
        # commandPolicy [1] EXPLICIT OCTET STRING: TPML_PCR_SELECTION sha256:16, digest
        assert body[0] == 0xA1 and body[1][0] == 0x04
        assert body[1][2:] == bytes.fromhex("00000001000b03000001") + hashlib.sha256(
            SHA256_ZERO).digest()

        digest = hashlib.sha256(b"pcr").digest()
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            verify(loaded.public_key, client.sign(loaded, digest), digest)
            before = lockout_counter(client)
            status = client.status()
            assert status["policy_pool_size"] == 1

        extend_pcr16(broker, swtpm)
        with Client(broker.socket) as client:
            loaded = client.load_key(key)  # loading needs no policy
            with pytest.raises(PolicyFailedError) as refused:
                client.sign(loaded, digest)
            assert refused.value.status is Status.POLICY_FAILED
            assert "PCR 16 (sha256) does not match the key's policy" in refused.value.message
            assert lockout_counter(client) == before  # no dictionary-attack count

        swtpm.restart()  # Startup(CLEAR): PCR 16 back to zeros; the broker reconnects
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            verify(loaded.public_key, client.sign(loaded, digest), digest)


def test_pcr_locked_key_through_the_provider(swtpm: Swtpm, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    with Broker(swtpm.tcti, tmp_path / "broker") as broker:
        made = keygen(broker, key, "--alg", "rsa:2048", "--pcr-lock", "16")
        assert made.returncode == 0, made.stderr
        env_sign = _provider_sign(broker, key, tmp_path)
        assert env_sign.returncode == 0, env_sign.stderr
        with Client(broker.socket) as client:
            spki = client.load_key(key).public_key
        public = load_der_public_key(spki)
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify((tmp_path / "sig").read_bytes(), (tmp_path / "data").read_bytes(),
                      padding.PKCS1v15(), hashes.SHA256())
        extend_pcr16(broker, swtpm)
        refused = _provider_sign(broker, key, tmp_path)
        assert refused.returncode != 0
        assert "PCR 16 (sha256) does not match the key's policy" in refused.stderr


def _provider_sign(broker: Broker, key: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    data = tmp / "data"
    data.write_bytes(b"signed by a PCR-bound key")
    return subprocess.run(
        [OPENSSL, "pkeyutl", "-sign", *PROV, "-inkey", str(key), "-rawin", "-digest",
         "sha256", "-in", str(data), "-out", str(tmp / "sig")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TPMBROKER_SOCKET": broker.socket,
             "TPMBROKER_DEBUG": "1"})


def test_pcr_values_given_and_password_with_policy(swtpm: Swtpm, tmp_path: Path) -> None:
    """--pcr-values binds to given values (zeros: PCR 16 after a reset); a password with
    a policy needs both: the wrong password is refused and counts once, the right one
    signs; and the password cannot stand in for the policy."""
    raise_max_tries(swtpm)
    key = tmp_path / "key.pem"
    with Broker(swtpm.tcti, tmp_path / "broker") as broker:
        made = keygen(broker, key, "--pcr-lock", "16", "--pcr-values", SHA256_ZERO.hex(),
                      password="s3cret", tmp=tmp_path)
        assert made.returncode == 0, made.stderr
        digest = hashlib.sha256(b"both").digest()
        with Client(broker.socket) as client:
            before = lockout_counter(client)
            wrong = client.load_key(key, "wrong")
            with pytest.raises(AuthFailedError):
                client.sign(wrong, digest)
            assert lockout_counter(client) == before + 1
            right = client.load_key(key, "s3cret")
            verify(right.public_key, client.sign(right, digest), digest)
        # A policy that asks for other PCR values: refused before any password counts.
        other = tmp_path / "other.pem"
        made = keygen(broker, other, "--pcr-lock", "16", "--pcr-values", "11" * 32,
                      password="s3cret", tmp=tmp_path)
        assert made.returncode == 0, made.stderr
        with Client(broker.socket) as client:
            before = lockout_counter(client)
            loaded = client.load_key(other, "s3cret")
            with pytest.raises(PolicyFailedError, match="PCR 16"):
                client.sign(loaded, digest)
            assert lockout_counter(client) == before


def test_bad_policies_are_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    with Broker(swtpm.tcti, tmp_path / "broker") as broker:
        bad = subprocess.run([TPMBROKER, "keygen", "--socket", broker.socket, "--pcr-lock",
                              "16", "--pcr-values", "00", "-o", str(tmp_path / "k.pem")],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "32 bytes" in bad.stderr
        with Client(broker.socket) as client:
            der, _ = client.generate_key(p.KeyType.EC, p.Curve.P256, policy=(
                keypolicy.encode_request([keypolicy.pcr_step(
                    keypolicy.parse_pcr_lock("16"))])))
            # The file's policy altered: its digest is no longer the key's authPolicy.
            tampered = der.replace(bytes.fromhex("000b03000001"),
                                   bytes.fromhex("000b03000002"))
            assert tampered != der
            with pytest.raises(BadKeyError, match="authPolicy"):
                client.load_key(tampered)


# --- many signers at once ----------------------------------------------------------------------

# The provider through ctypes to the system libcrypto (its calls release the GIL): thread i
# signs with the PCR-bound key when i is even, with the plain key when odd; the children
# fork before any thread starts and run the same threads. Prints the failures of this
# process and the children's exit codes.
_SIGNERS = textwrap.dedent("""\
    import ctypes, os, sys, threading
    lib = ctypes.CDLL("libcrypto.so.3")
    lib.OSSL_PROVIDER_set_default_search_path(None, sys.argv[1].encode())
    lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
    assert lib.OSSL_PROVIDER_load(None, b"tpmbroker")
    assert lib.OSSL_PROVIDER_load(None, b"default")
    for name in ("BIO_new_mem_buf", "PEM_read_bio_PrivateKey", "EVP_PKEY_CTX_new_from_pkey"):
        getattr(lib, name).restype = ctypes.c_void_p
    lib.PEM_read_bio_PrivateKey.argtypes = [ctypes.c_void_p] * 4
    lib.EVP_PKEY_CTX_new_from_pkey.argtypes = [ctypes.c_void_p] * 3
    for name in ("EVP_PKEY_CTX_free", "EVP_PKEY_sign_init"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.EVP_PKEY_sign.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                  ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p,
                                  ctypes.c_size_t]

    def read(path):
        data = open(path, "rb").read()
        key = lib.PEM_read_bio_PrivateKey(lib.BIO_new_mem_buf(data, len(data)), None, None,
                                          None)
        assert key, path
        return key

    keys = [read(sys.argv[2]), read(sys.argv[3])]
    rounds, threads, children = (int(a) for a in sys.argv[4:7])
    failures = []

    def sign(key):
        ctx = lib.EVP_PKEY_CTX_new_from_pkey(None, key, None)
        out = ctypes.create_string_buffer(512)
        n = ctypes.c_size_t(512)
        ok = (lib.EVP_PKEY_sign_init(ctx) == 1
              and lib.EVP_PKEY_sign(ctx, out, ctypes.byref(n), bytes(32), 32) == 1)
        lib.EVP_PKEY_CTX_free(ctx)
        return ok

    def worker(key):
        for _ in range(rounds):
            if not sign(key):
                failures.append(1)

    pids, child = [], False
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            pids, child = [], True
            break
        pids.append(pid)
    work = [threading.Thread(target=worker, args=(keys[i % 2],)) for i in range(threads)]
    [t.start() for t in work]
    [t.join() for t in work]
    if child:
        os._exit(1 if failures else 0)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(len(failures), *codes)
    """)
THREADS, CHILDREN, ROUNDS = 64, 2, 3


def test_threads_and_forked_children_sign_with_policy_and_plain_keys(
        swtpm: Swtpm, tmp_path: Path) -> None:
    """No failure, every signature counted, and the TPM's active sessions never above
    the HMAC pool and the policy pool together."""
    policy_key, plain_key = tmp_path / "policy.pem", tmp_path / "plain.pem"
    with Broker(swtpm.tcti, tmp_path / "broker", sessions=2) as broker:
        assert keygen(broker, policy_key, "--pcr-lock", "16").returncode == 0
        assert keygen(broker, plain_key).returncode == 0
        with Client(broker.socket) as client:
            before = client.status()
        ceiling = before["pool_size"] + before["policy_pool_size"]  # type: ignore[operator]
        assert ceiling == 3
        with active_sessions(broker.socket) as active:
            res = subprocess.run(
                [sys.executable, "-c", _SIGNERS, MODDIR, str(policy_key), str(plain_key),
                 str(ROUNDS), str(THREADS), str(CHILDREN)],
                capture_output=True, text=True, timeout=300,
                env=dict(os.environ, TPMBROKER_SOCKET=broker.socket))
        assert res.returncode == 0, res.stderr + broker.log()
        assert res.stdout.split() == ["0"] + ["0"] * CHILDREN  # no failure anywhere
        with Client(broker.socket) as client:
            after = client.status()
        done = after["signatures"] - before["signatures"]  # type: ignore[operator]
        assert done == THREADS * ROUNDS * (1 + CHILDREN)
        assert after["policy_pool_sessions"] == 1  # the policy keys went through it
        assert active and max(active) <= ceiling


# --- signed policies (PolicyAuthorize) -------------------------------------------------------

def policy_sign(key: Path, signer: Path, value: bytes, name: str
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPMBROKER, "policy", "sign", "--signing-key", str(signer),
                           "--pcr-lock", "16", "--pcr-values", value.hex(), "--name", name,
                           str(key)], capture_output=True, text=True, timeout=60)


def write_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization

    private = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return private


def test_signed_policy_key_follows_a_pcr_change(swtpm: Swtpm, tmp_path: Path) -> None:
    """A key made with --auth-policy opens under policies the policy key signed: refused
    with none, signs under one for the current PCR 16, is refused after PCR 16 changes,
    and signs again once a policy for the new value is signed and added."""
    from cryptography.hazmat.primitives import serialization

    signer, key = tmp_path / "policy.pem", tmp_path / "key.pem"
    private = write_ec_key(signer)
    (tmp_path / "policy.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    digest = hashlib.sha256(b"signed policy").digest()
    with Broker(swtpm.tcti, tmp_path / "broker") as broker:
        made = keygen(broker, key, "--auth-policy", str(tmp_path / "policy.pub"))
        assert made.returncode == 0, made.stderr
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            with pytest.raises(PolicyFailedError, match="has none"):
                client.sign(loaded, digest)
        signed = policy_sign(key, signer, SHA256_ZERO, "boot 1")
        assert signed.returncode == 0, signed.stderr
        # Another key's signature is refused when adding, before any TPM sees it.
        write_ec_key(tmp_path / "other.pem")
        other = policy_sign(key, tmp_path / "other.pem", SHA256_ZERO, "forged")
        assert other.returncode != 0 and "another key" in other.stderr
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            verify(loaded.public_key, client.sign(loaded, digest), digest)

        extend_pcr16(broker, swtpm)
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            with pytest.raises(PolicyFailedError) as refused:
                client.sign(loaded, digest)
            assert ("signed policy 'boot 1': PCR 16 (sha256) does not match the key's "
                    "policy") in refused.value.message
        new_value = hashlib.sha256(SHA256_ZERO + hashlib.sha256(b"an update").digest()
                                   ).digest()
        signed = policy_sign(key, signer, new_value, "boot 2")
        assert signed.returncode == 0, signed.stderr
        with Client(broker.socket) as client:
            loaded = client.load_key(key)
            verify(loaded.public_key, client.sign(loaded, digest), digest)
