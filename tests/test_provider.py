"""The OpenSSL provider end to end: real swtpm, real `tpmbroker serve`, the real openssl CLI.

Every signature made through tpmbroker.so is checked by OpenSSL's default provider alone
(no -provider arguments on the verifying side).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tpmbroker.paths import provider_path
from tpmbroker.simulator import Swtpm

from . import tls_transcript
from .tpmfixtures import Broker, BrokerEnv, raise_max_tries, running_swtpm

ROOT = Path(__file__).resolve().parent.parent
MODULE = provider_path()
MODDIR = str(MODULE.parent)
TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")
OPENSSL = shutil.which("openssl") or "openssl"
# the order openssl.cnf.example and docs/provider.md recommend
PROV = ["-provider-path", MODDIR, "-provider", "default", "-provider", "tpmbroker"]

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")


class Env(BrokerEnv):
    def __init__(self, tpm: Swtpm, broker: Broker, base: Path) -> None:
        super().__init__(broker, base)
        self.tpm = tpm
        self.keys: dict[str, Path] = {}

    def pubkey(self, name: str) -> Path:
        pub = self.dir / f"{name}.pub"
        if not pub.exists():
            self.openssl("pkey", *PROV, "-in", str(self.keys[name]), "-pubout", "-out", str(pub))
        return pub


def keygen(broker: Broker, alg: str, out: Path, *extra: str) -> Path:
    subprocess.run([TPMBROKER, "keygen", "--alg", alg, "-o", str(out), "--socket", broker.socket,
                    *extra], check=True, capture_output=True, timeout=180)
    return out


KEYS = {"ec256": "ec:P-256", "ec384": "ec:P-384", "rsa2048": "rsa:2048", "rsa3072": "rsa:3072"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One TPM and one broker for the module; keys made once by `tpmbroker keygen`."""
    base = tmp_path_factory.mktemp("provider")
    with running_swtpm(base / "tpm") as tpm:
        raise_max_tries(tpm)  # the password tests try two wrong ones
        broker = Broker(tpm.tcti, base / "broker").start()
        try:
            e = Env(tpm, broker, base)
            for name, alg in KEYS.items():
                e.keys[name] = keygen(broker, alg, base / f"{name}.pem")
            yield e
        finally:
            broker.stop()


def is_rsa(name: str) -> bool:
    return name.startswith("rsa")


# --- the module itself -----------------------------------------------------------------------

def test_module_exports_only_the_entry_point_and_no_python() -> None:
    defined = subprocess.run(["nm", "-D", "--defined-only", str(MODULE)], capture_output=True,
                             text=True, check=True).stdout
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(MODULE)],
                               capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in defined.splitlines() if " T " in line}
    assert exported == {"OSSL_provider_init"}
    assert not [s for s in undefined.split() if s.startswith("Py")]
    needed = subprocess.run(["readelf", "-d", str(MODULE)], capture_output=True, text=True,
                            check=True).stdout
    assert "libpython" not in needed


def test_loading_the_provider_does_no_io(tmp_path: Path) -> None:
    """Provider init must not connect: a missing broker only matters when a key is used."""
    env = dict(os.environ, TPMBROKER_SOCKET=str(tmp_path / "nothing.sock"))
    res = subprocess.run([OPENSSL, "list", "-providers", *PROV], capture_output=True,
                         text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    block = res.stdout.split("\n  tpmbroker\n", 1)[1].split("\n  default", 1)[0]
    assert "name: tpmbroker" in block and "version: 0.1.0" in block
    assert "status: active" in block


# --- signing with every key type -------------------------------------------------------------

@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("md", ["sha256", "sha384", "sha512"])
def test_dgst_sign(env: Env, name: str, md: str) -> None:
    data = env.dir / "data.bin"
    data.write_bytes(os.urandom(3000))
    sig = env.dir / f"{name}-{md}.sig"
    env.openssl("dgst", f"-{md}", *PROV, "-sign", str(env.keys[name]), "-out", str(sig),
                str(data))
    res = env.openssl("dgst", f"-{md}", "-verify", str(env.pubkey(name)), "-signature",
                      str(sig), str(data))
    assert b"Verified OK" in res.stdout


@pytest.mark.parametrize("name", ["rsa2048", "rsa3072"])
@pytest.mark.parametrize("saltlen", ["digest", "max", "auto"])
def test_dgst_sign_rsa_pss(env: Env, name: str, saltlen: str) -> None:
    data = env.dir / "pss.bin"
    data.write_bytes(os.urandom(100))
    sig = env.dir / f"{name}-pss.sig"
    env.openssl("dgst", "-sha256", *PROV, "-sign", str(env.keys[name]), "-sigopt",
                "rsa_padding_mode:pss", "-sigopt", f"rsa_pss_saltlen:{saltlen}", "-out", str(sig),
                str(data))
    res = env.openssl("dgst", "-sha256", "-verify", str(env.pubkey(name)), "-sigopt",
                      "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest", "-signature",
                      str(sig), str(data))
    assert b"Verified OK" in res.stdout


def test_pss_salt_length_the_tpm_cannot_do_is_refused_clearly(env: Env) -> None:
    data = env.dir / "pss.bin"
    data.write_bytes(b"x")
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(env.keys["rsa2048"]), "-sigopt",
                      "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:20", "-out",
                      str(env.dir / "x.sig"), str(data), check=False)
    assert res.returncode != 0
    assert b"salt length" in res.stderr and b"digest" in res.stderr


