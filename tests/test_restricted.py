"""Restricted signing keys (attestation keys from `tpm2_createak`) sign through the broker:
the TPM hashes the message (SIGN_MESSAGE) and signs with the ticket, for the Python
client and for the openssl CLI through the provider, keys by file, handle: and object:.

One swtpm, tpm2-abrmd, the keys and the broker serve the whole module: making the keys
with tpm2-tools is most of the time.
"""

from __future__ import annotations

import dataclasses
import os
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
from tpmbroker import ops
from tpmbroker import protocol as p
from tpmbroker.client import Client, LoadedKey
from tpmbroker.errors import DeadlineError, UnsupportedError
from tpmbroker.protocol import Hash, KeySource, Scheme
from tpmbroker.simulator import Swtpm
from tpmbroker.tpm.keys import storage_parent_template, tss2_key_der

from .tpmfixtures import Abrmd, Broker, DbusDaemon, have, running_swtpm

pytestmark = pytest.mark.skipif(not have("tpm2_createak"), reason="tpm2-tools not installed")

OPENSSL = "openssl"
EC_HANDLE = "0x81010010"
RSA_HANDLE = "0x81010011"
SRK_HANDLE = "0x81000001"
TPM_GENERATED = b"\xffTCG"


@dataclasses.dataclass
class World:
    dir: Path
    broker: Broker
    keys: dict[str, str]  # name -> what openssl and the Python client are given
    pubs: dict[str, Path]  # name -> public key PEM
    tcti: str
    env: dict[str, str]

    def openssl(self, *args: str, check: bool = True,
                stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run([OPENSSL, *args], capture_output=True, env=self.penv,
                             input=stdin, timeout=120, cwd=self.dir)
        if check:
            assert res.returncode == 0, (args, res.stderr.decode(), self.broker.log()[-3000:])
        return res

    @property
    def penv(self) -> dict[str, str]:
        return dict(self.env, TPMBROKER_SOCKET=self.broker.socket)


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
                }, {}, rm.tcti, dict(os.environ, **rm.env()))
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
            client._call(ops.SignMessage(key.key_id, p.Scheme.ECDSA, p.Hash.SHA256,
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
    from tpmbroker.tpm import command as command_module

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
        info = worker.load_key(KeySource.TSS2_DER, der, time.monotonic() + 30)

        def transient() -> list[int]:
            _, data = worker.link.ectx.get_capability(TPM2_CAP.HANDLES, 0x80000000, 16)
            return sorted(int(h) for h in data.data.handles)

        message = bytes(range(256)) * 20  # 5120 bytes: a sequence of five commands
        worker.sign_message(info.key_id, b"", Scheme.ECDSA, Hash.SHA256, b"warm",
                            time.monotonic() + 30)
        before = transient()
        real_update = command_module.prepare_sequence_update
        calls = []

        def failing_update(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise DeadlineError("the deadline passed in the middle of the sequence")
            return real_update(*args, **kwargs)

        monkeypatch.setattr(command_module, "prepare_sequence_update", failing_update)
        with pytest.raises(DeadlineError):
            worker.sign_message(info.key_id, b"", Scheme.ECDSA, Hash.SHA256, message,
                                time.monotonic() + 30)
        assert transient() == before  # the half-done sequence was flushed
        # The TPM refuses the ticket of a sequence that hashed a message starting with
        # TPM_GENERATED_VALUE; the broker refuses it before the TPM sees anything.
        with pytest.raises(UnsupportedError, match="0xff544347"):
            worker.sign_message(info.key_id, b"", Scheme.ECDSA, Hash.SHA256,
                                TPM_GENERATED + message, time.monotonic() + 30)
        assert transient() == before
        monkeypatch.undo()
        signature = worker.sign_message(info.key_id, b"", Scheme.ECDSA, Hash.SHA256, message,
                                        time.monotonic() + 30)
        public = load_der_public_key(info.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        assert transient() == before  # a completed sequence is gone from the TPM too
    finally:
        worker.close()
