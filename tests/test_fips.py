"""OpenSSL's FIPS mode: the FIPS provider configured, `default_properties = fips=yes`.

The openssl CLI, nginx and Python's `cryptography` sign, decrypt and derive with TPM keys
through tpmbroker when the site declares tpmbroker's algorithms fips=yes (`fips = yes`
in its provider section, docs/provider.md, "FIPS mode"); the provider's own hashing and
its check of every returned signature come from the FIPS provider. Without the
declaration, loading a TPM key fails with a message naming the setting.

Needs the FIPS provider (Debian 13: openssl-provider-fips); skipped elsewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from . import tls_transcript
from .test_nginx import Nginx, free_port
from .tpmfixtures import Broker

OPENSSL = "openssl"
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
MODULES = Path(subprocess.run([OPENSSL, "version", "-m"], capture_output=True, text=True,
                              check=True).stdout.split('"')[1])
FIPS_MODULE = MODULES / "fips.so"

pytestmark = pytest.mark.skipif(
    not FIPS_MODULE.exists(),
    reason=f"no OpenSSL FIPS provider ({FIPS_MODULE}; Debian 13: openssl-provider-fips)")


def fips_config(directory: Path, socket: str, declared: bool) -> Path:
    """openssl.cnf for FIPS mode, as docs/provider.md shows it. The module path is
    written out so that other copies of libcrypto (cryptography's own) find it too."""
    path = directory / f"openssl-fips-{'declared' if declared else 'undeclared'}.cnf"
    path.write_text(
        "config_diagnostics = 1\n"
        "openssl_conf = openssl_init\n"
        f".include {directory / 'fipsmodule.cnf'}\n"
        f"[fips_sect]\nmodule = {FIPS_MODULE}\n"
        "[openssl_init]\nproviders = provider_sect\nalg_section = algorithm_sect\n"
        "[provider_sect]\nfips = fips_sect\nbase = base_sect\ntpmbroker = tpmbroker_sect\n"
        "[base_sect]\nactivate = 1\n"
        f"[tpmbroker_sect]\nmodule = {provider_path()}\nsocket = {socket}\n"
        + ("fips = yes\n" if declared else "")
        + "activate = 1\n"
        "[algorithm_sect]\ndefault_properties = fips=yes\n")
    return path


@dataclass
class Fips:
    broker: Broker
    dir: Path
    declared: Path  # openssl.cnf with `fips = yes` for tpmbroker
    undeclared: Path  # the same without it

    def env(self, conf: Path | None = None, **extra: str) -> dict[str, str]:
        return dict(os.environ, OPENSSL_CONF=str(conf or self.declared), **extra)

    def openssl(self, *args: str, conf: Path | None = None, check: bool = True,
                input: bytes | None = None, **extra: str) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run([OPENSSL, *args], env=self.env(conf, **extra), input=input,
                             capture_output=True, timeout=120, cwd=self.dir)
        if check:
            assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res

    def key(self, name: str, alg: str, usage: str = "sign") -> Path:
        path = self.dir / f"{name}.pem"
        if not path.exists():
            subprocess.run([TPMBROKER, "keygen", "--alg", alg, "--usage", usage, "-o",
                            str(path), "--socket", self.broker.socket], check=True,
                           timeout=120)
            self.openssl("pkey", "-in", str(path), "-pubout", "-out", f"{path}.pub")
        return path

    def file(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


@pytest.fixture
def fips(swtpm: Swtpm, world_dir: Path) -> Iterator[Fips]:
    """The FIPS module installed for this test (openssl fipsinstall) and a broker that
    nginx's workers (www-data) may use too."""
    subprocess.run([OPENSSL, "fipsinstall", "-out", str(world_dir / "fipsmodule.cnf"),
                    "-module", str(FIPS_MODULE)], check=True, capture_output=True,
                   timeout=120)
    (world_dir / "run").mkdir(mode=0o755)
    with Broker(swtpm.tcti, world_dir / "run", extra_args=(
            "--allow-uid", "root", "--allow-uid", "www-data",
            "--socket-group", "www-data", "--socket-mode", "660")) as broker:
        yield Fips(broker, world_dir, fips_config(world_dir, broker.socket, True),
                   fips_config(world_dir, broker.socket, False))


def test_the_configuration_is_fips_mode(fips: Fips) -> None:
    """What the other tests run under: MD5 refused, SHA-256 from the FIPS provider."""
    data = fips.file("data", b"fips")
    assert fips.openssl("md5", str(data), check=False).returncode != 0
    providers = fips.openssl("list", "-providers").stdout.decode()
    assert "fips" in providers and "tpmbroker" in providers


def test_openssl_signs_decrypts_and_derives(fips: Fips) -> None:
    data = fips.file("message", b"signed in FIPS mode")
    ec = fips.key("ec", "ec:P-256")
    sig = fips.dir / "ec.sig"
    res = fips.openssl("dgst", "-sha256", "-sign", str(ec), "-out", str(sig), str(data),
                       TPMBROKER_DEBUG="1")
    debug = res.stderr.decode()
    # tpmbroker hashed with the FIPS provider's SHA-256, checked the TPM's signature there
    assert re.search(r"digest \S+ from provider fips", debug), debug
    assert "from the application's FIPS providers" in debug
    assert b"Verified OK" in fips.openssl("dgst", "-sha256", "-verify", f"{ec}.pub",
                                          "-signature", str(sig), str(data)).stdout

    # RSA-PSS: FIPS 186-5 wants salt = digest length; the FIPS provider checks exactly that
    rsa = fips.key("rsa", "rsa:2048", "sign,decrypt")
    pss = fips.dir / "rsa.sig"
    pss_opts = ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
    fips.openssl("pkeyutl", "-sign", "-rawin", "-digest", "sha256", "-inkey", str(rsa),
                 *pss_opts, "-in", str(data), "-out", str(pss))
    fips.openssl("pkeyutl", "-verify", "-rawin", "-digest", "sha256", "-pubin", "-inkey",
                 f"{rsa}.pub", *pss_opts, "-in", str(data), "-sigfile", str(pss))

    # decryption: OAEP, encrypted by the FIPS provider, decrypted by the TPM
    secret = os.urandom(32)
    oaep = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"]
    ciphertext = fips.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", f"{rsa}.pub",
                              *oaep, input=secret).stdout
    assert fips.openssl("pkeyutl", "-decrypt", "-inkey", str(rsa), *oaep,
                        input=ciphertext).stdout == secret

    # ECDH: the TPM key with a software peer of the FIPS provider, both ways
    ecdh = fips.key("ecdh", "ec:P-256", "decrypt")
    peer = fips.dir / "peer.pem"
    fips.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", str(peer))
    fips.openssl("pkey", "-in", str(peer), "-pubout", "-out", f"{peer}.pub")
    ours = fips.openssl("pkeyutl", "-derive", "-inkey", str(ecdh), "-peerkey",
                        f"{peer}.pub").stdout
    theirs = fips.openssl("pkeyutl", "-derive", "-inkey", str(peer), "-peerkey",
                          f"{ecdh}.pub").stdout
    assert len(ours) == 32 and ours == theirs


def test_without_the_declaration_the_error_says_what_to_set(fips: Fips) -> None:
    data = fips.file("undeclared", b"not declared")
    ec = fips.key("ec", "ec:P-256")
    res = fips.openssl("dgst", "-sha256", "-sign", str(ec), "-out", str(fips.dir / "x.sig"),
                       str(data), conf=fips.undeclared, check=False)
    assert res.returncode != 0
    stderr = res.stderr.decode()
    assert "fips = yes" in stderr and "default_properties = fips=yes" in stderr, stderr


def test_nginx_serves_tls_with_a_tpm_key_in_fips_mode(fips: Fips) -> None:
    env = fips.env()
    key = fips.key("tls", "ec:P-256")
    cert = fips.dir / "tls.crt"
    fips.openssl("req", "-new", "-x509", "-key", str(key), "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost", "-days", "1", "-out", str(cert))
    port = free_port()
    nginx = Nginx(fips.dir, env)
    nginx.write([(port, cert, key)])
    checked = nginx.check()
    assert checked.returncode == 0, checked.stderr
    nginx.start([port])
    try:
        for tls in ("-tls1_2", "-tls1_3"):
            # the client in FIPS mode as well
            res = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", tls, "-CAfile",
                 str(cert), "-verify_return_error", "-servername", "localhost", "-msg",
                 "-ign_eof"], input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True,
                env=env, timeout=60)
            out = res.stdout.decode(errors="replace")
            assert res.returncode == 0, out + res.stderr.decode(errors="replace") + nginx.log()
            assert "tpm says hello" in out
            assert tls_transcript.signature_scheme(out) == "ecdsa_secp256r1_sha256"
    finally:
        nginx.stop()


