"""The key subcommands of `tpmbroker`: make keys (keygen, or wrap software keys), sign
their policies, use them (pubkey, sign, decrypt), persist and evict them, list them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..definitions import Curve, KeyType
from .common import (
    CURVE_NAMES,
    PADDINGS,
    PARENT_AUTH_FILE,
    PASSWORD_FILE,
    SCHEMES,
    USAGE_CHOICES,
    USAGES,
    Command,
    UsageError,
    arg,
    ask,
    check_output_path,
    connect,
    hash_name,
    hex_bytes,
    load_named_key,
    parent_handle,
    parent_password,
    parse_alg,
    persistent_handle,
    read_password,
    write_output,
)


def _passin(spec: str | None) -> bytes | None:
    """An encrypted key's passphrase, as openssl's -passin spells it: pass:TEXT,
    file:PATH (its first line), env:VAR, fd:N (its first line); None when not given."""
    from ..client import read_password_file

    if spec is None:
        return None
    kind, _, value = spec.partition(":")
    if kind == "pass":
        return value.encode()
    if kind == "file":
        return read_password_file(value)
    if kind == "env":
        found = os.environb.get(value.encode())
        if found is None:
            raise SystemExit(f"tpmbroker keygen: --passin env:{value}: no such variable")
        return found
    if kind == "fd" and value.isdigit():
        with os.fdopen(int(value), "rb", closefd=False) as f:
            return f.readline().rstrip(b"\r\n")
    raise SystemExit(f"tpmbroker keygen: --passin {spec!r}: give pass:, file:, env: or fd:")


def _key_password(args: argparse.Namespace) -> bytes | None:
    """--password-file, or with -a/--auth (as create_tpm2_key) a prompt, twice."""
    if not args.auth:
        return read_password(args)
    first = ask("Enter TPM key authority: ", "-a/--auth")
    if ask("Verifying - Enter TPM key authority: ", "-a/--auth") != first:
        raise UsageError("-a/--auth: the passwords do not match: type the same one twice")
    return first


def _cmd_wrap(args: argparse.Namespace) -> int:
    """keygen --wrap KEY: a software key into the TPM (or, with --import, for another)."""
    import sys as _sys

    from ..errors import TpmBrokerError
    from ..keyfile import der_to_pem
    from ..wrap import parent_public, read_private_key, wrap_key

    if args.alg is not None or args.digest is not None:
        raise SystemExit("tpmbroker keygen: --wrap takes the algorithm from the key; "
                         "drop --alg and --digest")
    check_output_path(args.output)
    data = Path(args.wrap).read_bytes()
    passphrase = _passin(args.passin)
    try:
        try:
            key = read_private_key(data, passphrase)
        except ValueError as exc:
            if passphrase is None and "encrypted" in str(exc) and _sys.stdin.isatty():
                passphrase = ask(f"Enter pass phrase for {args.wrap}: ", "--passin")
                key = read_private_key(data, passphrase)
            else:
                raise
    except ValueError as exc:
        fix = (" with --passin (pass:, file:, env:, fd:), or on a terminal"
               if passphrase is None and "encrypted" in str(exc) else "")
        raise SystemExit(f"tpmbroker keygen: --wrap {args.wrap}: {exc}{fix}") from None
    del data
    password = _key_password(args)
    usage = USAGES[args.usage]
    parent = args.parent
    try:
        if args.import_parent:
            # A TPM elsewhere: nothing here talks to any TPM or broker.
            der = wrap_key(key, parent_public(Path(args.import_parent).read_bytes()),
                           password=password, usage=usage, parent_handle=parent)
        else:
            with connect(args) as client:
                der = client.wrap_key(key, password, usage=usage, parent=parent,
                                      parent_auth=parent_password(args, parent))
    except ValueError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    except TpmBrokerError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    write_output(args.output, der_to_pem(der), 0o600)
    print(f"tpmbroker keygen: {args.wrap} still holds the private key in the clear: "
          "destroy it (and every copy) once the TPM key works", file=_sys.stderr)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .. import protocol as p
    from ..keyfile import der_to_pem

    if args.wrap:
        return _cmd_wrap(args)
    if args.import_parent:
        raise SystemExit("tpmbroker keygen: --import wraps an existing key: give --wrap KEY")
    check_output_path(args.output)
    key_type, param = args.alg or (KeyType.EC, Curve.P256)
    try:
        digest = p.Hash.from_name(args.digest) if args.digest is not None else None
    except ValueError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    from ..keypolicy_authoring import OptionError, keygen_policy

    password = _key_password(args)
    try:
        policy = keygen_policy(args.auth_policy, args.pcr_lock, args.pcr_values,
                               bool(password))
    except OptionError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise SystemExit(f"tpmbroker keygen: {exc}") from None
    with connect(args) as client:
        der, _spki = client.generate_key(p.KeyType(key_type), param, password,
                                         args.parent, usage=USAGES[args.usage],
                                         hash_alg=digest,
                                         parent_auth=parent_password(args, args.parent),
                                         policy=policy)
    write_output(args.output, der_to_pem(der), 0o600)
    return 0


def _spki_pem(spki: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(spki)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _cmd_parent_pubkey(args: argparse.Namespace) -> int:
    from ..wrap import parent_public_pem

    with connect(args) as client:
        public = client.parent_public(args.parent)
    write_output(args.output, public if args.format == "tpm" else parent_public_pem(public))
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    with connect(args) as client:
        key = load_named_key(client, args)
    write_output(args.output, _spki_pem(key.public_key))
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    import hashlib

    from .. import protocol as p

    hash_alg = p.Hash.from_name(args.hash)
    check_output_path(args.output, "--out")
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    digest = hashlib.new(hash_alg.hashlib_name, data).digest()
    with connect(args) as client:
        key = load_named_key(client, args)
        signature = client.sign(key, digest, hash_alg, SCHEMES.get(args.scheme or ""))
    write_output(args.output, signature)
    return 0


def _cmd_decrypt(args: argparse.Namespace) -> int:
    from .. import protocol as p

    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    padding = p.Padding[args.padding.upper()]
    oaep = padding is p.Padding.OAEP
    with connect(args) as client:
        key = load_named_key(client, args)
        plaintext = client.decrypt(key, data, padding,
                                   args.oaep_hash if oaep else None,
                                   args.mgf1_hash if oaep else None,
                                   args.label_hex if oaep else b"")
    write_output(args.output, plaintext)
    return 0


def _owner_auth(args: argparse.Namespace) -> bytes | None:
    from ..client import read_password_file

    return read_password_file(args.owner_auth_file) if args.owner_auth_file else None


def _cmd_persist(args: argparse.Namespace) -> int:
    with connect(args) as client:
        key = load_named_key(client, args)
        name = client.persist(key, args.handle, owner_auth=_owner_auth(args))
    print(f"0x{args.handle:08x} {name.hex()}")
    return 0


def _cmd_evict(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.evict(args.handle, owner_auth=_owner_auth(args))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listing = client.keys()
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    print("persistent handles:")
    for obj in listing["persistent"]:
        size = obj.get("curve") or obj.get("bits") or ""
        policy = " policy" if obj.get("policy") else ""
        attributes = "|".join(str(a) for a in obj.get("attributes", []))
        print(f"  {obj['handle']}  {obj['type']} {size}{policy}  {attributes}")
    print("loaded by the broker:")
    for key in listing["loaded"]:
        where = key.get("handle") if key.get("source") == "handle" else "file"
        size = key.get("curve") or key.get("bits")
        print(f"  {str(key['key_id'])[:16]}  {key['type']} {size}  {where}  "
              f"connections {key.get('connections', 0)}"
              f"{'' if key.get('resident') else '  (not resident)'}")
    return 0


def _challenge(args: argparse.Namespace) -> bytes | None:
    if args.challenge_file is not None:
        return Path(args.challenge_file).read_bytes()
    given: bytes | None = args.challenge_hex
    return given


def _cmd_attest(args: argparse.Namespace) -> int:
    if args.verify is not None:
        return _verify_statement(args)
    if args.key is None:
        raise UsageError("give the KEY to attest, or --verify STATEMENT")
    check_output_path(args.output, "-o/--output")
    challenge = _challenge(args)
    if challenge is None:
        challenge = os.urandom(32)  # fresh, so the statement is this one's
    with connect(args) as client:
        key = load_named_key(client, args)
        statement = client.attest(key, challenge)
    write_output(args.output, statement)
    if args.attestation_ca_out:
        _write_attestation_ca(statement, args.attestation_ca_out)
    return 0


def _write_attestation_ca(statement: bytes, path: str) -> None:
    """The attestation CA's certificate (x5c[1]) as PEM: the pin verifiers give as
    --attestation-ca, taken from a statement this broker made over its own socket."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = base64.b64decode(json.loads(statement)["attStmt"]["x5c"][1])
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    write_output(path, pem)


