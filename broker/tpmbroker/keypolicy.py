"""Key policies in the TSS2 PRIVATE KEY encoding, and their policy digests (no TPM I/O).

A key file may carry the policy its key was made with (draft-bottomley-tpm2-keys, as
openssl_tpm2_engine writes it):

    policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL
    TPMPolicy ::= SEQUENCE { commandCode [0] EXPLICIT INTEGER,
                             commandPolicy [1] EXPLICIT OCTET STRING }

Each entry is one policy command to replay in a policy session before the key is used;
commandPolicy holds the bytes the TPM hashes into the policy digest after the command
code. The commands the broker replays:

- TPM2_PolicyPCR: TPML_PCR_SELECTION, then the PCR digest (no size prefix). On the wire
  of GENERATE, an entry with the selection alone asks the broker to take the PCRs'
  current values.
- TPM2_PolicyAuthValue: empty; the key's password then goes into the session's HMAC.
- TPM2_PolicyAuthorize: TPM2B_PUBLIC keySigned, TPM2B_DIGEST policyRef, TPMT_SIGNATURE
  policySignature. First in a key's policy, it says "any policy the holder of keySigned
  has signed"; its signature is then the NULL signature. Last in a signed policy, it
  carries the signature of that policy's digest (approvedPolicy).

Signed policies live in the key file's

    authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL
    TPMAuthPolicy ::= SEQUENCE { name [0] EXPLICIT UTF8String OPTIONAL,
                                 policy [1] EXPLICIT SEQUENCE OF TPMPolicy }

and are tried in order until one holds. They can be added to a key file at any time
(`tpmbroker policy sign`), without the TPM: so a PCR policy can follow an update.

The key's authPolicy is the digest of the entries in order, starting from zeros
(TPM 2.0 Part 3, each command's policyDigest update), with the key's name hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence

from cryptography.hazmat import asn1

from . import keyfile
from .definitions import Curve, Hash
from .errors import BadKeyError, UnsupportedError
from .keyfile import AuthPolicyAsn1, PolicyAsn1

CC_POLICY_PCR = 0x0000017F
CC_POLICY_AUTH_VALUE = 0x0000016B
CC_POLICY_RESTART = 0x00000180
CC_POLICY_AUTHORIZE = 0x0000016A
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_ECDSA = 0x0018
PCR_COUNT = 24
SIZEOF_SELECT = 3
COMMAND_NAMES = {CC_POLICY_PCR: "TPM2_PolicyPCR", CC_POLICY_AUTH_VALUE: "TPM2_PolicyAuthValue",
                 CC_POLICY_AUTHORIZE: "TPM2_PolicyAuthorize"}
HASH_NAMES = {Hash.SHA1: "sha1", Hash.SHA256: "sha256", Hash.SHA384: "sha384",
              Hash.SHA512: "sha512"}


def add_signed_policy(key_der: bytes, name: str, steps: Sequence[PolicyStep]) -> bytes:
    """The key file with one more signed policy (authPolicy [3]), placed first so the
    newest is tried first; the rest of the file is kept as it is."""
    signed_policy_steps(steps)
    seq = keyfile.decode(key_der)
    if not seq.policy or seq.policy[0].command_code != CC_POLICY_AUTHORIZE:
        raise BadKeyError("the key's policy does not start with TPM2_PolicyAuthorize: "
                          "signed policies cannot open it (make it with --auth-policy)")
    main = Authorize.decode(bytes(seq.policy[0].command_policy))
    signed = Authorize.decode(steps[-1].command_policy)
    if (signed.key_public, signed.policy_ref) != (main.key_public, main.policy_ref):
        raise BadKeyError("the policy is signed by another key than the one the key "
                          "file's TPM2_PolicyAuthorize names")
    entry = AuthPolicyAsn1(name=name or None, policy=to_asn1(steps))
    seq.auth_policy = [entry, *(seq.auth_policy or [])]
    return keyfile.to_der(seq)


@asn1.sequence
class _PolicyListAsn1:
    """The GENERATE request's policy field: the entries wrapped in one SEQUENCE."""

    entries: list[PolicyAsn1]


@dataclasses.dataclass(frozen=True)
class PcrSelection:
    """PCRs of one bank."""

    bank: Hash
    pcrs: tuple[int, ...]

    def describe(self) -> str:
        numbers = ", ".join(str(p) for p in self.pcrs)
        return f"PCR{'s' if len(self.pcrs) > 1 else ''} {numbers} ({HASH_NAMES[self.bank]})"


@dataclasses.dataclass(frozen=True)
class PolicyStep:
    """One policy command: what the broker replays and hashes."""

    command_code: int
    command_policy: bytes

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command_code, f"command 0x{self.command_code:08x}")