@pytest.mark.parametrize("name", list(KEYS))
def test_pkeyutl_sign_a_digest(env: Env, name: str) -> None:
    data = env.dir / "pk.bin"
    data.write_bytes(os.urandom(500))
    digest = env.dir / "pk.dgst"
    env.openssl("dgst", "-sha256", "-binary", "-out", str(digest), str(data))
    sig = env.dir / f"{name}-pk.sig"
    opts = ["-pkeyopt", "digest:sha256"] if is_rsa(name) else []
    env.openssl("pkeyutl", *PROV, "-sign", "-inkey", str(env.keys[name]), *opts, "-in",
                str(digest), "-out", str(sig))
    res = env.openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(env.pubkey(name)), *opts,
                      "-in", str(digest), "-sigfile", str(sig))
    assert b"Signature Verified Successfully" in res.stdout


@pytest.mark.parametrize("name", list(KEYS))
def test_pkeyutl_sign_rawin(env: Env, name: str) -> None:
    data = env.dir / "raw.bin"
    data.write_bytes(os.urandom(500))
    sig = env.dir / f"{name}-raw.sig"
    env.openssl("pkeyutl", *PROV, "-sign", "-rawin", "-digest", "sha384", "-inkey",
                str(env.keys[name]), "-in", str(data), "-out", str(sig))
    res = env.openssl("pkeyutl", "-verify", "-rawin", "-digest", "sha384", "-pubin", "-inkey",
                      str(env.pubkey(name)), "-in", str(data), "-sigfile", str(sig))
    assert b"Signature Verified Successfully" in res.stdout


def test_rsa_pkeyutl_without_a_digest_name_is_refused_clearly(env: Env) -> None:
    digest = env.dir / "d32"
    digest.write_bytes(os.urandom(32))
    res = env.openssl("pkeyutl", *PROV, "-sign", "-inkey", str(env.keys["rsa2048"]), "-in",
                      str(digest), "-out", str(env.dir / "x.sig"), check=False)
    assert res.returncode != 0
    assert b"digest:sha256" in res.stderr


@pytest.mark.parametrize("name", ["ec256", "rsa2048"])
def test_key_file_round_trips_and_prints(env: Env, name: str) -> None:
    pem = env.openssl("pkey", *PROV, "-in", str(env.keys[name])).stdout
    assert pem == env.keys[name].read_bytes()
    der = env.dir / f"{name}.der"
    env.openssl("pkey", *PROV, "-in", str(env.keys[name]), "-outform", "DER", "-out", str(der))
    data = env.dir / "der.bin"
    data.write_bytes(b"der")
    env.openssl("dgst", "-sha256", *PROV, "-sign", str(der), "-keyform", "DER", "-out",
                str(env.dir / "der.sig"), str(data))
    assert b"Verified OK" in env.openssl("dgst", "-sha256", "-verify", str(env.pubkey(name)),
                                         "-signature", str(env.dir / "der.sig"),
                                         str(data)).stdout
    text = env.openssl("pkey", *PROV, "-in", str(env.keys[name]), "-text", "-noout").stdout
    assert b"the private part stays in the TPM" in text
    assert (b"Modulus:" if is_rsa(name) else b"pub:") in text
    assert b"TPM parent: 0x40000001 (the storage primary from the TCG template)" in text
    attributes = next(line for line in text.splitlines() if line.startswith(b"TPM attributes:"))
    # keygen makes keys that sign and decrypt unless told otherwise, as tpm2-openssl does
    assert set(attributes.split()[-1].split(b"|")) >= {
        b"fixedtpm", b"fixedparent", b"sensitivedataorigin", b"userwithauth", b"sign",
        b"decrypt"}
    assert b"TPM password: none (emptyAuth)" in text


def test_text_says_a_key_needs_its_password(env: Env) -> None:
    (env.dir / "text-pw.txt").write_text("pw\n")
    key = keygen(env.broker, "ec:P-256", env.dir / "text-pw.pem", "--password-file",
                 str(env.dir / "text-pw.txt"))
    text = env.openssl("pkey", *PROV, "-in", str(key), "-passin", "pass:pw", "-text",
                       "-noout").stdout
    assert b"TPM password: needed; each wrong one counts toward the TPM's lockout" in text
    assert b"noda" not in text


