"""One-shot latency: one `openssl pkeyutl` process per operation, as shell scripts and CI do.

    python -m benchmarks.oneshot [--tpm-model none,discrete] [--runs 10] [--out DIR]

For each TPM (swtpm as it is, and swtpm behind the discrete-chip model of
benchmarks/chip.py), each system and each operation, starts `openssl pkeyutl` `--runs`
times one after the other and reports the median and the slowest wall time of the
process, start-up included, and the TPM commands one process sent (counted at the relay).

Systems:
- tpmbroker: the provider (`-provider default -provider tpmbroker`), the broker running;
- tpm2-openssl: `-provider tpm2 -provider base`, through tpm2-abrmd;
- tpm2-pkcs11: the PKCS#11 engine (`-engine pkcs11 -keyform engine`) with libtpm2_pkcs11
  behind p11-kit's server (p11-kit-server, p11-kit-client.so): `openssl -engine` makes the
  engine the default for all RSA and EC arithmetic in the process, which breaks the salted
  session tss2-esys starts inside the same process, so the module must run in another one.

Operations: ECDSA P-256 and RSA-2048 PKCS#1 v1.5 signatures over a SHA-256 digest
(`-sign`), RSA-2048 PKCS#1 v1.5 decryption (`-decrypt`), P-256 ECDH (`-derive`).
Each result is checked: signatures verified with the public key, the decrypted bytes and
the shared secret compared with the expected ones.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OPERATIONS = ("sign ec:P-256", "sign rsa:2048", "decrypt rsa:2048", "derive ec:P-256")
SYSTEMS = ("tpmbroker", "tpm2-openssl-1.1", "tpm2-openssl-1.3", "tpm2-pkcs11")
TPM2_OPENSSL = ("tpm2-openssl-1.1", "tpm2-openssl-1.3")  # "tpm2-openssl": both


class Files:
    """The inputs of every operation and what their outputs must be."""

    def __init__(self, work: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.work = work
        self.digest = work / "digest.bin"
        self.digest.write_bytes(hashlib.sha256(b"one-shot").digest())
        self.secret = os.urandom(32)
        self.peer_private = ec.generate_private_key(ec.SECP256R1())
        self.peer = work / "peer.pem"
        self.peer.write_bytes(self.peer_private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def ciphertext(self, public_pem: bytes, name: str) -> Path:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        public = serialization.load_pem_public_key(public_pem)
        assert isinstance(public, rsa.RSAPublicKey)
        path = self.work / f"{name}.ct"
        path.write_bytes(public.encrypt(self.secret, padding.PKCS1v15()))
        return path

    def check(self, operation: str, public_pem: bytes, output: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

        try:
            public = serialization.load_pem_public_key(public_pem)
        except ValueError:
            return False
        digest = self.digest.read_bytes()
        try:
            if operation == "sign ec:P-256" and isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(output, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                return True
            if operation == "sign rsa:2048" and isinstance(public, rsa.RSAPublicKey):
                public.verify(output, digest, padding.PKCS1v15(),
                              utils.Prehashed(hashes.SHA256()))
                return True
        except InvalidSignature:
            return False
        if operation == "decrypt rsa:2048":
            return output == self.secret
        if operation == "derive ec:P-256" and isinstance(public, ec.EllipticCurvePublicKey):
            return output == self.peer_private.exchange(ec.ECDH(), public)
        return False


def pkeyutl_args(operation: str, files: Files, inputs: dict[str, Path], out: Path) -> list[str]:
    verb = operation.split()[0]
    if verb == "sign":
        return ["-sign", "-pkeyopt", "digest:sha256", "-in", str(files.digest),
                "-out", str(out)]
    if verb == "decrypt":
        return ["-decrypt", "-in", str(inputs[operation]), "-out", str(out)]
    return ["-derive", "-peerkey", str(files.peer), "-out", str(out)]


def run_one(cmd: list[str], env: dict[str, str], out: Path) -> tuple[float, bytes, str]:
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - t0
    data = out.read_bytes() if out.exists() and proc.returncode == 0 else b""
    return elapsed, data, proc.stderr.decode(errors="replace")[-300:]


def measure(system: str, operation: str, base: list[str], key: str, public: bytes,
            env: dict[str, str], files: Files, inputs: dict[str, Path], runs: int,
            relay: Any) -> dict[str, Any]:
    out = files.work / "out.bin"
    cmd = ["openssl", "pkeyutl", *base, "-inkey", key,
           *pkeyutl_args(operation, files, inputs, out)]
    times: list[float] = []
    failures: dict[str, int] = {}
    commands_before = relay.commands() if relay is not None else 0
    counts_before = dict(relay.counts) if relay is not None else {}
    for _ in range(runs):
        elapsed, data, err = run_one(cmd, env, out)
        if data and files.check(operation, public, data):
            times.append(elapsed)
        else:
            reason = (err.strip().splitlines() or ["wrong result"])[-1]
            # without OpenSSL's per-process thread id, so equal errors count together
            reason = re.sub(r"^[0-9A-F]+:error:[0-9A-F]+:", "", reason)[:160]
            failures[reason] = failures.get(reason, 0) + 1
    row: dict[str, Any] = {"system": system, "operation": operation, "runs": runs,
                           "ok": len(times), "failures": failures}
    if times:
        row.update(median_ms=round(1000 * statistics.median(times), 1),
                   max_ms=round(1000 * max(times), 1))
    if relay is not None:
        row["tpm_commands"] = round((relay.commands() - commands_before) / runs, 1)
        row["by_command"] = {name: round((count - counts_before.get(name, 0)) / runs, 1)
                             for name, count in relay.counts.items()
                             if count > counts_before.get(name, 0)}
    return row


@contextlib.contextmanager
def tpm(model: str, work: Path) -> Iterator[tuple[Any, Any, str]]:
    from tpmbroker.simulator import Swtpm

    from .chip import MODELS, ChipRelay

    swtpm = Swtpm(work / "tpm")
    swtpm.start()
    relay = ChipRelay(swtpm.port, MODELS[model])
    try:
        yield swtpm, relay, relay.tcti
    finally:
        relay.close()
        swtpm.stop()


def tpmbroker_rows(tcti: str, relay: Any, files: Files, keys: dict[str, Any], runs: int,
                   work: Path) -> list[dict[str, Any]]:
    from tpmbroker.paths import provider_path
    from tpmbroker.processes import BrokerProcess

    rows: list[dict[str, Any]] = []
    base = ["-provider-path", str(provider_path().parent), "-provider", "default",
            "-provider", "tpmbroker"]
    with BrokerProcess(tcti, work / "broker") as broker:
        env = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)
        for operation in OPERATIONS:
            key = keys[operation.split()[1]]
            rows.append(measure("tpmbroker", operation, base, str(key["path"]),
                                key["public"], env, files, key["inputs"], runs, relay))
    return rows


def tpm2_openssl_rows(system: str, found: tuple[Any, str], tcti: str, env: dict[str, str],
                      relay: Any, files: Files, keys: dict[str, Any],
                      runs: int) -> list[dict[str, Any]]:
    """One release line of tpm2-openssl (benchmarks/tpm2_openssl.py); `found` is its module
    or None and why it is missing."""
    module, why = found
    if module is None:
        return [{"system": system, "operation": op, "runs": 0, "ok": 0, "failures": {why: 1}}
                for op in OPERATIONS]
    rows: list[dict[str, Any]] = []
    child = {k: v for k, v in env.items() if k != "OPENSSL_CONF"}
    child.update(TPM2OPENSSL_TCTI=tcti, TSS2_LOG="all+none", OPENSSL_MODULES=module.directory)
    for operation in OPERATIONS:
        key = keys[operation.split()[1]]
        row = measure(system, operation, ["-provider", "tpm2", "-provider", "base"],
                      str(key["path"]), key["public"], child, files, key["inputs"], runs,
                      relay)
        row["version"] = module.version
        rows.append(row)
    return rows


def pkcs11_rows(abrmd_tcti: str, env: dict[str, str], relay: Any, files: Files, runs: int,
                work: Path) -> list[dict[str, Any]]:
    """tpm2-pkcs11 through the PKCS#11 engine; rows saying why when it cannot run."""
    from . import pkcs11

    why = pkcs11.missing()
    if why:
        return [{"system": "tpm2-pkcs11", "operation": op, "runs": 0, "ok": 0,
                 "failures": {why: 1}} for op in OPERATIONS]
    rows: list[dict[str, Any]] = []
    token = pkcs11.Token(abrmd_tcti, env, work)
    try:
        token.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        token.stop()
        return [{"system": "tpm2-pkcs11", "operation": op, "runs": 0, "ok": 0,
                 "failures": {f"setup failed: {exc}"[:400]: 1}} for op in OPERATIONS]
    try:
        base = ["-engine", "pkcs11", "-keyform", "engine"]
        for operation in OPERATIONS:
            key = operation.split()[1]
            inputs = ({operation: files.ciphertext(token.publics[key], "pkcs11")}
                      if operation.startswith("decrypt") else {})
            rows.append(measure("tpm2-pkcs11", operation, base, pkcs11.private_uri(key),
                                token.publics[key], token.client_env, files, inputs, runs,
                                relay))
    finally:
        token.stop()
    return rows