# --- PCR selections ---------------------------------------------------------------------

def parse_pcr_lock(text: str) -> list[PcrSelection]:
    """`16`, `16,17`, `sha256:16,17` or `sha1:7+sha256:16` (create_tpm2_key's --pcr-lock
    spelling, tpm2-tools' bank prefix). ValueError says what is wrong."""
    selections: list[PcrSelection] = []
    for part in text.split("+"):
        bank_name, _, numbers = part.rpartition(":")
        bank_name = bank_name.strip().lower() or "sha256"
        banks = {name: h for h, name in HASH_NAMES.items()}
        if bank_name not in banks:
            raise ValueError(f"unknown PCR bank {bank_name!r} (sha1, sha256, sha384, sha512)")
        pcrs: set[int] = set()
        for item in numbers.split(","):
            item = item.strip()
            low, _, high = item.partition("-")
            try:
                first, last = int(low, 0), int(high or low, 0)
            except ValueError:
                raise ValueError(f"not a PCR number: {item!r}") from None
            if not 0 <= first <= last < PCR_COUNT:
                raise ValueError(f"PCR {item} is outside 0..{PCR_COUNT - 1}")
            pcrs.update(range(first, last + 1))
        selections.append(PcrSelection(banks[bank_name], tuple(sorted(pcrs))))
    return selections


def marshal_selection(selections: Sequence[PcrSelection]) -> bytes:
    """TPML_PCR_SELECTION."""
    out = bytearray(struct.pack(">I", len(selections)))
    for selection in selections:
        bitmap = bytearray(SIZEOF_SELECT)
        for pcr in selection.pcrs:
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        out += struct.pack(">HB", int(selection.bank), SIZEOF_SELECT) + bitmap
    return bytes(out)


def unmarshal_selection(data: bytes) -> tuple[list[PcrSelection], int]:
    """(selections, bytes used) of a TPML_PCR_SELECTION at the start of `data`."""
    try:
        (count,) = struct.unpack_from(">I", data)
        pos = 4
        if count > 16:
            raise ValueError(f"{count} PCR banks")
        selections = []
        for _ in range(count):
            bank, size = struct.unpack_from(">HB", data, pos)
            pos += 3
            bitmap = data[pos:pos + size]
            if len(bitmap) != size or size > 4:
                raise ValueError("PCR bitmap cut short")
            pos += size
            try:
                hash_alg = Hash(bank)
            except ValueError:
                raise UnsupportedError(f"PCR bank 0x{bank:04x} is not supported") from None
            if hash_alg not in HASH_NAMES:
                raise UnsupportedError(f"PCR bank 0x{bank:04x} is not supported")
            pcrs = tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)
            selections.append(PcrSelection(hash_alg, pcrs))
    except struct.error:
        raise BadKeyError("the key's PCR policy is cut short") from None
    except ValueError as exc:
        raise BadKeyError(f"the key's PCR policy cannot be read: {exc}") from None
    return selections, pos


def mismatch(selections: Sequence[PcrSelection]) -> str:
    """What PolicyFailedError says when PolicyPCR refuses: the PCRs of the policy (the TPM
    checks only their digest, so with several PCRs it cannot say which one differs)."""
    one = len(selections) == 1 and len(selections[0].pcrs) == 1
    return (f"{'; '.join(s.describe() for s in selections)} "
            f"{'does' if one else 'do'} not match the key's policy")


def pcr_digest(values: Sequence[bytes], hash_alg: Hash = Hash.SHA256) -> bytes:
    """The PCR digest of PolicyPCR: the policy hash over the values in selection order."""
    return hashlib.new(HASH_NAMES[hash_alg], b"".join(values)).digest()


def pcr_step(selections: Sequence[PcrSelection], digest: bytes = b"") -> PolicyStep:
    """A PolicyPCR entry; without `digest`, a request for the current values."""
    return PolicyStep(CC_POLICY_PCR, marshal_selection(selections) + digest)


def auth_value_step() -> PolicyStep:
    return PolicyStep(CC_POLICY_AUTH_VALUE, b"")


def split_pcr_step(step: PolicyStep) -> tuple[list[PcrSelection], bytes]:
    """(selections, PCR digest) of a PolicyPCR entry; the digest may be empty."""
    selections, used = unmarshal_selection(step.command_policy)
    return selections, step.command_policy[used:]


