"""A persistent handle is a place, not a key: keys rotated at one handle by another TPM
user (tpm2-tools through tpm2-abrmd) while clients sign by that handle through the broker.

tpm2_evictcontrol takes the first free handle, so after an evict the next key lands at
the same one. A broker that kept the old key's Name would authorize the next signature
with it; the TPM would count that failed HMAC toward its dictionary-attack lockout.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tpmbroker.client import Client
from tpmbroker.errors import BadKeyError, ParentAuthFailedError, UnknownKeyError

from .test_provider import MODULE, OPENSSL, PROV
from .tpmfixtures import Abrmd, Broker

pytestmark = [
    pytest.mark.skipif(shutil.which("tpm2_evictcontrol") is None,
                       reason="tpm2-tools not installed"),
    pytest.mark.skipif(not MODULE.exists(), reason="provider not built"),
]
HANDLE = "0x81000000"
ROTATIONS = 10


class Tools:
    """tpm2-tools beside the broker, through the same tpm2-abrmd."""

    def __init__(self, abrmd: Abrmd, workdir: Path) -> None:
        self.env = dict(abrmd.env(), TPM2TOOLS_TCTI=abrmd.tcti)
        self.workdir = workdir

    def __call__(self, *args: str) -> str:
        res = subprocess.run(list(args), capture_output=True, text=True, env=self.env,
                             cwd=self.workdir, timeout=60)
        assert res.returncode == 0, f"{' '.join(args)}: {res.stderr}"
        return res.stdout

    def lockout_counter(self) -> int:
        out = self("tpm2_getcap", "properties-variable")
        match = re.search(r"TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-fA-F]+|\d+)", out)
        assert match, out
        return int(match.group(1), 0)

    def persist_new_key(self, index: int, evict_first: bool) -> bytes:
        """A new DA-protected P-256 key at HANDLE (the old one evicted first); its
        SubjectPublicKeyInfo as the TPM reports it."""
        self("tpm2_create", "-C", "prim.ctx", "-G", "ecc256", "-u", f"k{index}.pub",
             "-r", f"k{index}.priv", "-Q")
        self("tpm2_load", "-C", "prim.ctx", "-u", f"k{index}.pub", "-r", f"k{index}.priv",
             "-c", f"k{index}.ctx", "-Q")
        if evict_first:
            self("tpm2_evictcontrol", "-C", "o", "-c", HANDLE, "-Q")
        self("tpm2_evictcontrol", "-C", "o", "-c", f"k{index}.ctx", HANDLE, "-Q")
        self("tpm2_readpublic", "-c", HANDLE, "-f", "der", "-o", f"k{index}.der", "-Q")
        return (self.workdir / f"k{index}.der").read_bytes()


def test_rotating_a_handle_costs_no_lockout_count(abrmd: Abrmd, abrmd_broker: Broker,
                                                  tmp_path: Path) -> None:
    tools = Tools(abrmd, tmp_path)
    tools("tpm2_createprimary", "-C", "o", "-c", "prim.ctx", "-Q")
    publics = [tools.persist_new_key(0, evict_first=False)]
    before = tools.lockout_counter()

    signed: collections.Counter[bytes] = collections.Counter()  # SPKI -> signatures
    outcomes: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    stop = threading.Event()
    # Half the rotations happen while the signer holds still, so that its next signature
    # is the first thing the broker does with the handle after a whole evict-and-persist.
    go, idle = threading.Event(), threading.Event()
    go.set()
    digest = bytes(range(32))

    def signer() -> None:
        # One long-lived client, as a server process would be: it loads the handle once
        # and signs on, loading again only when told the key there changed.
        with Client(abrmd_broker.socket, timeout=30) as client:
            key = None
            while not stop.is_set():
                if not go.is_set():
                    idle.set()
                    go.wait(30)
                    idle.clear()
                try:
                    if key is None:
                        key = client.load_key(int(HANDLE, 16))
                    signature = client.sign(key, digest, "sha256")
                except (BadKeyError, UnknownKeyError) as exc:
                    # Evicted and not yet replaced, or replaced: said, and loaded again.
                    outcomes[type(exc).__name__] += 1
                    key = None
                    time.sleep(0.01)
                    continue
                except Exception as exc:  # every other outcome is a failure
                    unexpected.append(f"{type(exc).__name__}: {exc}")
                    key = None
                    continue
                public = serialization.load_der_public_key(key.public_key)
                assert isinstance(public, ec.EllipticCurvePublicKey)
                public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
                signed[key.public_key] += 1
                outcomes["signed"] += 1

    thread = threading.Thread(target=signer)
    thread.start()
    try:
        for index in range(1, ROTATIONS + 1):
            time.sleep(0.3)
            quiet = index % 2 == 0
            if quiet:
                go.clear()
                assert idle.wait(30)
            publics.append(tools.persist_new_key(index, evict_first=True))
            go.set()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()

    after = tools.lockout_counter()
    print(f"lockout counter before {before}, after {after}; {ROTATIONS} rotations; "
          f"outcomes {dict(outcomes)}; keys that signed {len(signed)}")
    assert before == 0
    assert after == before, abrmd_broker.log()
    assert not unexpected, unexpected
    # Every signature verified (above) with the key it was made for, and that key was
    # one of those at the handle; signing went on across the rotations.
    assert set(signed) <= set(publics)
    assert len(signed) >= ROTATIONS // 2, dict(outcomes)

    # A new client by handle (the openssl CLI) signs with the key there now.
    env = dict(os.environ, TPMBROKER_SOCKET=abrmd_broker.socket, OPENSSL_CONF=os.devnull)
    data = tmp_path / "data"
    data.write_bytes(b"after the rotations")
    res = subprocess.run([OPENSSL, "pkeyutl", "-sign", *PROV, "-inkey", f"handle:{HANDLE}",
                          "-rawin", "-digest", "sha256", "-in", str(data),
                          "-out", str(tmp_path / "sig")],
                         capture_output=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    latest = serialization.load_der_public_key(publics[-1])
    assert isinstance(latest, ec.EllipticCurvePublicKey)
    latest.verify((tmp_path / "sig").read_bytes(), data.read_bytes(),
                  ec.ECDSA(hashes.SHA256()))
    assert tools.lockout_counter() == before


def test_a_parent_rotated_at_its_handle_takes_its_own_password_at_no_lockout_count(
        abrmd: Abrmd, abrmd_broker: Broker, tmp_path: Path) -> None:
    """The parent's place is a handle too: a parent replaced there by another TPM user is
    a new parent, with its own Name and password. A broker that authorized the load with
    the old parent's Name would make the TPM count a failure, and then remember the new
    parent's right password as refused."""
    tools = Tools(abrmd, tmp_path)
    parent = "0x81000010"
    digest = bytes(range(32))

    def parent_and_key(index: int, curve: str, password: str) -> Path:
        # Primaries from one template are one key whatever their password: another curve
        # makes another parent, with another Name.
        tools("tpm2_createprimary", "-C", "o", "-G", curve, "-p", password,
              "-c", f"parent{index}.ctx", "-Q")
        tools("tpm2_evictcontrol", "-C", "o", "-c", f"parent{index}.ctx", parent, "-Q")
        tools("tpm2_flushcontext", "-t")
        tools("tpm2_create", "-C", parent, "-P", password, "-G", "ecc256",
              "-u", f"k{index}.pub", "-r", f"k{index}.priv", "-Q")
        tools("tpm2_encodeobject", "-C", parent, "-P", password, "-u", f"k{index}.pub",
              "-r", f"k{index}.priv", "-o", f"k{index}.pem")
        return tmp_path / f"k{index}.pem"

    def signs(client: Client, key_file: Path, password: str) -> None:
        key = client.load_key(key_file, parent_auth=password)
        public = serialization.load_der_public_key(key.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(client.sign(key, digest, "sha256"), digest,
                      ec.ECDSA(Prehashed(hashes.SHA256())))

    first = parent_and_key(1, "ecc256", "first parent")
    before = tools.lockout_counter()
    with Client(abrmd_broker.socket, timeout=30) as client:
        signs(client, first, "first parent")
        tools("tpm2_evictcontrol", "-C", "o", "-c", parent, "-Q")
        second = parent_and_key(2, "ecc384", "second parent")
        signs(client, second, "second parent")
        assert tools.lockout_counter() == before, abrmd_broker.log()
        # The first parent's password was good at this handle, but it is not the
        # second parent's: tried as any password not known good, and refused.
    with Client(abrmd_broker.socket, timeout=30) as client, \
            pytest.raises(ParentAuthFailedError, match="wrong password"):
        client.load_key(second, parent_auth="first parent")
    assert tools.lockout_counter() == before + 1, abrmd_broker.log()