def test_key_file_decodes_without_the_broker(env: Env, tmp_path: Path) -> None:
    """The public key is in the file: pkey -pubout (and nginx -t) need no running broker."""
    res = env.openssl("pkey", *PROV, "-in", str(env.keys["ec256"]), "-pubout",
                      env=dict(os.environ, TPMBROKER_SOCKET=str(tmp_path / "none.sock")))
    assert res.stdout == env.pubkey("ec256").read_bytes()


# --- X.509 and CMS ---------------------------------------------------------------------------

ALG_IDS = {
    # FACTS.md: the AlgorithmIdentifier DER OpenSSL needs from the signer
    ("ec256", "sha256", ""): "300a06082a8648ce3d040302",
    ("rsa2048", "sha256", ""): "300d06092a864886f70d01010b0500",
    ("rsa2048", "sha256", "pss"): "304106092a864886f70d01010a3034a00f300d0609608648016503040201"
                                  "0500a11c301a06092a864886f70d010108300d0609608648016503040201"
                                  "0500a203020120",
}


@pytest.mark.parametrize("name,md,pad", [
    ("ec256", "sha256", ""), ("ec384", "sha384", ""), ("rsa2048", "sha256", ""),
    ("rsa2048", "sha256", "pss"), ("rsa2048", "sha512", "pss"), ("rsa3072", "sha384", ""),
])
def test_req_new_x509_self_signed(env: Env, name: str, md: str, pad: str) -> None:
    cert = env.dir / f"{name}-{md}-{pad}.crt"
    sigopt = ["-sigopt", "rsa_padding_mode:pss"] if pad else []
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys[name]), f"-{md}", *sigopt,
                "-subj", f"/CN={name}", "-days", "1", "-out", str(cert))
    # -check_ss_sig: a self-signed root's own signature is otherwise not checked
    res = env.openssl("verify", "-check_ss_sig", "-CAfile", str(cert), str(cert))
    assert b": OK" in res.stdout
    expected = ALG_IDS.get((name, md, pad))
    if expected:
        der = env.openssl("x509", "-in", str(cert), "-outform", "DER").stdout
        assert bytes.fromhex(expected) in der


def test_ca_in_the_tpm_signs_a_csr(env: Env) -> None:
    d = env.dir
    ca = d / "ca.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys["ec384"]), "-sha384",
                "-subj", "/CN=TPM CA", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca))
    # the leaf's key is an ordinary software key; its CSR is signed by a TPM key below
    env.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                str(d / "leaf.key"))
    env.openssl("req", "-new", "-key", str(d / "leaf.key"), "-subj", "/CN=leaf", "-out",
                str(d / "leaf.csr"))
    env.openssl("x509", *PROV, "-req", "-in", str(d / "leaf.csr"), "-CA", str(ca), "-CAkey",
                str(env.keys["ec384"]), "-CAcreateserial", "-days", "1", "-sha384", "-out",
                str(d / "leaf.crt"))
    res = env.openssl("verify", "-CAfile", str(ca), str(d / "leaf.crt"))
    assert b"leaf.crt: OK" in res.stdout
    # and an RSA CA key issuing with PSS
    rca = d / "rca.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys["rsa2048"]), "-subj",
                "/CN=TPM RSA CA", "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
                "-out", str(rca))
    env.openssl("x509", *PROV, "-req", "-in", str(d / "leaf.csr"), "-CA", str(rca), "-CAkey",
                str(env.keys["rsa2048"]), "-CAcreateserial", "-days", "1", "-sigopt",
                "rsa_padding_mode:pss", "-out", str(d / "leaf2.crt"))
    res = env.openssl("verify", "-CAfile", str(rca), str(d / "leaf2.crt"))
    assert b"leaf2.crt: OK" in res.stdout


@pytest.mark.parametrize("name", ["ec256", "rsa2048"])
def test_cms_sign(env: Env, name: str) -> None:
    d = env.dir
    cert = d / f"cms-{name}.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys[name]), "-subj",
                f"/CN=cms {name}", "-days", "1", "-out", str(cert))
    msg = d / "cms.txt"
    msg.write_text("signed through the broker\n")
    env.openssl("cms", "-sign", *PROV, "-signer", str(cert), "-inkey", str(env.keys[name]),
                "-in", str(msg), "-binary", "-nodetach", "-outform", "DER", "-out",
                str(d / "cms.der"))
    res = env.openssl("cms", "-verify", "-inform", "DER", "-in", str(d / "cms.der"), "-binary",
                      "-CAfile", str(cert), "-out", str(d / "cms.out"))
    assert (d / "cms.out").read_bytes() == msg.read_bytes()
    assert b"Verification successful" in res.stderr