# --- PolicyAuthorize -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Authorize:
    """The body of a PolicyAuthorize entry."""

    key_public: bytes  # TPMT_PUBLIC of the policy signing key (inside TPM2B_PUBLIC)
    policy_ref: bytes
    signature: bytes  # TPMT_SIGNATURE, marshalled; NULL in the key's own policy

    @property
    def key_name(self) -> bytes:
        """The key's TPM name: nameAlg, then the nameAlg hash of its TPMT_PUBLIC."""
        (name_alg,) = struct.unpack_from(">H", self.key_public, 2)
        try:
            hash_name = HASH_NAMES[Hash(name_alg)]
        except (ValueError, KeyError):
            raise UnsupportedError(f"policy key name hash 0x{name_alg:04x}") from None
        return struct.pack(">H", name_alg) + hashlib.new(hash_name, self.key_public).digest()

    def encode(self) -> bytes:
        return (struct.pack(">H", len(self.key_public)) + self.key_public
                + struct.pack(">H", len(self.policy_ref)) + self.policy_ref + self.signature)

    @classmethod
    def decode(cls, body: bytes) -> Authorize:
        try:
            (size,) = struct.unpack_from(">H", body)
            public = body[2:2 + size]
            (ref_size,) = struct.unpack_from(">H", body, 2 + size)
            ref = body[4 + size:4 + size + ref_size]
            signature = body[4 + size + ref_size:]
            if len(public) != size or len(ref) != ref_size or len(public) < 4 or (
                    len(signature) < 2):
                raise ValueError
        except (struct.error, ValueError):
            raise BadKeyError("the key's TPM2_PolicyAuthorize entry cannot be read") from None
        return cls(public, ref, signature)


def authorize_step(key_public: bytes, policy_ref: bytes = b"",
                   signature: bytes = struct.pack(">H", ALG_NULL)) -> PolicyStep:
    return PolicyStep(CC_POLICY_AUTHORIZE, Authorize(key_public, policy_ref,
                                                     signature).encode())


# Policy signing keys may be on P-256, P-384 or P-521.
_POLICY_KEY_CURVES = {c.pyca_name: c for c in (Curve.P256, Curve.P384, Curve.P521)}


def tpmt_public_of(public_key: object) -> bytes:
    """TPMT_PUBLIC of a software EC (P-256/384/521) or RSA public key (cryptography), as
    LoadExternal takes it to verify signatures: sign attribute, NULL scheme, SHA-256
    name."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    attributes = 0x00040000 | 0x00000040  # sign, userWithAuth
    head = struct.pack(">HI", int(Hash.SHA256), attributes) + struct.pack(">H", 0)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = _POLICY_KEY_CURVES.get(public_key.curve.name)
        if curve is None:
            raise UnsupportedError(f"policy keys on {public_key.curve.name} are not supported")
        size = (public_key.curve.key_size + 7) // 8
        numbers = public_key.public_numbers()
        x, y = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
        return (struct.pack(">H", 0x0023) + head
                + struct.pack(">HHHH", ALG_NULL, ALG_NULL, curve,
                              ALG_NULL)
                + struct.pack(">H", size) + x + struct.pack(">H", size) + y)
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers_rsa = public_key.public_numbers()
        exponent = 0 if numbers_rsa.e == 65537 else numbers_rsa.e
        modulus = numbers_rsa.n.to_bytes((public_key.key_size + 7) // 8, "big")
        return (struct.pack(">H", 0x0001) + head
                + struct.pack(">HHHI", ALG_NULL, ALG_NULL, public_key.key_size, exponent)
                + struct.pack(">H", len(modulus)) + modulus)
    raise UnsupportedError("a policy key is an EC or RSA key")


def sign_policy(private_key: object, approved: bytes, policy_ref: bytes = b"") -> bytes:
    """TPMT_SIGNATURE by `private_key` (cryptography EC or RSA) over
    SHA-256(approvedPolicy || policyRef), as TPM2_VerifySignature checks it for
    TPM2_PolicyAuthorize."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    a_hash = hashlib.sha256(approved + policy_ref).digest()
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = utils.decode_dss_signature(private_key.sign(a_hash, ec.ECDSA(prehashed)))
        size = (private_key.curve.key_size + 7) // 8
        return (struct.pack(">HH", ALG_ECDSA, int(Hash.SHA256))
                + struct.pack(">H", size) + r.to_bytes(size, "big")
                + struct.pack(">H", size) + s.to_bytes(size, "big"))
    if isinstance(private_key, rsa.RSAPrivateKey):
        sig = private_key.sign(a_hash, padding.PKCS1v15(), prehashed)
        return struct.pack(">HHH", ALG_RSASSA, int(Hash.SHA256), len(sig)) + sig
    raise UnsupportedError("a policy key is an EC or RSA key")


# --- digests ------------------------------------------------------------------------------