def _verify_statement(args: argparse.Namespace) -> int:
    from ..attestation import AttestationError, verify
    from ..ek_trust import EkTrustError, load_anchors

    if args.ek_ca is None:
        raise UsageError("--verify needs --ek-ca FILE|DIR, the trust anchors of TPM EK "
                         "certificates")
    data = sys.stdin.buffer.read() if args.verify == "-" else Path(args.verify).read_bytes()
    try:
        anchors = load_anchors(args.ek_ca)
    except EkTrustError as exc:
        raise UsageError(f"--ek-ca: {exc}") from None
    try:
        ak_anchors = load_anchors(args.attestation_ca) if args.attestation_ca else []
    except EkTrustError as exc:
        raise UsageError(f"--attestation-ca: {exc}") from None
    try:
        verified = verify(data, anchors, challenge=_challenge(args),
                          attestation_anchors=ak_anchors)
    except AttestationError as exc:
        print(f"tpmbroker attest: refused: {exc}", file=sys.stderr)
        return 1
    print(verified.summary())
    return 0


def _cmd_policy_sign(args: argparse.Namespace) -> int:
    """Add a signed policy to a key file made with --auth-policy: the PCR lock, signed by
    the policy key. Needs no TPM and no broker."""
    from cryptography.hazmat.primitives import serialization

    from .. import keypolicy
    from ..errors import TpmBrokerError
    from ..keyfile import der_to_pem, pem_to_der
    from ..keypolicy_authoring import OptionError, pcr_step, signed_policy

    try:
        signer = serialization.load_pem_private_key(Path(args.signing_key).read_bytes(),
                                                    read_password(args))
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"tpmbroker policy sign: --signing-key {args.signing_key}: {exc}"
                         ) from None
    try:
        body = [pcr_step(args.pcr_lock, args.pcr_values, required=True)] if args.pcr_lock \
            else []
    except OptionError as exc:
        raise UsageError(str(exc)) from None
    try:
        steps = signed_policy(signer, body)
        key_file = Path(args.key_file)
        updated = keypolicy.add_signed_policy(pem_to_der(key_file.read_bytes()),
                                              args.name or "", steps)
    except (TpmBrokerError, ValueError) as exc:
        raise SystemExit(f"tpmbroker policy sign: {exc}") from None
    tmp = key_file.with_name(key_file.name + ".new")
    write_output(str(tmp), der_to_pem(updated), 0o600)
    os.replace(tmp, key_file)
    return 0