# --- TLS -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s_server(env: Env, cert: Path, key: Path, port: int,
             prov: list[str] = PROV) -> Iterator[subprocess.Popen[bytes]]:
    log_path = env.dir / f"s_server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([OPENSSL, "s_server", *prov, "-accept", f"127.0.0.1:{port}",
                                 "-cert", str(cert), "-key", str(key), "-www"],
                                stdout=log, stderr=subprocess.STDOUT, env=env.environ,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(log_path.read_text())
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.parametrize("name", ["ec256", "ec384", "rsa2048"])
def test_tls_server_key_in_the_tpm(env: Env, name: str) -> None:
    cert = env.dir / f"tls-{name}.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys[name]), "-subj",
                "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
                "-out", str(cert))
    port = free_port()
    with s_server(env, cert, env.keys[name], port):
        for version in ("-tls1_2", "-tls1_3"):
            res = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", version, "-CAfile",
                 str(cert), "-verify_return_error", "-verify_ip", "127.0.0.1"],
                input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
            out = res.stdout.decode(errors="replace")
            assert res.returncode == 0, out + res.stderr.decode(errors="replace")
            assert "Verify return code: 0 (ok)" in out
            assert ("TLSv1.3" if version == "-tls1_3" else "TLSv1.2") in out
        if is_rsa(name):
            # TLS 1.3 with RSA signs RSA-PSS; TLS 1.2 forced to PSS as well
            res = subprocess.run(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-sigalgs",
                 "RSA-PSS+SHA256", "-CAfile", str(cert), "-verify_return_error", "-msg"],
                input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
            out = res.stdout.decode(errors="replace")
            assert res.returncode == 0, out
            assert tls_transcript.signature_scheme(out) == "rsa_pss_rsae_sha256"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_against_s_server(env: Env) -> None:
    cert = env.dir / "curl.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys["ec256"]), "-subj",
                "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-days", "1", "-out", str(cert))
    port = free_port()
    with s_server(env, cert, env.keys["ec256"], port):
        res = subprocess.run(["curl", "-sS", "--cacert", str(cert), f"https://127.0.0.1:{port}/"],
                             capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert b"s_server" in res.stdout or b"Ciphers" in res.stdout


# --- provider order --------------------------------------------------------------------------

@pytest.mark.parametrize("order", [["tpmbroker", "default"], ["default", "tpmbroker"]])
def test_both_provider_orders_sign(env: Env, order: list[str]) -> None:
    prov = ["-provider-path", MODDIR, "-provider", order[0], "-provider", order[1]]
    data = env.dir / "order.bin"
    data.write_bytes(b"order")
    for name in ("ec256", "rsa2048"):
        sig = env.dir / f"order-{name}.sig"
        env.openssl("dgst", "-sha256", *prov, "-sign", str(env.keys[name]), "-out", str(sig),
                    str(data))
        res = env.openssl("dgst", "-sha256", "-verify", str(env.pubkey(name)), "-signature",
                          str(sig), str(data))
        assert b"Verified OK" in res.stdout
        cert = env.dir / f"order-{name}.crt"
        env.openssl("req", *prov, "-new", "-x509", "-key", str(env.keys[name]), "-subj",
                    "/CN=order", "-days", "1", "-out", str(cert))
        assert b"OK" in env.openssl("verify", "-check_ss_sig", "-CAfile", str(cert),
                                    str(cert)).stdout


@pytest.mark.parametrize("order", [["tpmbroker", "default"], ["default", "tpmbroker"]])
@pytest.mark.parametrize("name", ["ec256", "ec384", "rsa2048"])
def test_tls_in_either_provider_order(env: Env, order: list[str], name: str) -> None:
    """TLS 1.2 ECDHE with an ECDSA key needs EC groups: tpmbroker announces its own."""
    cert = env.dir / f"order-tls-{name}.crt"
    env.openssl("req", *PROV, "-new", "-x509", "-key", str(env.keys[name]), "-subj",
                "/CN=localhost", "-days", "1", "-out", str(cert))
    port = free_port()
    prov = ["-provider-path", MODDIR, "-provider", order[0], "-provider", order[1]]
    with s_server(env, cert, env.keys[name], port, prov):
        curve = "P-384" if name == "ec384" else "P-256"
        # TLS 1.2 ECDSA needs the certificate's curve among the client's groups
        for version in ("-tls1_2", "-tls1_3"):
            for group in (curve, f"X25519:{curve}"):
                res = subprocess.run(
                    [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", version, "-groups",
                     group, "-CAfile", str(cert), "-verify_return_error", "-msg"],
                    input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
                out = res.stdout.decode(errors="replace")
                assert res.returncode == 0, (version, group, out)
                assert "Verify return code: 0 (ok)" in out
                if group == curve:
                    named = {"P-256": "secp256r1", "P-384": "secp384r1"}[curve]
                    assert tls_transcript.key_exchange_group(out) == named, out


# --- key generation through the provider ----------------------------------------------------

GEN_PROV = ["-provider-path", MODDIR, "-provider", "tpmbroker", "-provider", "default"]


@pytest.mark.parametrize("alg,opts", [
    ("EC", ["-pkeyopt", "group:P-256"]),
    ("EC", ["-pkeyopt", "group:P-384"]),
    ("RSA", ["-pkeyopt", "bits:2048"]),
])
def test_genpkey_writes_a_tss2_key_that_signs(env: Env, alg: str, opts: list[str]) -> None:
    key = env.dir / f"gen-{alg}-{opts[-1].split(':')[1]}.pem"
    env.openssl("genpkey", *GEN_PROV, "-algorithm", alg, *opts, "-out", str(key))
    assert key.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    env.keys[key.stem] = key
    data = env.dir / "gen.bin"
    data.write_bytes(b"generated")
    env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-out", str(env.dir / "gen.sig"),
                str(data))
    res = env.openssl("dgst", "-sha256", "-verify", str(env.pubkey(key.stem)), "-signature",
                      str(env.dir / "gen.sig"), str(data))
    assert b"Verified OK" in res.stdout


def test_genpkey_with_default_first_and_propquery(env: Env) -> None:
    key = env.dir / "gen-propq.pem"
    env.openssl("genpkey", *PROV, "-propquery", "provider=tpmbroker", "-algorithm", "EC",
                "-pkeyopt", "group:P-256", "-out", str(key))
    assert key.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")


def test_genpkey_paramfile(env: Env) -> None:
    params = env.dir / "p384.param"
    env.openssl("ecparam", "-name", "secp384r1", "-out", str(params))
    key = env.dir / "gen-paramfile.pem"
    env.openssl("genpkey", *GEN_PROV, "-paramfile", str(params), "-out", str(key))
    text = env.openssl("pkey", *PROV, "-in", str(key), "-pubout", "-text", "-noout").stdout
    assert b"384 bit" in text


def test_req_newkey(env: Env) -> None:
    key = env.dir / "newkey.pem"
    csr = env.dir / "newkey.csr"
    env.openssl("req", *GEN_PROV, "-newkey", "ec", "-pkeyopt", "group:P-256", "-keyout",
                str(key), "-nodes", "-subj", "/CN=newkey", "-out", str(csr))
    assert key.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    # `req -verify` reports on stderr in 3.0 and on stdout in 3.5: check the signature itself
    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert request.is_signature_valid


def test_unsupported_generation_parameters_are_refused_clearly(env: Env) -> None:
    res = env.openssl("genpkey", *GEN_PROV, "-algorithm", "EC", "-pkeyopt",
                      "group:brainpoolP256r1", "-out", str(env.dir / "x.pem"), check=False)
    assert res.returncode != 0 and b"P-192, P-224, P-256, P-384 and P-521" in res.stderr
    # sizes are the TPM's to refuse (tests/test_algorithms.py has more)
    res = env.openssl("genpkey", *GEN_PROV, "-algorithm", "RSA", "-pkeyopt", "bits:1536",
                      "-out", str(env.dir / "x.pem"), check=False)
    assert res.returncode != 0 and b"no RSA-1536 (TPM2_TestParms: TPM_RC_VALUE)" in res.stderr


# --- passwords -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["keygen", "genpkey"])
def test_password_protected_key(env: Env, how: str) -> None:
    key = env.dir / f"pw-{how}.pem"
    if how == "keygen":
        pwfile = env.dir / "pw.txt"
        pwfile.write_text("s3cret\n")
        keygen(env.broker, "ec:P-256", key, "--password-file", str(pwfile))
    else:
        env.openssl("genpkey", *GEN_PROV, "-algorithm", "EC", "-pkeyopt", "group:P-256",
                    "-pkeyopt", "user-auth:s3cret", "-out", str(key))
    data = env.dir / "pw.bin"
    data.write_bytes(b"password")
    sig = env.dir / "pw.sig"
    env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-passin", "pass:s3cret", "-out",
                str(sig), str(data))
    pub = env.dir / f"pw-{how}.pub"
    env.openssl("pkey", *PROV, "-in", str(key), "-passin", "pass:s3cret", "-pubout", "-out",
                str(pub))
    assert b"Verified OK" in env.openssl("dgst", "-sha256", "-verify", str(pub), "-signature",
                                         str(sig), str(data)).stdout
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-passin", "pass:wrong",
                      "-out", str(sig), str(data), check=False)
    assert res.returncode != 0
    assert b"wrong TPM key password" in res.stderr and b"-passin" in res.stderr


