"""Authoring key policies (docs/keys.md): the PolicyPCR step `--pcr-lock` and
`--pcr-values` ask for, the policy key `--auth-policy` names, the policy `keygen` sends
with GENERATE, and signed policies added to a key file (`tpmbroker policy sign`).

Needs no TPM and no broker, so a signing machine can do it. What the policies mean and
how their digests are computed is keypolicy.py's; the key file is keyfile.py's. Errors
are ValueError, in words naming the option; OptionError when the option's value itself
is wrong (the command then exits 2, as for any bad argument).
"""

from __future__ import annotations

from pathlib import Path

from . import keypolicy
from .errors import TpmBrokerError


class OptionError(ValueError):
    """An option's value cannot be used: the message names the option and the fix."""


def pcr_step(pcr_lock: str, pcr_values: str | None, required: bool) -> keypolicy.PolicyStep:
    """The PolicyPCR step of --pcr-lock/--pcr-values; without values, a request for the
    PCRs' current ones (GENERATE fills them in) unless `required`."""
    try:
        selections = keypolicy.parse_pcr_lock(pcr_lock)
    except ValueError as exc:
        raise OptionError(f"--pcr-lock: {exc}") from None
    digest = b""
    if pcr_values is None and required:
        raise OptionError(f"--pcr-values: give the values the policy allows (read them with "
                          f"`tpmbroker pcrread {pcr_lock}`, or compute them for a new boot)")
    if pcr_values is not None:
        wanted = sum(len(s.pcrs) for s in selections)
        try:
            values = [bytes.fromhex(v.strip()) for v in pcr_values.split(",")]
        except ValueError:
            raise OptionError(f"--pcr-values {pcr_values!r}: give the PCR values in hex, "
                              f"comma-separated (`tpmbroker pcrread {pcr_lock}` prints "
                              "them)") from None
        if len(values) != wanted:
            raise OptionError(f"--pcr-values: {len(values)} values for {wanted} PCRs: give "
                              "one per PCR of --pcr-lock, in PCR order")
        for selection, value in zip((s for s in selections for _ in s.pcrs), values,
                                    strict=True):
            if len(value) != selection.bank.digest_size:
                raise OptionError(f"--pcr-values: a {selection.bank.name.lower()} PCR value"
                                  f" is {selection.bank.digest_size} bytes "
                                  f"({2 * selection.bank.digest_size} hex digits)")
        digest = keypolicy.pcr_digest(values)
    return keypolicy.pcr_step(selections, digest)


def policy_public(path: str) -> bytes:
    """TPMT_PUBLIC of the policy key in `path`: a PEM public key, or the private key.
    ValueError naming `path` if it is neither; OSError if it cannot be read."""
    from cryptography.hazmat.primitives import serialization

    data = Path(path).read_bytes()
    try:
        public: object = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            public = serialization.load_pem_private_key(data, None).public_key()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a PEM EC or RSA key: {exc}") from None
    try:
        return keypolicy.tpmt_public_of(public)
    except TpmBrokerError as exc:
        raise ValueError(f"{path}: {exc}") from None


def keygen_policy(auth_policy: str | None, pcr_lock: str | None, pcr_values: str | None,
                  password: bool) -> bytes:
    """The GENERATE policy field for --auth-policy, or --pcr-lock / --pcr-values; a
    password with a policy adds TPM2_PolicyAuthValue (as create_tpm2_key does)."""
    if auth_policy is not None:
        if pcr_lock is not None:
            raise ValueError("with --auth-policy, PCR locks go into the signed policies "
                             "(tpmbroker policy sign --pcr-lock)")
        steps = [keypolicy.authorize_step(policy_public(auth_policy))]
    elif pcr_lock is None:
        if pcr_values is not None:
            raise ValueError("--pcr-values goes with --pcr-lock")
        return b""
    else:
        steps = [pcr_step(pcr_lock, pcr_values, required=False)]
    if password:
        steps.append(keypolicy.auth_value_step())
    return keypolicy.encode_request(steps)


def signed_policy(signer: object, body: list[keypolicy.PolicyStep]
                  ) -> list[keypolicy.PolicyStep]:
    """`body` (none: any state) and the TPM2_PolicyAuthorize that carries its signature by
    `signer`, the policy key's private key (cryptography EC or RSA): what a key file's
    authPolicy holds (keypolicy.add_signed_policy)."""
    approved = keypolicy.approved_digest(body)
    public = keypolicy.tpmt_public_of(signer.public_key())  # type: ignore[attr-defined]
    signature = keypolicy.sign_policy(signer, approved)
    return [*body, keypolicy.authorize_step(public, b"", signature)]