KEYGEN = Command(
    "keygen", "create a key in the TPM, or wrap a software key into it (--wrap), write a "
              "TSS2 PRIVATE KEY", _cmd_keygen, (
        arg("-w", "--wrap", metavar="KEY",
            help="wrap this EC or RSA private key (PEM or DER, PKCS#8, PKCS#1, SEC1) "
                 "instead of creating one; destroy it afterwards"),
        arg("--passin", metavar="SPEC",
            help="--wrap: the key's passphrase if encrypted: pass:TEXT, file:PATH, "
                 "env:VAR, fd:N (default: asked on the terminal)"),
        arg("-i", "--import", dest="import_parent", metavar="PARENT_PUBKEY",
            help="--wrap for a TPM elsewhere: its parent's public key (PEM, from "
                 "`tpmbroker parent-pubkey` there) or TPM2B_PUBLIC; writes an "
                 "importable key without any TPM here"),
        arg("-a", "--auth", action="store_true",
            help="ask for the key's password on the terminal"),
        arg("--alg", type=parse_alg, default=None,
            help=f"ec:{'|'.join(CURVE_NAMES)}, rsa:BITS (1024 to 4096, as the "
                 "TPM has them), rsa-pss:BITS (scheme bound to RSASSA-PSS)"),
        arg("--usage", choices=USAGE_CHOICES, default=None,
            help="narrow what the key may do (default: sign and decrypt, as "
                 "tpm2-openssl; rsa-pss keys sign; docs/security.md, Key usage)"),
        arg("--digest", help="the key's hash (default sha256): its name hash, and the hash "
                             "an rsa-pss key signs with"),
        arg("--password-file", help="file whose first line is the key's password"),
        arg("-p", "--parent", "--parent-handle", dest="parent", type=parent_handle,
            default="0x40000001",
            help="parent: 0x40000001 (storage primary) or a persistent 0x81xxxxxx"),
        arg("--parent-auth-file", metavar="FILE",
            help="file whose first line is the parent's password (default: "
                 "$TPMBROKER_PARENT_AUTH, else $TPM2OPENSSL_PARENT_AUTH)"),
        arg("--pcr-lock", metavar="[BANK:]PCRS",
            help="bind the key to PCR values: 16, 16,17, sha256:16-17, "
                 "sha1:7+sha256:16 (default bank sha256); with a password the key "
                 "needs both (docs/keys.md)"),
        arg("--pcr-values", metavar="HEX,...",
            help="with --pcr-lock: the PCR values to bind to, in PCR order (default: "
                 "the PCRs' current values)"),
        arg("--auth-policy", metavar="POLICYKEY",
            help="the key opens under any policy signed by this key (PEM public or "
                 "private key); add policies with `tpmbroker policy sign`"),
        arg("-o", "--output", required=True),
    ), client=True)