# --- many threads, forked children, a broker that goes away ---------------------------------

@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("loadgen") / "provider_loadgen"
    subprocess.run(["gcc", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(ROOT / "benchmarks" / "loadgen.c"), "-lcrypto",
                    "-lpthread"],
                   check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("name", ["ec256", "rsa2048"])
def test_64_threads_and_8_forked_children_through_one_key(env: Env, loadgen: Path,
                                                          name: str) -> None:
    iters = "6" if name == "ec256" else "2"
    res = subprocess.run([str(loadgen), "stress", MODDIR, str(env.keys[name]),
                          str(env.pubkey(name)), "64", iters, "8", "8"],
                         capture_output=True, text=True, env=env.environ, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr + env.broker.log()
    lines = [line for line in res.stdout.splitlines() if line.startswith("pid ")]
    assert len(lines) == 9
    assert all(" failed 0 bad 0" in line for line in lines)


def test_broker_down_fails_after_the_restart_grace_and_recovers_in_the_same_process(
        swtpm: Swtpm, tmp_path: Path, loadgen: Path) -> None:
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        key = keygen(broker, "ec:P-256", tmp_path / "k.pem")
        pub = tmp_path / "k.pub"
        penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
        subprocess.run([OPENSSL, "pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub)],
                       check=True, env=penv, capture_output=True)
        proc = subprocess.Popen([str(loadgen), "outage", MODDIR, str(key), str(pub)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=penv)
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "first ok"
        assert proc.stdout.readline().startswith("stop the broker")
        broker.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        down = proc.stdout.readline()
        assert down.startswith("down fail"), down
        elapsed_ms = int(down.split()[2])
        # A broker the process reached is waited for RESTART_GRACE_MS (3 s, a restart's
        # gap), no longer: then the error, naming the socket.
        assert 3000 <= elapsed_ms < 4500, down
        assert broker.socket in down and "tpmbroker serve" in down, down
        assert proc.stdout.readline().startswith("start the broker")
        broker.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        up = proc.stdout.readline()
        assert up.startswith("up ok"), up + proc.stderr.read() if proc.stderr else up
        assert proc.wait(timeout=30) == 0
    finally:
        broker.stop()


def test_no_broker_is_an_immediate_error_naming_the_socket(env: Env, tmp_path: Path) -> None:
    sock = str(tmp_path / "missing.sock")
    data = tmp_path / "d"
    data.write_bytes(b"x")
    t0 = time.monotonic()
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(env.keys["ec256"]), "-out",
                      str(tmp_path / "s"), str(data), check=False,
                      env=dict(os.environ, TPMBROKER_SOCKET=sock))
    assert time.monotonic() - t0 < 5
    assert res.returncode != 0
    assert sock.encode() in res.stderr and b"tpmbroker serve" in res.stderr


def test_socket_from_the_config_file(env: Env, tmp_path: Path) -> None:
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text((ROOT / "openssl.cnf.example").read_text()
                   .replace("/usr/lib/x86_64-linux-gnu/ossl-modules/tpmbroker.so", str(MODULE))
                   .replace("/run/tpmbroker/tpmbroker.sock", env.broker.socket))
    data = tmp_path / "d"
    data.write_bytes(b"cnf")
    penv = dict(os.environ, OPENSSL_CONF=str(cnf))
    penv.pop("TPMBROKER_SOCKET", None)
    env.openssl("dgst", "-sha256", "-sign", str(env.keys["ec256"]), "-out", str(tmp_path / "s"),
                str(data), env=penv)
    assert b"Verified OK" in env.openssl("dgst", "-sha256", "-verify", str(env.pubkey("ec256")),
                                         "-signature", str(tmp_path / "s"), str(data)).stdout


# --- keys made by tpm2-openssl ---------------------------------------------------------------

TPM2_OPENSSL = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
TPM2_KINDS = {
    "ec": ["-algorithm", "EC", "-pkeyopt", "group:P-256"],
    "ecpw": ["-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "user-auth:abc"],
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "bits:2048"],
    # under a persistent storage parent, as many deployments have at 0x81000001
    "ec-persistent-parent": ["-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                             "parent:0x81000001"],
}


def sign_tpm2_openssl_keys(swtpm: Swtpm, tmp_path: Path, order: list[str]) -> None:
    """Make keys with tpm2-openssl, then sign each, in `order`, through tpmbroker."""
    # swtpm serves one TCP client at a time: tpm2-openssl first, then the broker
    tenv = dict(os.environ, TPM2OPENSSL_TCTI=swtpm.tcti, TPM2TOOLS_TCTI=swtpm.tcti)
    for cmd in (["tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", "srk.ctx", "-Q"],
                ["tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", "0x81000001"],
                ["tpm2_flushcontext", "-t"]):
        subprocess.run(cmd, check=True, capture_output=True, env=tenv, cwd=tmp_path, timeout=60)
    made = {}
    for name in order:
        key = tmp_path / f"tpm2-{name}.pem"
        subprocess.run([OPENSSL, "genpkey", "-provider", "tpm2", "-provider", "base",
                        *TPM2_KINDS[name], "-out", str(key)], check=True, capture_output=True,
                       env=tenv, timeout=120)
        assert key.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
        made[name] = key
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
        data = tmp_path / "d"
        data.write_bytes(b"tpm2-openssl")
        for name, key in made.items():
            pw = ["-passin", "pass:abc"] if name == "ecpw" else []
            pub = tmp_path / f"{name}.pub"
            subprocess.run([OPENSSL, "pkey", *PROV, "-in", str(key), *pw, "-pubout", "-out",
                            str(pub)], check=True, capture_output=True, env=penv)
            res = subprocess.run([OPENSSL, "dgst", "-sha256", *PROV, "-sign", str(key), *pw,
                                  "-out", str(tmp_path / "s"), str(data)], capture_output=True,
                                 env=penv)
            assert res.returncode == 0, (name, res.stderr, broker.log())
            res = subprocess.run([OPENSSL, "dgst", "-sha256", "-verify", str(pub), "-signature",
                                  str(tmp_path / "s"), str(data)], capture_output=True)
            assert b"Verified OK" in res.stdout, (name, res.stderr, broker.log())
    finally:
        broker.stop()


needs_tpm2_openssl = pytest.mark.skipif(
    not TPM2_OPENSSL.exists() or shutil.which("tpm2_evictcontrol") is None,
    reason="tpm2-openssl or tpm2-tools not installed")


@needs_tpm2_openssl
def test_keys_generated_by_tpm2_openssl_sign_through_tpmbroker(swtpm: Swtpm,
                                                               tmp_path: Path) -> None:
    sign_tpm2_openssl_keys(swtpm, tmp_path, ["ec-persistent-parent", "ec", "ecpw", "rsa"])


@needs_tpm2_openssl
def test_persistent_parent_key_after_an_rsa_primary(swtpm: Swtpm, tmp_path: Path) -> None:
    """Loading under a persistent parent needs two free object slots (the TPM brings the
    parent in too): with both storage primaries resident, the broker must evict one."""
    sign_tpm2_openssl_keys(swtpm, tmp_path, ["rsa", "ec", "ec-persistent-parent"])


# --- persistent keys by handle ---------------------------------------------------------------

def persist_with_tools(swtpm: Swtpm, workdir: Path, handle: str, *create: str) -> Path:
    """tpm2-tools make an ECC key (`create`: extra tpm2_create options) and persist it at
    `handle` before the broker owns the TPM (one swtpm client); returns the serialized
    handle file `tpm2_evictcontrol -o` wrote."""
    tenv = dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti)

    def tools(*args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, env=tenv, cwd=workdir,
                       timeout=60)
        subprocess.run(["tpm2_flushcontext", "-t"], check=True, capture_output=True, env=tenv,
                       timeout=60)  # no resource manager: free the transient slots

    tools("tpm2_createprimary", "-C", "o", "-c", "prim.ctx", "-Q")
    tools("tpm2_create", "-C", "prim.ctx", "-G", "ecc256", *create, "-u", "k.pub",
          "-r", "k.priv", "-Q")
    tools("tpm2_load", "-C", "prim.ctx", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx", "-Q")
    tools("tpm2_evictcontrol", "-C", "o", "-c", "k.ctx", handle, "-o", "k.tr")
    return workdir / "k.tr"


@pytest.mark.skipif(shutil.which("tpm2_evictcontrol") is None, reason="tpm2-tools not installed")
def test_persistent_key_by_handle_uri(swtpm: Swtpm, tmp_path: Path) -> None:
    persist_with_tools(swtpm, tmp_path, "0x81000010")
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket)
        data = tmp_path / "d"
        data.write_bytes(b"persistent")
        pub = tmp_path / "h.pub"

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([OPENSSL, *args], capture_output=True, env=penv, timeout=60)

        res = run("pkey", *PROV, "-in", "handle:0x81000010", "-pubout", "-out", str(pub))
        assert res.returncode == 0, res.stderr
        for md in ("sha256", "sha384"):
            res = run("dgst", f"-{md}", *PROV, "-sign", "handle:0x81000010", "-out",
                      str(tmp_path / "s"), str(data))
            assert res.returncode == 0, res.stderr + broker.log().encode()
            assert b"Verified OK" in run("dgst", f"-{md}", "-verify", str(pub), "-signature",
                                         str(tmp_path / "s"), str(data)).stdout
        # tpm2-openssl's object: URI, a file tpm2_evictcontrol -o wrote
        res = run("dgst", "-sha256", *PROV, "-sign", f"object:{tmp_path / 'k.tr'}", "-out",
                  str(tmp_path / "s"), str(data))
        assert res.returncode == 0, res.stderr
        assert b"Verified OK" in run("dgst", "-sha256", "-verify", str(pub), "-signature",
                                     str(tmp_path / "s"), str(data)).stdout
        res = run("dgst", "-sha256", *PROV, "-sign", "handle:0x81000099", "-out",
                  str(tmp_path / "s"), str(data))
        assert res.returncode != 0
        assert b"0x81000099" in res.stderr
        # A URI of ours that opens but cannot be used says why, and nothing about files.
        for uri, why in (("handle:bogus", b"give a persistent handle"),
                         ("handle:0x80000001", b"give a persistent handle"),
                         (f"object:{tmp_path / 'd'}", b"not a persistent key")):
            res = run("dgst", "-sha256", *PROV, "-sign", uri, "-out", str(tmp_path / "s"),
                      str(data))
            assert res.returncode != 0
            errors = [line for line in res.stderr.splitlines() if b":error:" in line]
            assert errors and why in errors[0], res.stderr
            assert b"No such file" not in res.stderr and b"scheme=file" not in res.stderr
        # An object: file that is not there fails the open, as the apps expect of a file
        # (after OpenSSL's file loader has said the same of the URI).
        res = run("dgst", "-sha256", *PROV, "-sign", f"object:{tmp_path / 'none.tr'}", "-out",
                  str(tmp_path / "s"), str(data))
        assert res.returncode != 0 and b"Could not open file or uri" in res.stderr
        errors = [line for line in res.stderr.splitlines() if b":tpmbroker:" in line]
        assert errors and b"none.tr: No such file or directory" in errors[-1], res.stderr
    finally:
        broker.stop()


@pytest.mark.skipif(shutil.which("tpm2_evictcontrol") is None, reason="tpm2-tools not installed")
def test_persistent_key_with_a_password_by_object_uri(swtpm: Swtpm, tmp_path: Path) -> None:
    """object:FILE?pass, as tpm2-openssl users write it: the password comes from -passin."""
    persist_with_tools(swtpm, tmp_path, "0x81000011", "-p", "objpw")
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        penv = dict(os.environ, TPMBROKER_SOCKET=broker.socket)

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([OPENSSL, *args], capture_output=True, env=penv, timeout=60)

        data = tmp_path / "d"
        data.write_bytes(b"object with a password")
        uri = f"object:{tmp_path / 'k.tr'}?pass"
        res = run("pkey", *PROV, "-in", uri, "-passin", "pass:objpw", "-pubout", "-out",
                  str(tmp_path / "k.pem.pub"))
        assert res.returncode == 0, res.stderr
        res = run("dgst", "-sha256", *PROV, "-sign", uri, "-passin", "pass:objpw", "-out",
                  str(tmp_path / "s"), str(data))
        assert res.returncode == 0, res.stderr + broker.log().encode()
        assert b"Verified OK" in run("dgst", "-sha256", "-verify", str(tmp_path / "k.pem.pub"),
                                     "-signature", str(tmp_path / "s"), str(data)).stdout
    finally:
        broker.stop()


# --- error paths -----------------------------------------------------------------------------

def test_password_missing_is_a_clear_error_without_touching_the_tpm(env: Env) -> None:
    key = env.dir / "pw-missing.pem"
    env.openssl("genpkey", *GEN_PROV, "-algorithm", "EC", "-pkeyopt", "group:P-256",
                "-pkeyopt", "user-auth:xyz", "-out", str(key))
    data = env.dir / "pwm.bin"
    data.write_bytes(b"x")
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(key), "-out",
                      str(env.dir / "pwm.sig"), str(data), check=False, input=b"")
    assert res.returncode != 0
    assert b"needs its password" in res.stderr and b"-passin" in res.stderr


def test_silent_broker_times_out_per_the_config(env: Env, tmp_path: Path) -> None:
    """A broker that accepts and never answers: the configured timeout ends the wait."""
    sock_path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    try:
        cnf = tmp_path / "openssl.cnf"
        cnf.write_text((ROOT / "openssl.cnf.example").read_text()
                       .replace("/usr/lib/x86_64-linux-gnu/ossl-modules/tpmbroker.so",
                                str(MODULE))
                       .replace("/run/tpmbroker/tpmbroker.sock", sock_path)
                       .replace("timeout = 30", "timeout = 1.5"))
        data = tmp_path / "d"
        data.write_bytes(b"x")
        penv = dict(os.environ, OPENSSL_CONF=str(cnf))
        penv.pop("TPMBROKER_SOCKET", None)
        t0 = time.monotonic()
        res = env.openssl("dgst", "-sha256", "-sign", str(env.keys["ec256"]), "-out",
                          str(tmp_path / "s"), str(data), check=False, env=penv)
        elapsed = time.monotonic() - t0
        assert res.returncode != 0
        assert 1.0 < elapsed < 10, elapsed
        assert b"did not answer in time" in res.stderr, res.stderr
    finally:
        listener.close()


def test_debug_log(env: Env, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"x")
    res = env.openssl("dgst", "-sha256", *PROV, "-sign", str(env.keys["ec256"]), "-out",
                      str(tmp_path / "s"), str(data), env=dict(env.environ, TPMBROKER_DEBUG="1"))
    assert b"tpmbroker: connected to " + env.broker.socket.encode() in res.stderr
    quiet = env.openssl("dgst", "-sha256", *PROV, "-sign", str(env.keys["ec256"]), "-out",
                        str(tmp_path / "s"), str(data))
    assert b"tpmbroker:" not in quiet.stderr
