"""CERTIFY, the broker's half: a key attestation statement (tpmbroker.attestation).

The attestation key (AK) is a restricted signing primary of the endorsement hierarchy,
made from its template for each statement and flushed after (the same key each time: it
derives from the endorsement seed). The first time the broker meets an AK it binds it
to the verified EK by credential activation: it makes a credential for the AK's Name
to the EK's public key (TPM2_MakeCredential in software, as a CA would) and asks the
TPM to activate it; only the TPM holding that EK, with that AK loaded, recovers the
secret. Then the broker's attestation CA issues the AK's certificate, kept for the
broker's life. Each statement after takes one TPM2_Certify, authorized by a pool
session (the key's password in its HMAC) and the AK's empty password: no extra session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE
from tpm2_pytss.utils import make_credential

from .. import attestation, ek_trust
from ..definitions import MAX_CHALLENGE, Opcode
from ..ek_trust import VERIFIED_BY_CERTIFICATE
from ..errors import BadKeyError, TpmError, UnsupportedError
from ..ops.certify import Certify, CertifyResult
from ..tpm import certification, command, endorsement
from ..tpm.keys import CachedKey
from ..tpm.session_crypto import SessionState
from ..tpm.worker import TpmWorker
from .base import Request, serves

DER = serialization.Encoding.DER


@serves(Opcode.CERTIFY)
def serve(request: Request, msg: Certify) -> None:
    auth = request.key_auth(msg.key_id)
    if len(msg.challenge) > MAX_CHALLENGE:
        raise UnsupportedError(f"a challenge of {len(msg.challenge)} bytes: at most "
                               f"{MAX_CHALLENGE} (MAX_CHALLENGE)")
    worker, deadline, peer = request.worker, request.deadline, request.peer_uid
    key_id, challenge = msg.key_id, msg.challenge
    worker.check_password(key_id, auth, peer)

    def served(statement: bytes) -> CertifyResult:
        request.count("attestations")
        return CertifyResult(statement)

    request.submit(lambda: certify(worker, key_id, auth, challenge, deadline, peer), served)


@dataclasses.dataclass
class _Issued:
    """What the attestation CA issued for one AK, after its credential activation."""

    ek_certificate: bytes
    ca_certificate: bytes
    ak_certificate: bytes


@dataclasses.dataclass
class _Attestation:
    """What the attestation CA issued, by AK Name, for the broker's life."""

    issued: dict[bytes, _Issued] = dataclasses.field(default_factory=dict)


def certify(tpm: TpmWorker, key_id: bytes, auth: bytes, challenge: bytes, deadline: float,
            peer: int = -1) -> bytes:
    """The attestation statement of the key LOADed as `key_id`, over `challenge`."""
    entry = tpm.loaded(key_id)
    missing = attestation.resident_missing(int(entry.public.objectAttributes))
    if missing:
        raise BadKeyError(
            "the key cannot be attested as resident in this TPM: it lacks "
            + ", ".join(missing) + (" (a key made outside the TPM and imported or "
                                    "wrapped into it)" if "sensitiveDataOrigin" in missing
                                    else "") + "; make the key in the TPM (keygen)")
    if entry.policy or entry.public.objectAttributes & TPMA_OBJECT.ADMINWITHPOLICY:
        raise UnsupportedError("keys with a policy cannot be attested yet")
    identity = tpm.identity
    if identity is None or identity.mode != VERIFIED_BY_CERTIFICATE:
        raise UnsupportedError(
            "attestation needs the TPM's identity verified by its EK certificate (serve "
            "--ek-ca): the statement carries that certificate, and the attestation key is "
            "bound to that EK")
    return tpm.run(deadline, "attesting the key",
                   functools.partial(_certify_once, tpm, entry, auth, challenge, deadline, peer))


def _certify_once(tpm: TpmWorker, entry: CachedKey, auth: bytes, challenge: bytes,
                  deadline: float, peer: int) -> bytes:
    state: _Attestation = tpm.fact("attestation", _Attestation)
    ectx = tpm.link.ectx
    ak, ak_public = tpm.objects.with_room(entry, functools.partial(
        _create_primary, ectx, attestation.ak_template()))
    try:
        ak_name = attestation.name_of(ak_public)
        issued = state.issued.get(ak_name)
        if issued is None:
            issued = _bind(tpm, state, ak, ak_public, ak_name, deadline)
        ak_handle = int(ectx.tr_get_tpm_handle(ak))
        qualifying = hashlib.sha256(challenge).digest()

        def certify(session: SessionState) -> command.PendingCommand:
            # The key named once the session is taken: starting one may need its slot.
            key_handle, key_name = tpm.objects.handle_and_name(tpm.objects.resident(entry))
            return certification.prepare_certify(session, key_handle, key_name, auth, ak_handle,
                                           ak_name, qualifying)

        cert_info, signature = tpm.with_password(
            entry, auth, peer, deadline,
            lambda: tpm.execute(deadline, certify, certification.certify_result))
    finally:
        with contextlib.suppress(TSS2_Exception):
            ectx.flush_context(ak)
    return attestation.make_statement(
        cert_info=cert_info, signature=command.signature_bytes(signature),
        pub_area=bytes(entry.public.marshal()), ak_pub_area=bytes(ak_public.marshal()),
        ak_cert=issued.ak_certificate, ca_cert=issued.ca_certificate,
        ek_certs=[issued.ek_certificate], att_to_be_signed=challenge)