PARENT_PUBKEY = Command(
    "parent-pubkey", "print the public key of the TPM's storage parent, to wrap keys for "
                     "this TPM elsewhere", _cmd_parent_pubkey, (
        arg("--parent", type=parent_handle, default="0x40000001",
            help="0x40000001 (storage primary) or a persistent 0x81xxxxxx"),
        arg("--format", choices=["pem", "tpm"], default="pem",
            help="pem: SubjectPublicKeyInfo; tpm: the whole TPM2B_PUBLIC"),
        arg("-o", "--output", default="-"),
    ), client=True)

POLICY = Command(
    "policy", "signed policies of keys made with --auth-policy", subcommand_dest="policy_command",
    subcommands=(Command(
        "sign", "sign a PCR policy with the policy key and add it to a key file (no TPM "
                "needed)", _cmd_policy_sign, (
            arg("--signing-key", "--key", required=True, metavar="POLICYKEY.pem",
                help="the policy key's private key (PEM)"),
            arg("--password-file", help="file whose first line is POLICYKEY's password"),
            arg("--pcr-lock", metavar="[BANK:]PCRS", help="as keygen's"),
            arg("--pcr-values", metavar="HEX,...",
                help="the PCR values the policy allows, in PCR order"),
            arg("--name", help="a name for the policy, shown in refusals"),
            arg("key_file", metavar="KEYFILE"),
        )),))

PUBKEY = Command(
    "pubkey", "print a TPM key's public key (SubjectPublicKeyInfo PEM)", _cmd_pubkey, (
        arg("key", help="key file, or handle:0x81xxxxxx"),
        PASSWORD_FILE, PARENT_AUTH_FILE,
        arg("-o", "--output", default="-"),
    ), client=True)

