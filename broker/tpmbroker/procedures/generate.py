"""GENERATE, the broker's half: a new key created in the TPM under its parent
(TPM2_Create through a pool session, which encrypts the key's password on its way in),
written as a TSS2 PRIVATE KEY; and what this TPM makes keys of."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_PUBLIC_PARMS,
    TPMU_PUBLIC_PARMS,
)

from .. import keypolicy, templates
from ..definitions import Hash, KeyType, Opcode, Usage, curve_name
from ..errors import UnsupportedError
from ..ops.base import member
from ..ops.generate import Generate, GenerateResult
from ..tpm import command
from ..tpm import keys as keymod
from ..tpm.objects import RECOVERABLE
from ..tpm.parents import refusal
from ..tpm.rc import classify, rc_name
from ..tpm.worker import TpmWorker
from . import parent_passwords
from .base import Request, serves
from .import_key import check_parent


@serves(Opcode.GENERATE)
def serve(request: Request, msg: Generate) -> None:
    key_type = member(KeyType, msg.key_type, "key type")
    usage = member(Usage, msg.usage, "usage")
    hash_alg = member(Hash, msg.hash, "hash") if msg.hash else None
    worker, deadline = request.worker, request.deadline
    request.submit(lambda: generate_key(worker, key_type, msg.param, msg.auth, msg.parent,
                                        deadline, usage=usage, hash_alg=hash_alg,
                                        parent_auth=msg.parent_auth,
                                        peer=request.peer_uid, policy=msg.policy),
                   lambda made: GenerateResult(*made))


def generate_key(tpm: TpmWorker, key_type: KeyType, param: int, auth: bytes, parent: int,
                 deadline: float, usage: Usage = Usage.DEFAULT,
                 hash_alg: Hash | None = None, *, parent_auth: bytes = b"",
                 peer: int = -1, policy: bytes = b"") -> tuple[bytes, bytes]:
    """A new key under `parent`; with `policy` (DER SEQUENCE OF TPMPolicy, see
    tpm/keypolicy.py) its authPolicy is that policy's digest and the key file carries
    the policy."""
    template = keymod.generation_template(key_type, param, password=bool(auth),
                                          usage=usage, hash_alg=hash_alg)
    steps = keypolicy.decode_request(policy) if policy else []
    if steps and hash_alg not in (None, Hash.SHA256):
        # Policies are replayed on SHA-256 policy sessions: the key's nameAlg must match.
        raise UnsupportedError("a key with a policy has a SHA-256 name; leave its hash out")
    if steps:
        keypolicy.check_steps(steps, digests_needed=False)
        if bool(auth) != keypolicy.needs_password(steps):
            raise UnsupportedError(
                "a key with a policy and a password needs TPM2_PolicyAuthValue in its "
                "policy, and one without a password must not have it")
        steps = tpm.run(deadline, "reading the PCRs",
                        lambda: fill_pcr_digests(tpm, steps))
        # The policy alone authorizes the key: without userWithAuth its password
        # cannot stand in for the policy.
        template.authPolicy = keypolicy.policy_digest(steps)
        template.objectAttributes &= ~TPMA_OBJECT.USERWITHAUTH
    parent = check_parent(parent)
    tpm.run(deadline, "asking the TPM about the key's algorithm",
            lambda: check_tpm_has(tpm, key_type, param))
    if len(auth) > keymod.auth_limit(template):
        raise UnsupportedError(f"a password is at most {keymod.auth_limit(template)} bytes: "
                               "the digest size of the key's name hash "
                               f"({(hash_alg or Hash.SHA256).name})")
    parent_passwords.check_length(parent, parent_auth)
    create_auth = parent_passwords.load_auth(parent, parent_auth)
    parent_passwords.owner_auth(tpm, parent, parent_auth, deadline)
    sensitive = TPM2B_SENSITIVE_CREATE()
    if auth:
        sensitive.sensitive.userAuth = auth
    in_public = TPM2B_PUBLIC(publicArea=template)

    def create() -> tuple[Any, Any]:
        parent_tr = tpm.objects.parent(parent)
        handle, name = tpm.objects.handle_and_name(parent_tr)
        # The pool session encrypts the new key's password on its way to the TPM, and
        # proves the parent's password by its HMAC alone.
        try:
            return tpm.objects.with_room(None, lambda: tpm.execute(
                deadline, lambda session: command.prepare_create(
                    session, handle, name, create_auth, sensitive, in_public),
                command.create_result), parent_tr)
        except TSS2_Exception as exc:
            refused = refusal(exc, parent, create_auth, "TPM2_Create")
            if refused is not None:
                raise refused from None
            raise

    private, public = parent_passwords.attempt(
        tpm, parent, create_auth, peer, deadline,
        lambda: tpm.run(deadline, "creating the key", create))
    key = keymod.tss2_key_der(private, public, empty_auth=not auth, parent=parent,
                              policy=steps)
    return key, bytes(public.publicArea.to_der())


def fill_pcr_digests(tpm: TpmWorker, policy: Sequence[keypolicy.PolicyStep]
                     ) -> list[keypolicy.PolicyStep]:
    """The policy with each PolicyPCR that names no values given the PCRs' current
    ones (TPM2_PCR_Read)."""
    filled = []
    for step in policy:
        if step.command_code == keypolicy.CC_POLICY_PCR:
            selections, digest = keypolicy.split_pcr_step(step)
            if not digest:
                wanted = keypolicy.marshal_selection(selections)
                answered, values = command.pcr_read(tpm.link.require(), wanted)
                if answered != wanted:
                    raise UnsupportedError("the TPM does not have all of "
                                           + "; ".join(s.describe() for s in selections))
                step = keypolicy.pcr_step(selections, keypolicy.pcr_digest(values))
        filled.append(step)
    keypolicy.check_steps(filled)
    return filled


# --- what this TPM has -------------------------------------------------------------------

def check_tpm_has(tpm: TpmWorker, key_type: KeyType, param: int) -> None:
    """UnsupportedError with the TPM's reason unless the TPM makes such keys."""
    if key_type is KeyType.EC:
        if param not in tpm_curves(tpm):
            raise UnsupportedError(f"this TPM has no curve {curve_name(param)} "
                                   "(TPM2_GetCapability TPM_CAP_ECC_CURVES does not list "
                                   "it; `tpmbroker status` lists tpm_curves)")
        return
    rc = rsa_size_rc(tpm, param)
    if rc is not None:
        raise UnsupportedError(f"this TPM has no RSA-{param} (TPM2_TestParms: "
                               f"{rc_name(rc)}); `tpmbroker status` lists the sizes "
                               "it has (tpm_rsa_bits)", tpm_rc=rc)


