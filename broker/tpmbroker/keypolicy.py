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

The key's authPolicy is the digest of the entries in order, starting from zeros
(TPM 2.0 Part 3, each command's policyDigest update), with the key's name hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from typing import Annotated

from cryptography.hazmat import asn1

from .definitions import Hash
from .errors import BadKeyError, UnsupportedError

CC_POLICY_PCR = 0x0000017F
CC_POLICY_AUTH_VALUE = 0x0000016B
CC_POLICY_RESTART = 0x00000180
PCR_COUNT = 24
SIZEOF_SELECT = 3
COMMAND_NAMES = {CC_POLICY_PCR: "TPM2_PolicyPCR", CC_POLICY_AUTH_VALUE: "TPM2_PolicyAuthValue"}
HASH_NAMES = {Hash.SHA1: "sha1", Hash.SHA256: "sha256", Hash.SHA384: "sha384",
              Hash.SHA512: "sha512"}


@asn1.sequence
class PolicyAsn1:
    """TPMPolicy ::= SEQUENCE { commandCode [0] EXPLICIT INTEGER,
    commandPolicy [1] EXPLICIT OCTET STRING }"""

    command_code: Annotated[int, asn1.Explicit(0)]
    command_policy: Annotated[bytes, asn1.Explicit(1)]


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
        else:
            raise UnsupportedError(
                f"the key's policy uses {step.name}, which the broker does not replay "
                "(it replays TPM2_PolicyPCR and TPM2_PolicyAuthValue)")


def policy_digest(steps: Sequence[PolicyStep], name_alg: Hash = Hash.SHA256) -> bytes:
    """The authPolicy a key made with these steps needs (TPM 2.0 Part 3, 23.x)."""
    check_steps(steps, name_alg)
    name = HASH_NAMES[name_alg]
    digest = bytes(hashlib.new(name).digest_size)
    for step in steps:
        digest = hashlib.new(name, digest + struct.pack(">I", step.command_code)
                             + step.command_policy).digest()
    return digest


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