PYTHON_SIGNS = """
import sys
from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
import tpmbroker

assert backend._fips_enabled, "cryptography is not in FIPS mode"
socket, ec_path, rsa_path, ecdh_path = sys.argv[1:]
key = tpmbroker.load_private_key(ec_path, socket=socket)
sig = key.sign(b"python", ec.ECDSA(hashes.SHA256()))
key.public_key().verify(sig, b"python", ec.ECDSA(hashes.SHA256()))
rsa = tpmbroker.load_private_key(rsa_path, socket=socket)
pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
sig = rsa.sign(b"python", pss, hashes.SHA256())
rsa.public_key().verify(sig, b"python", pss, hashes.SHA256())
oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
assert rsa.decrypt(rsa.public_key().encrypt(b"secret", oaep), oaep) == b"secret"
ecdh = tpmbroker.load_private_key(ecdh_path, socket=socket)
peer = ec.generate_private_key(ec.SECP256R1())
assert ecdh.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(ec.ECDH(), ecdh.public_key())
print("signed, decrypted and derived in FIPS mode")
"""


def test_python_cryptography_in_fips_mode(fips: Fips) -> None:
    """cryptography's own OpenSSL reads OPENSSL_CONF too: it runs in FIPS mode, and the
    TPM keys still sign, decrypt and derive through the broker."""
    keys = [fips.key("ec", "ec:P-256"), fips.key("rsa", "rsa:2048", "sign,decrypt"),
            fips.key("ecdh", "ec:P-256", "decrypt")]
    res = subprocess.run([sys.executable, "-c", PYTHON_SIGNS, fips.broker.socket,
                          *map(str, keys)], env=fips.env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "signed, decrypted and derived in FIPS mode" in res.stdout