def _create_primary(ectx: Any, template: Any) -> tuple[Any, Any]:
    """A primary of the endorsement hierarchy (its authValue empty, as the EK's): the
    AK, or the attestation CA's key. (ESYS_TR, TPMT_PUBLIC)."""
    handle, public, *_ = ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template), ESYS_TR.ENDORSEMENT)
    return handle, public.publicArea


# The EKs whose policy is TPM2_PolicySecret(endorsement) alone, with SHA-256 (TCG EK
# Credential Profile, low range): a credential is activated with them. The high-range
# EKs' policies are a PolicyOR with a branch on an NV index.
ACTIVATION_KINDS = {"EK-ECC256": endorsement.NV_EK_ECC256,
                    "EK-RSA2048": endorsement.NV_EK_RSA2048}


def _bind(tpm: TpmWorker, state: _Attestation, ak: Any, ak_public: Any,
          ak_name: bytes, deadline: float) -> _Issued:
    """Credential activation of the AK against a verified EK, then its certificate."""
    ek_der, ek_cert, ek, ek_public, made = _activation_ek(tpm)
    try:
        secret = os.urandom(32)
        blob, encrypted_secret = make_credential(TPM2B_PUBLIC(publicArea=ek_public),
                                                 secret, TPM2B_NAME(
                                                     attestation.name_of(ak_public)))
        recovered = certification.activate_credential(tpm.link.ectx, ak, ek, blob,
                                                encrypted_secret)
    finally:
        if made:
            with contextlib.suppress(TSS2_Exception):
                tpm.link.ectx.flush_context(ek)
    if not hmac.compare_digest(recovered, secret):
        raise TpmError("the TPM did not recover the attestation key's credential: the "
                       "attestation key is not in the TPM of the verified EK")
    ca, ca_public = tpm.objects.with_room(None, functools.partial(
        _create_primary, tpm.link.ectx, attestation.ca_template()))
    try:
        signer = _TpmSigner(tpm, ca, ca_public, deadline)
        ca_cert = attestation.ca_certificate(signer, ek_cert)
        ak_cert = attestation.ak_certificate(signer, ca_cert, ek_cert, ak_public)
    finally:
        with contextlib.suppress(TSS2_Exception):
            tpm.link.ectx.flush_context(ca)
    issued = _Issued(ek_der, ca_cert.public_bytes(DER), ak_cert.public_bytes(DER))
    state.issued[ak_name] = issued
    return issued


class _TpmSigner(ec.EllipticCurvePrivateKey):
    """The attestation CA's key in the TPM, as cryptography's certificate builder signs
    with it: TPM2_Sign of the digest through a pool session."""

    def __init__(self, tpm: TpmWorker, handle: Any, public: Any, deadline: float) -> None:
        self._tpm, self._public, self._deadline = tpm, public, deadline
        self._handle = int(tpm.link.ectx.tr_get_tpm_handle(handle))
        self._name = attestation.name_of(public)

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm.algorithm, hashes.SHA256):
            raise UnsupportedError("the attestation CA signs with SHA-256")
        digest = hashlib.sha256(data).digest()
        return self._tpm.execute(self._deadline,
                                 lambda session: command.prepare_sign(
                                     session, self._handle, self._name, b"", digest,
                                     command.ALG_ECDSA, int(TPM2_ALG.SHA256)),
                                 command.signature_bytes)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = attestation.public_key_of(self._public)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey
                 ) -> bytes:
        raise UnsupportedError("the attestation CA's key only signs")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise UnsupportedError("the attestation CA's key never leaves the TPM")

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption,
                      ) -> bytes:
        raise UnsupportedError("the attestation CA's key never leaves the TPM")

    def __copy__(self) -> _TpmSigner:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TpmSigner:
        return self


def _activation_ek(tpm: TpmWorker) -> tuple[bytes, x509.Certificate, Any, Any, bool]:
    """A low-range EK of this TPM whose certificate chains to the broker's anchors and
    certifies the key the TPM makes now: (certificate DER and object, ESYS_TR, its
    TPMT_PUBLIC, whether it was made here and is to be flushed). The verified EK
    sessions are salted to, when it is one of these."""
    transport = tpm.link.require()
    verified = tpm.objects.endorsement
    refusals = []
    for kind, index in ACTIVATION_KINDS.items():
        ek_der = endorsement.nv_read(transport, index)
        if ek_der is None:
            continue
        try:
            ek_cert = ek_trust.verify_ek_certificate(ek_der, tpm.trust.anchors)
        except ek_trust.EkTrustError as exc:
            refusals.append(f"{kind}: {exc}")
            continue
        if verified is not None and verified.identity.kind == kind:
            handle, public, made = tpm.objects.endorsement_key(), verified.public, False
        else:
            template = endorsement.template(kind, transport)
            handle, public = tpm.objects.with_room(
                None, functools.partial(endorsement.create, tpm.link.ectx, template))
            made = True
        try:
            ek_trust.check_certified_key(ek_cert, endorsement.spki(public))
        except ek_trust.EkTrustError as exc:
            if made:
                with contextlib.suppress(TSS2_Exception):
                    tpm.link.ectx.flush_context(handle)
            raise TpmError(f"{kind}: {exc}") from None
        return ek_der, ek_cert, handle, public, made
    raise UnsupportedError(
        "attestation needs an EK certificate of the low range (RSA 2048 at NV "
        "0x01c00002 or ECC P-256 at 0x01c0000a) that chains to the --ek-ca anchors"
        + (": " + "; ".join(refusals) if refusals else ""))