SIGN = Command(
    "sign", "sign a file (DER signature for openssl dgst -verify)", _cmd_sign, (
        arg("--key", required=True, help="key file, or handle:0x81xxxxxx"),
        PASSWORD_FILE, PARENT_AUTH_FILE,
        arg("--hash", type=hash_name, default="sha256"),
        arg("--scheme", choices=list(SCHEMES)),
        arg("--in", dest="input", required=True, help="file to sign, - for stdin"),
        arg("--out", dest="output", required=True, help="signature file, - for stdout"),
    ), client=True)

DECRYPT = Command(
    "decrypt", "decrypt a file with an RSA TPM key (openssl pkeyutl -encrypt makes one)",
    _cmd_decrypt, (
        arg("--key", required=True, help="key file, or handle:0x81xxxxxx"),
        PASSWORD_FILE,
        arg("--padding", choices=PADDINGS, default="pkcs1",
            help="pkcs1 uses implicit rejection, as OpenSSL 3.2 does"),
        arg("--oaep-hash", type=hash_name, default="sha256",
            help="OAEP's hash (default sha256)"),
        arg("--mgf1-hash", type=hash_name, help="MGF1's hash (default: the OAEP hash)"),
        arg("--label-hex", type=hex_bytes, default="", help="OAEP label, in hex"),
        arg("--in", dest="input", required=True, help="ciphertext, - for stdin"),
        arg("--out", dest="output", default="-", help="plaintext file (default: stdout)"),
    ), client=True)

ATTEST = Command(
    "attest", "prove a key is resident in the TPM (a WebAuthn 'tpm' attestation "
              "statement), or check one offline (--verify)", _cmd_attest, (
        arg("key", nargs="?", help="key file, or handle:0x81xxxxxx"),
        PASSWORD_FILE, PARENT_AUTH_FILE,
        arg("--challenge-hex", type=hex_bytes, metavar="HEX",
            help="the verifier's challenge (default: 32 random bytes)"),
        arg("--challenge-file", metavar="FILE", help="the challenge, read from a file"),
        arg("-o", "--output", default="-", help="statement file (default: stdout)"),
        arg("--verify", metavar="STATEMENT", help="check a statement (- for stdin) "
                                                  "against --ek-ca, no TPM needed"),
        arg("--ek-ca", metavar="FILE|DIR", help="trust anchors for EK certificates"),
        arg("--attestation-ca", metavar="FILE|DIR",
            help="with --verify: the pinned attestation CA(s); without, a statement is "
                 "only checked for consistency"),
        arg("--attestation-ca-out", metavar="FILE",
            help="also write the broker's attestation CA certificate, to pin"),
    ), client=True)

OWNER_AUTH_FILE = arg("--owner-auth-file", metavar="FILE",
                      help="file whose first line is the owner hierarchy's password")

PERSIST = Command(
    "persist", "make a key persistent at a handle 0x81xxxxxx (the broker's administrators "
               "only)", _cmd_persist, (
        arg("key", help="key file (TSS2 PRIVATE KEY)"),
        arg("handle", type=persistent_handle,
            help="free persistent handle, 0x81000000 to 0x817FFFFF"),
        PARENT_AUTH_FILE, OWNER_AUTH_FILE,
    ), client=True)

EVICT = Command(
    "evict", "take a persistent key out of the TPM (the broker's administrators only)",
    _cmd_evict, (
        arg("handle", type=persistent_handle, help="persistent handle, 0x81xxxxxx"),
        OWNER_AUTH_FILE,
    ), client=True)

KEYS = Command("keys", "persistent handles and the keys the broker holds", _cmd_keys,
               (arg("--json", action="store_true"),), client=True)

# In the order `tpmbroker --help` lists them (tpmbroker.cli gathers every module's).
COMMANDS = (KEYGEN, PARENT_PUBKEY, POLICY, PUBKEY, SIGN, DECRYPT, ATTEST, PERSIST, EVICT,
            KEYS)
