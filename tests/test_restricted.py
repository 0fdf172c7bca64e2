"""Restricted signing keys (attestation keys from `tpm2_createak`) sign through the broker:
the TPM hashes the message (SIGN_MESSAGE) and signs with the ticket, for the Python
client and for the openssl CLI through the provider, keys by file, handle: and object:.

One swtpm, tpm2-abrmd, the keys and the broker serve the whole module: making the keys
with tpm2-tools is most of the time.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC

import tpmbroker
from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import DeadlineError, UnsupportedError
from tpmbroker.ops.sign_message import SignMessage
from tpmbroker.procedures.load import load_key
from tpmbroker.procedures.sign_message import sign_message
from tpmbroker.protocol import Hash, KeySource, Scheme
from tpmbroker.simulator import Swtpm
from tpmbroker.templates import storage_parent_template
from tpmbroker.tpm.keys import tss2_key_der

from .tpmfixtures import Abrmd, Broker, BrokerEnv, DbusDaemon, have, running_swtpm

pytestmark = pytest.mark.skipif(not have("tpm2_createak"), reason="tpm2-tools not installed")

OPENSSL = "openssl"
EC_HANDLE = "0x81010010"
RSA_HANDLE = "0x81010011"
SRK_HANDLE = "0x81000001"
TPM_GENERATED = b"\xffTCG"


class World(BrokerEnv):
    def __init__(self, base: Path, broker: Broker, keys: dict[str, str], tcti: str,
                 environ: dict[str, str]) -> None:
        super().__init__(broker, base, openssl_conf=None)  # CA certificates by req -x509
        self.keys = keys  # name -> what openssl and the Python client are given
        self.pubs: dict[str, Path] = {}  # name -> public key PEM
        self.tcti = tcti
        self.environ.update(environ)  # tpm2-abrmd's, for tpm2-tools


PROV = ["-provider-path", str(Path(tpmbroker.__file__).parent), "-provider", "default",
        "-provider", "tpmbroker"]


def _tools(env: dict[str, str], cwd: Path, *args: str) -> None:
    res = subprocess.run(list(args), capture_output=True, env=env, cwd=cwd, timeout=120)
    assert res.returncode == 0, (args, res.stderr.decode())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_bus: DbusDaemon) -> Iterator[World]:
    d = tmp_path_factory.mktemp("restricted")
    with running_swtpm(d / "tpmstate") as tpm:
        rm = Abrmd(tpm.tcti, d / "abrmd", session_bus, max_connections=100)
        rm.start()
        try:
            env = dict(rm.env(), TPM2TOOLS_TCTI=rm.tcti)

            def t(*args: str) -> None:
                _tools(env, d, *args)

            t("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
            # Attestation keys as users make them: ECDSA/SHA-256 and RSA-PSS/SHA-256.
            t("tpm2_createak", "-C", "ek.ctx", "-c", "akec.ctx", "-G", "ecc", "-g", "sha256",
              "-s", "ecdsa", "-u", "akec.pub", "-n", "akec.name", "-r", "akec.priv")
            t("tpm2_evictcontrol", "-C", "o", "-c", "akec.ctx", EC_HANDLE, "-o", "akec.tr")
            t("tpm2_createak", "-C", "ek.ctx", "-c", "akrsa.ctx", "-G", "rsa", "-g", "sha256",
              "-s", "rsapss", "-u", "akrsa.pub", "-n", "akrsa.name", "-r", "akrsa.priv")
            t("tpm2_evictcontrol", "-C", "o", "-c", "akrsa.ctx", RSA_HANDLE, "-o", "akrsa.tr")
            # A restricted signing key in a key file: under a persistent storage parent.
            t("tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", "srk.ctx")
            t("tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", SRK_HANDLE)
            t("tpm2_create", "-C", SRK_HANDLE, "-G", "ecc256:ecdsa-sha256:null", "-a",
              "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda",
              "-u", "rk.pub", "-r", "rk.priv")
            public, _ = TPM2B_PUBLIC.unmarshal((d / "rk.pub").read_bytes())
            private, _ = TPM2B_PRIVATE.unmarshal((d / "rk.priv").read_bytes())
            (d / "rk.pem").write_bytes(TSSPrivKey(private, public, empty_auth=True,
                                                  parent=int(SRK_HANDLE, 16)).to_pem())
            with Broker(rm.tcti, d / "broker", env=rm.env()) as broker:
                w = World(d, broker, {
                    "ec-handle": f"handle:{EC_HANDLE}",
                    "rsa-handle": f"handle:{RSA_HANDLE}",
                    "ec-object": f"object:{d / 'akec.tr'}",
                    "rsa-object": f"object:{d / 'akrsa.tr'}",
                    "ec-file": str(d / "rk.pem"),
                }, rm.tcti, rm.env())
                for name, uri in w.keys.items():
                    w.pubs[name] = d / f"{name}.pub.pem"
                    w.openssl("pkey", *PROV, "-in", uri, "-pubout", "-out", str(w.pubs[name]))
                yield w
        finally:
            rm.stop()


def _client_key(world: World, name: str) -> tuple[Client, LoadedKey]:
    client = Client(world.broker.socket)
    uri = world.keys[name]
    if uri.startswith(("handle:", "object:")):
        handle = int(uri[7:], 16) if uri.startswith("handle:") else int.from_bytes(
            Path(uri[7:]).read_bytes()[:4], "big")
        return client, client.load_key(handle)
    return client, client.load_key(uri)


@pytest.mark.parametrize("name", ["ec-handle", "rsa-handle", "ec-file"])
@pytest.mark.parametrize("size", [0, 100, 1024, 1025, 5000, p.MAX_MESSAGE])
def test_python_client_signs_messages_of_every_size(world: World, name: str, size: int) -> None:
    client, key = _client_key(world, name)
    with client:
        message = os.urandom(size).replace(b"\xff", b"\x00")
        scheme = p.Scheme.PSS if name.startswith("rsa") else p.Scheme.ECDSA
        # The client checks the signature against the key's public key over the message.
        signature = client.sign_message(key, message, "sha256", scheme)
    public = serialization.load_pem_public_key(world.pubs[name].read_bytes())
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, message,
                      padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
                      hashes.SHA256())


def test_refusals_name_why_and_spend_no_tpm_command(world: World) -> None:
    client, key = _client_key(world, "ec-handle")
    with client:
        before = client.status()
        # A digest: the TPM would refuse to sign it without a ticket.
        with pytest.raises(UnsupportedError, match=r"restricted.*-rawin"):
            client.sign(key, bytes(32), "sha256")
        # Over the limit: refused by the client, and by the broker for a client that sends it.
        with pytest.raises(UnsupportedError, match=f"at most {p.MAX_MESSAGE}"):
            client.sign_message(key, bytes(p.MAX_MESSAGE + 1))
        with pytest.raises(UnsupportedError, match=rf"at most {p.MAX_MESSAGE}.*MAX_MESSAGE"):
            client._call(SignMessage(key.key_id, p.Scheme.ECDSA, p.Hash.SHA256,
                                         bytes(p.MAX_MESSAGE + 1)), None, key)
        # What could pass for an attestation the TPM made, short and long.
        for size in (4, 100, 5000):
            with pytest.raises(UnsupportedError, match="0xff544347"):
                client.sign_message(key, TPM_GENERATED + bytes(size - 4))
        # The key's fixed scheme only (ECDSA with SHA-256).
        with pytest.raises(UnsupportedError, match="only signs with"):
            client.sign_message(key, b"m", "sha384")
        after = client.status()
    # None of them reached the TPM: nothing was hashed there.
    assert after["tpm_hashed_messages"] == before["tpm_hashed_messages"]
    assert after["signatures"] == before["signatures"]


def test_a_failed_hash_sequence_leaves_no_object_in_the_tpm(
        swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker alone on swtpm (no resource manager to tidy up after it): a hash sequence
    that fails half-way is flushed, and the TPM's transient handles are what they were."""
    from tpmbroker.tpm import TpmWorker
    from tpmbroker.tpm import hashing as hashing_module

    parent = 0x81000001
    with ESAPI(swtpm.tcti) as ectx:
        primary = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(
            publicArea=storage_parent_template(rsa=False)), ESYS_TR.RH_OWNER)[0]
        ectx.evict_control(ESYS_TR.RH_OWNER, primary, persistent_handle=parent)
        template = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=(
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"))
        private, public, *_ = ectx.create(primary, TPM2B_SENSITIVE_CREATE(),
                                          TPM2B_PUBLIC(publicArea=template))
        ectx.flush_context(primary)
    der = tss2_key_der(private, public, empty_auth=True, parent=parent)

    worker = TpmWorker(swtpm.tcti)
    worker.open(time.monotonic() + 30)
    try:
        info = load_key(worker, KeySource.TSS2_DER, der, time.monotonic() + 30)

        def transient() -> list[int]:
            _, data = worker.link.ectx.get_capability(TPM2_CAP.HANDLES, 0x80000000, 16)
            return sorted(int(h) for h in data.data.handles)

        message = bytes(range(256)) * 20  # 5120 bytes: a sequence of five commands
        sign_message(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, b"warm",
                            time.monotonic() + 30)
        before = transient()
        real_update = hashing_module.prepare_sequence_update
        calls = []

        def failing_update(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise DeadlineError("the deadline passed in the middle of the sequence")
            return real_update(*args, **kwargs)

        monkeypatch.setattr(hashing_module, "prepare_sequence_update", failing_update)
        with pytest.raises(DeadlineError):
            sign_message(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, message,
                                time.monotonic() + 30)
        assert transient() == before  # the half-done sequence was flushed
        # The TPM refuses the ticket of a sequence that hashed a message starting with
        # TPM_GENERATED_VALUE; the broker refuses it before the TPM sees anything.
        with pytest.raises(UnsupportedError, match="0xff544347"):
            sign_message(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256,
                                TPM_GENERATED + message, time.monotonic() + 30)
        assert transient() == before
        monkeypatch.undo()
        signature = sign_message(worker, info.key_id, b"", Scheme.ECDSA, Hash.SHA256, message,
                                        time.monotonic() + 30)
        public = load_der_public_key(info.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        assert transient() == before  # a completed sequence is gone from the TPM too
    finally:
        worker.close()


# --- the openssl CLI, through the provider --------------------------------------------------

KEYS = ["ec-file", "ec-handle", "ec-object", "rsa-handle", "rsa-object"]


def _pss(name: str, flag: str) -> list[str]:
    """The RSA attestation keys sign RSA-PSS only (their fixed scheme)."""
    if not name.startswith("rsa"):
        return []
    return [flag, "rsa_padding_mode:pss", flag, "rsa_pss_saltlen:digest"]


@pytest.mark.parametrize("name", KEYS)
def test_pkeyutl_sign_rawin_verified_by_the_default_provider(world: World, name: str) -> None:
    data = world.dir / f"rawin-{name}"
    with Client(world.broker.socket) as client:
        hashed = client.status()["tpm_hashed_messages"]
    for size in (10, 3000):  # TPM2_Hash, then a hash sequence
        data.write_bytes(os.urandom(size).replace(b"\xff", b"\x01"))
        sig = world.dir / f"rawin-{name}.sig"
        world.openssl("pkeyutl", "-sign", *PROV, "-rawin", "-digest", "sha256", "-inkey",
                      world.keys[name], *_pss(name, "-pkeyopt"), "-in", str(data), "-out",
                      str(sig))
        res = world.openssl("pkeyutl", "-verify", "-rawin", "-digest", "sha256", "-pubin",
                            "-inkey", str(world.pubs[name]), *_pss(name, "-pkeyopt"), "-in",
                            str(data), "-sigfile", str(sig))
        assert b"Signature Verified Successfully" in res.stdout
    with Client(world.broker.socket) as client:  # the TPM hashed both messages
        assert client.status()["tpm_hashed_messages"] == hashed + 2  # type: ignore[operator]


@pytest.mark.parametrize("name", ["ec-file", "ec-handle", "rsa-object"])
def test_refusals_through_the_cli_say_why(world: World, name: str) -> None:
    key = world.keys[name]
    digest = world.dir / "digest"
    digest.write_bytes(bytes(32))
    # A bare digest: the TPM must hash the message itself.
    res = world.openssl("pkeyutl", "-sign", *PROV, "-inkey", key, *_pss(name, "-pkeyopt"),
                        "-pkeyopt", "digest:sha256", "-in", str(digest), check=False)
    assert res.returncode != 0 and b"-rawin" in res.stderr, res.stderr
    # A message over the limit, and one that could pass for a TPM attestation.
    big = world.dir / "big"
    big.write_bytes(bytes(p.MAX_MESSAGE + 1))
    res = world.openssl("dgst", "-sha256", *PROV, "-sign", key, *_pss(name, "-sigopt"),
                        "-out", str(world.dir / "s"), str(big), check=False)
    assert res.returncode != 0 and str(p.MAX_MESSAGE).encode() in res.stderr, res.stderr
    forged = world.dir / "forged"
    forged.write_bytes(TPM_GENERATED + b"\x80\x17" + bytes(100))
    res = world.openssl("dgst", "-sha256", *PROV, "-sign", key, *_pss(name, "-sigopt"),
                        "-out", str(world.dir / "s"), str(forged), check=False)
    assert res.returncode != 0 and b"0xff544347" in res.stderr, res.stderr


def _ak_certificate(world: World, name: str) -> Path:
    cert = world.dir / f"{name}.crt"
    if not cert.exists():
        world.openssl("req", *PROV, "-new", "-x509", "-key", world.keys[name],
                      *_pss(name, "-sigopt"), "-sha256", "-subj", "/CN=localhost", "-addext",
                      "subjectAltName=IP:127.0.0.1", "-days", "1", "-out", str(cert))
    return cert


@pytest.mark.parametrize("name", KEYS)
def test_attestation_keys_sign_certificates(world: World, name: str) -> None:
    """req -x509 self-signed by the AK; x509 -req signs another key's certificate with it."""
    cert = _ak_certificate(world, name)
    res = world.openssl("verify", "-CAfile", str(cert), str(cert))
    assert b": OK" in res.stdout
    other_key = world.dir / "other.key"
    world.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-out", str(other_key))
    csr = world.dir / "other.csr"
    world.openssl("req", "-new", "-key", str(other_key), "-subj", "/CN=other", "-out", str(csr))
    other = world.dir / f"other-by-{name}.crt"
    world.openssl("x509", *PROV, "-req", "-in", str(csr), "-CA", str(cert), "-CAkey",
                  world.keys[name], *_pss(name, "-sigopt"), "-sha256", "-CAcreateserial",
                  "-days", "1", "-out", str(other))
    res = world.openssl("verify", "-CAfile", str(cert), str(other))
    assert b": OK" in res.stdout


@pytest.mark.parametrize("name", ["ec-handle", "rsa-object", "ec-file"])
def test_cms_sign_with_an_attestation_key(world: World, name: str) -> None:
    cert = _ak_certificate(world, name)
    msg = world.dir / "cms.txt"
    msg.write_text("attested\n")
    out = world.dir / f"cms-{name}.der"
    world.openssl("cms", "-sign", *PROV, "-signer", str(cert), "-inkey", world.keys[name],
                  *(["-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_pss_saltlen:digest"]
                    if name.startswith("rsa") else []),
                  "-md", "sha256", "-in", str(msg), "-binary", "-nodetach", "-outform", "DER",
                  "-out", str(out))
    res = world.openssl("cms", "-verify", "-inform", "DER", "-in", str(out), "-binary",
                        "-CAfile", str(cert), "-out", str(world.dir / "cms.out"))
    assert (world.dir / "cms.out").read_bytes() == msg.read_bytes()
    assert b"Verification successful" in res.stderr


@pytest.mark.parametrize("name", ["ec-handle", "rsa-handle", "ec-file"])
def test_tls_server_with_an_attestation_key(world: World, name: str) -> None:
    cert = _ak_certificate(world, name)
    port = free_port()
    log = world.dir / f"s_server-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([OPENSSL, "s_server", *PROV, "-accept", f"127.0.0.1:{port}",
                                 "-cert", str(cert), "-key", world.keys[name], "-www"],
                                stdout=out, stderr=subprocess.STDOUT, env=world.environ,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        # TLS 1.3 signs RSA-PSS or ECDSA: what attestation keys do. TLS 1.2 offers the
        # EC key's ECDSA too.
        for version in ("-tls1_3",) if name.startswith("rsa") else ("-tls1_3", "-tls1_2"):
            res = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", version, "-CAfile",
                 str(cert), "-verify_return_error", "-verify_ip", "127.0.0.1"],
                input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
            text = res.stdout.decode(errors="replace")
            assert res.returncode == 0, text + res.stderr.decode() + log.read_text()
            assert "Verify return code: 0 (ok)" in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Python: the cryptography key classes -----------------------------------------------------

@pytest.mark.parametrize("name", ["ec-file", "ec-handle", "rsa-handle"])
def test_cryptography_keys_sign_certificates_with_attestation_keys(world: World,
                                                                   name: str) -> None:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import utils
    from cryptography.x509.oid import NameOID

    uri = world.keys[name]
    key = tpmbroker.load_private_key(int(uri[7:], 16) if uri.startswith("handle:") else uri,
                                     socket=world.broker.socket)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(datetime.datetime(2025, 1, 1))
               .not_valid_after(datetime.datetime(2035, 1, 1)))
    if isinstance(key, rsa.RSAPrivateKey):
        cert = builder.sign(key, hashes.SHA256(), rsa_padding=pss)
    else:
        cert = builder.sign(key, hashes.SHA256())
    cert.verify_directly_issued_by(cert)  # the TPM signed the whole to-be-signed part
    digest = bytes(32)
    if name == "ec-file":
        # The file says restricted: refused here, naming why.
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        with pytest.raises(UnsupportedAlgorithm, match=r"restricted.*Prehashed"):
            key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        # A handle's attributes are the broker's to know: it refuses, naming why.
        with pytest.raises(UnsupportedError, match="restricted"):
            key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