def make_keys(tcti: str, files: Files, work: Path) -> dict[str, Any]:
    """One EC and one RSA TSS2 PRIVATE KEY (sign and decrypt), shared by the systems."""
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import TPMT_PUBLIC

    keys: dict[str, Any] = {}
    attributes = "userwithauth|sign|decrypt|fixedtpm|fixedparent|sensitivedataorigin"
    for name, alg in (("ec:P-256", "ecc256"), ("rsa:2048", "rsa2048")):
        with ESAPI(TCTILdr.parse(tcti)) as ectx:  # sign and decrypt (ECDH) as tpm2-openssl's
            tss = TSSPrivKey.create(ectx, TPMT_PUBLIC.parse(
                alg, nameAlg="sha256", objectAttributes=attributes), 0x40000001)
        path = work / f"{name.replace(':', '-')}.pem"
        path.write_bytes(tss.to_pem())
        public = serialization.load_der_public_key(tss.public.to_der()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        inputs = ({f"decrypt {name}": files.ciphertext(public, name.replace(":", "-"))}
                  if name.startswith("rsa") else {})
        keys[name] = {"path": path, "public": public, "inputs": inputs}
    return keys


def run(models: list[str], runs: int, systems: list[str]) -> dict[str, Any]:
    from tpmbroker.processes import Abrmd, DbusDaemon

    from . import tpm2_openssl
    from .machine import machine_description

    results: dict[str, Any] = {"meta": machine_description(), "rows": []}
    for model in models:
        with tempfile.TemporaryDirectory(prefix="tpmbroker-oneshot-") as tmp:
            work = Path(tmp)
            files = Files(work)
            with tpm(model, work) as (swtpm, relay, tcti):
                keys = make_keys(tcti, files, work)
                rows: list[dict[str, Any]] = []
                if "tpmbroker" in systems:
                    rows += tpmbroker_rows(tcti, relay, files, keys, runs, work)
                if {*TPM2_OPENSSL, "tpm2-pkcs11"} & set(systems):
                    swtpm.restart()  # swtpm serves one connection: the broker has gone
                    bus = DbusDaemon()
                    try:
                        abrmd = Abrmd(tcti, work / "abrmd", bus, max_connections=100)
                        abrmd.start()
                        try:
                            modules: dict[str, Any] = {}
                            missing: dict[str, str] = {}
                            if set(TPM2_OPENSSL) & set(systems):
                                modules, missing = tpm2_openssl.find(abrmd.tcti,
                                                                     abrmd.env())
                            for system in TPM2_OPENSSL:
                                if system in systems:
                                    rows += tpm2_openssl_rows(
                                        system, (modules.get(system), missing.get(system, "")),
                                        abrmd.tcti, abrmd.env(), relay, files, keys, runs)
                            if "tpm2-pkcs11" in systems:
                                rows += pkcs11_rows(abrmd.tcti, abrmd.env(), relay, files,
                                                    runs, work)
                        finally:
                            abrmd.stop()
                    finally:
                        bus.stop()
            for row in rows:
                row["tpm"] = "swtpm" if model == "none" else f"swtpm + {model} model"
            results["rows"].extend(rows)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| TPM | operation | system | median ms | slowest ms | TPM commands | failed |",
             "|---|---|---|---:|---:|---:|---:|"]
    rows = sorted(results["rows"], key=lambda r: (r["tpm"], OPERATIONS.index(r["operation"]),
                                                  SYSTEMS.index(r["system"])))
    for r in rows:
        failed = r["runs"] - r["ok"] if r["runs"] else "not run"
        system = r["system"] + (f" ({r['version']})" if r.get("version") else "")
        lines.append(f"| {r['tpm']} | {r['operation']} | {system} "
                     f"| {r.get('median_ms', '-')} | {r.get('max_ms', '-')} "
                     f"| {r.get('tpm_commands', '-')} | {failed} |")
    notes = list(dict.fromkeys(  # a system not run: once per TPM, not once per operation
        f"- {r['tpm']}, {r['system']}: not run: " + "; ".join(r["failures"])
        if not r["runs"] else
        f"- {r['tpm']}, {r['system']} {r['operation']}: "
        + "; ".join(f"{k} x {v}" for k, v in r["failures"].items())
        for r in rows if r["failures"]))
    ratios: list[str] = []
    for tpm_name in dict.fromkeys(r["tpm"] for r in rows):
        for operation in OPERATIONS:
            by = {r["system"]: r for r in rows if r["tpm"] == tpm_name
                  and r["operation"] == operation and "median_ms" in r}
            ours = by.get("tpmbroker")
            for peer in (*TPM2_OPENSSL, "tpm2-pkcs11"):
                if ours and peer in by:
                    ratios.append(f"| {tpm_name} | {operation} | {peer} "
                                  f"| {by[peer]['median_ms'] / ours['median_ms']:.1f}x |")
    out = "\n".join(lines) + "\n"
    if ratios:
        out += ("\n| TPM | operation | peer | peer's median over tpmbroker's |\n"
                "|---|---|---|---:|\n" + "\n".join(ratios) + "\n")
    if notes:
        out += "\nFailures:\n\n" + "\n".join(notes) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oneshot",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--tpm-model", default="none,discrete",
                        help="comma-separated: none (swtpm as it is), discrete")
    parser.add_argument("--runs", type=int, default=10, help="processes per point")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    from .chip import MODELS

    models = [m.strip() for m in args.tpm_model.split(",") if m.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "tpm2-openssl" in systems:  # every release line
        at = systems.index("tpm2-openssl")
        systems[at:at + 1] = [x for x in TPM2_OPENSSL if x not in systems]
    if not models or any(m not in MODELS for m in models) or args.runs < 1 or any(
            s not in SYSTEMS for s in systems):
        print(f"models from {', '.join(MODELS)}; systems from {', '.join(SYSTEMS)}; "
              "runs >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("TSS2_LOG", "all+none")
    results = run(models, args.runs, systems)
    results["meta"]["command"] = ("python -m benchmarks.oneshot "
                                  f"--tpm-model {','.join(models)} --runs {args.runs} "
                                  f"--systems {','.join(systems)} --out {args.out}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "oneshot.md").write_text(f"`{results['meta']['command']}`\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