def check_steps(steps: Sequence[PolicyStep], name_alg: Hash = Hash.SHA256,
                *, digests_needed: bool = True) -> None:
    """UnsupportedError or BadKeyError unless the broker can replay every step."""
    if not steps:
        raise BadKeyError("the key's policy is an empty list")
    for step in steps:
        if step.command_code == CC_POLICY_PCR:
            selections, digest = split_pcr_step(step)
            if not selections or not any(s.pcrs for s in selections):
                raise BadKeyError("the key's PCR policy selects no PCR")
            want = hashlib.new(HASH_NAMES[name_alg]).digest_size
            if (digests_needed or digest) and len(digest) != want:
                raise BadKeyError(f"the key's PCR policy digest is {len(digest)} bytes, "
                                  f"not {want}")
        elif step.command_code == CC_POLICY_AUTH_VALUE:
            if step.command_policy:
                raise BadKeyError("TPM2_PolicyAuthValue in the key's policy has a body")
        elif step.command_code == CC_POLICY_AUTHORIZE:
            Authorize.decode(step.command_policy).key_name  # noqa: B018 (checks it)
        else:
            raise UnsupportedError(
                f"the key's policy uses {step.name}, which the broker does not replay "
                "(it replays TPM2_PolicyPCR, TPM2_PolicyAuthValue, TPM2_PolicyAuthorize)")


def policy_digest(steps: Sequence[PolicyStep], name_alg: Hash = Hash.SHA256) -> bytes:
    """The authPolicy a key made with these steps needs (TPM 2.0 Part 3, 23.x)."""
    check_steps(steps, name_alg)
    name = HASH_NAMES[name_alg]
    zeros = bytes(hashlib.new(name).digest_size)
    digest = zeros
    for step in steps:
        if step.command_code == CC_POLICY_AUTHORIZE:
            # PolicyUpdate(CC_PolicyAuthorize, keyName, policyRef) on a reset digest
            body = Authorize.decode(step.command_policy)
            digest = hashlib.new(name, zeros + struct.pack(">I", CC_POLICY_AUTHORIZE)
                                 + body.key_name).digest()
            digest = hashlib.new(name, digest + body.policy_ref).digest()
        else:
            digest = hashlib.new(name, digest + struct.pack(">I", step.command_code)
                                 + step.command_policy).digest()
    return digest


def signed_policy_steps(steps: Sequence[PolicyStep]
                        ) -> tuple[list[PolicyStep], Authorize]:
    """(the policy commands, the final PolicyAuthorize) of a signed policy; BadKeyError
    unless it ends in PolicyAuthorize and has it nowhere else."""
    if not steps or steps[-1].command_code != CC_POLICY_AUTHORIZE or any(
            s.command_code == CC_POLICY_AUTHORIZE for s in steps[:-1]):
        raise BadKeyError("a signed policy must end in TPM2_PolicyAuthorize, its only one")
    body = steps[:-1]
    if body:
        check_steps(body)
    return list(body), Authorize.decode(steps[-1].command_policy)


def approved_digest(steps: Sequence[PolicyStep], name_alg: Hash = Hash.SHA256) -> bytes:
    """The policyDigest a session holds after `steps` (what a policy key signs)."""
    return policy_digest(steps, name_alg) if steps else bytes(
        hashlib.new(HASH_NAMES[name_alg]).digest_size)


def needs_password(steps: Sequence[PolicyStep]) -> bool:
    return any(step.command_code == CC_POLICY_AUTH_VALUE for step in steps)


# --- the ASN.1 ------------------------------------------------------------------------------

def to_asn1(steps: Sequence[PolicyStep]) -> list[PolicyAsn1]:
    return [PolicyAsn1(command_code=s.command_code, command_policy=s.command_policy)
            for s in steps]


def from_asn1(entries: Sequence[PolicyAsn1]) -> list[PolicyStep]:
    steps = []
    for entry in entries:
        if not 0 <= entry.command_code <= 0xFFFFFFFF:
            raise BadKeyError(f"policy command code {entry.command_code} is not a TPM_CC")
        steps.append(PolicyStep(entry.command_code, bytes(entry.command_policy)))
    return steps


def encode_request(steps: Sequence[PolicyStep]) -> bytes:
    """The GENERATE request's policy field: DER SEQUENCE OF TPMPolicy."""
    return bytes(asn1.encode_der(_PolicyListAsn1(entries=to_asn1(steps))))


def decode_request(der: bytes) -> list[PolicyStep]:
    try:
        decoded = asn1.decode_der(_PolicyListAsn1, der)
    except (ValueError, TypeError) as exc:
        raise BadKeyError(f"the policy is not a DER SEQUENCE OF TPMPolicy: {exc}") from None
    return from_asn1(decoded.entries)
