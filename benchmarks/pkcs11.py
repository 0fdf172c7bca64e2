"""tpm2-pkcs11 through the PKCS#11 engine (libp11), as a user would set it up on Debian 12.

`openssl -engine pkcs11` makes the engine the default for every RSA and EC operation of
its process (ENGINE_set_default(ENGINE_METHOD_ALL)); tss2-esys, which libtpm2_pkcs11 runs
in the same process, then cannot make the ephemeral key of its salted session and every
login fails (CKR_GENERAL_ERROR). So the module runs behind p11-kit's server and the
engine loads p11-kit's client module: `Token` sets that up on a TPM reached through
tpm2-abrmd, with one EC P-256 and one RSA-2048 key of the token's own (`tpm2_ptool`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

PKCS11_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
P11KIT_SERVER = "/usr/libexec/p11-kit/p11-kit-server"
ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
PIN = "userpin"
LABELS = {"ec:P-256": "ec", "rsa:2048": "rsa"}


def missing() -> str | None:
    """None when everything tpm2-pkcs11 needs here is installed, else what is not."""
    absent = [p for p in (PKCS11_MODULE, P11KIT_CLIENT, P11KIT_SERVER, ENGINE)
              if not Path(p).exists()] + [t for t in ("tpm2_ptool",) if not shutil.which(t)]
    if not absent:
        return None
    return ("not installed: " + ", ".join(absent) + " (Debian: libtpm2-pkcs11-1 "
            "libtpm2-pkcs11-tools libengine-pkcs11-openssl p11-kit)")


def private_uri(key: str) -> str:
    return f"pkcs11:token=bench;object={LABELS[key]};type=private;pin-value={PIN}"


class Token:
    """A token with an EC and an RSA key, and p11-kit's server serving it."""

    def __init__(self, abrmd_tcti: str, env: dict[str, str], work: Path) -> None:
        self.work = work
        self.store = work / "pkcs11-store"
        self.env = dict(env, TPM2_PKCS11_TCTI=abrmd_tcti, TPM2TOOLS_TCTI=abrmd_tcti,
                        TPM2_PKCS11_STORE=str(self.store), TSS2_LOG="all+none")
        self.env.pop("OPENSSL_CONF", None)
        self.server: subprocess.Popen[bytes] | None = None
        self.log = work / "p11-kit-server.log"
        self.client_env: dict[str, str] = {}
        self.publics: dict[str, bytes] = {}

    def _ptool(self, *args: str) -> None:
        out = subprocess.run(["tpm2_ptool", *args, f"--path={self.store}"], env=self.env,
                             capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            said = (out.stderr.strip() or out.stdout.strip() or "no output")[-600:]
            raise RuntimeError(f"tpm2_ptool {args[0]} exited {out.returncode}: {said}")

    def start(self) -> Token:
        self.store.mkdir(exist_ok=True)
        self._ptool("init", "--transient-parent=tpm2-tools-ecc-default")
        self._ptool("addtoken", "--pid=1", "--sopin=sopin", f"--userpin={PIN}",
                    "--label=bench")
        for algorithm, label in (("ecc256", "ec"), ("rsa2048", "rsa")):
            self._ptool("addkey", f"--algorithm={algorithm}", "--label=bench",
                        f"--userpin={PIN}", f"--key-label={label}")
        socket = self.work / "p11-kit.sock"
        with open(self.log, "wb") as log:
            self.server = subprocess.Popen(
                [P11KIT_SERVER, "-f", "--provider", PKCS11_MODULE, "-n", str(socket),
                 "pkcs11:token=bench"], env=self.env, stdout=subprocess.DEVNULL,
                stderr=log, start_new_session=True)
        for _ in range(200):
            if socket.exists() or self.server.poll() is not None:
                break
            time.sleep(0.05)
        if not socket.exists():
            said = self.log.read_text(errors="replace").strip()[-600:] or "no output"
            raise RuntimeError(f"p11-kit-server did not open {socket}: {said}")
        conf = self.work / "pkcs11-engine.cnf"
        conf.write_text("openssl_conf = openssl_init\n[openssl_init]\nengines = engines\n"
                        "[engines]\npkcs11 = pkcs11\n[pkcs11]\nengine_id = pkcs11\n"
                        f"dynamic_path = {ENGINE}\nMODULE_PATH = {P11KIT_CLIENT}\ninit = 0\n")
        self.client_env = dict(self.env, OPENSSL_CONF=str(conf),
                               P11_KIT_SERVER_ADDRESS=f"unix:path={socket}")
        for key, label in LABELS.items():
            out = subprocess.run(["openssl", "pkey", "-engine", "pkcs11", "-inform", "engine",
                                  "-pubin", "-in", f"pkcs11:token=bench;object={label};"
                                  "type=public", "-pubout"], env=self.client_env,
                                 capture_output=True, timeout=60, check=False)
            begin = out.stdout.find(b"-----BEGIN")
            if out.returncode != 0 or begin < 0:
                said = out.stderr.decode(errors="replace").strip()[-600:] or "no output"
                raise RuntimeError(f"openssl pkey could not read the token's {label} "
                                   f"public key (exit {out.returncode}): {said}")
            self.publics[key] = out.stdout[begin:]
        return self

    def stop(self) -> None:
        if self.server is not None:
            from tpmbroker.processes import kill_group

            kill_group(self.server, timeout=5)
            self.server = None

    def __enter__(self) -> Token:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