def tpm_curves(tpm: TpmWorker) -> list[int]:
    """The curve ids this TPM has (TPM2_GetCapability), asked once."""
    def ask() -> list[int]:
        _, data = tpm.link.ectx.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
        return [int(curve) for curve in data.data.eccCurves]

    return tpm.fact("curves", ask)


def rsa_size_rc(tpm: TpmWorker, bits: int) -> int | None:
    """None if the TPM has RSA keys of `bits`, else the TPM's TestParms error code
    (asked once per size)."""
    def ask() -> int | None:
        parms = TPMT_PUBLIC_PARMS(type=TPM2_ALG.RSA, parameters=TPMU_PUBLIC_PARMS(
            rsaDetail=templates.rsa_parms(bits)))
        try:
            tpm.link.ectx.test_parms(parms)
        except TSS2_Exception as exc:
            if classify(exc) in RECOVERABLE:
                raise
            return int(exc.rc)
        return None

    return tpm.fact(f"rsa-{bits}", ask)


def algorithms(tpm: TpmWorker) -> dict[str, object]:
    """Curves and RSA sizes this TPM makes keys of, for STATUS (asked once)."""
    if not tpm.link.up:
        return {}
    try:
        curves = tpm_curves(tpm)
        rsa = [bits for bits in keymod.RSA_SIZES if rsa_size_rc(tpm, bits) is None]
    except TSS2_Exception:
        return {}
    return {"tpm_curves": [curve_name(curve) for curve in curves], "tpm_rsa_bits": rsa}


