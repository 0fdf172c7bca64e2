"""What KEYS says about a persistent object or a key the broker holds (no TPM I/O)."""

from __future__ import annotations

from typing import Any

from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT

from ..definitions import Curve, Hash, curve_name
from .keys import CachedKey

# TPMA_OBJECT bits, spelt as tpm2-tools spells them (tpm2_create -a, tpm2_print).
ATTRIBUTES = (
    (TPMA_OBJECT.FIXEDTPM, "fixedtpm"),
    (TPMA_OBJECT.STCLEAR, "stclear"),
    (TPMA_OBJECT.FIXEDPARENT, "fixedparent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitivedataorigin"),
    (TPMA_OBJECT.USERWITHAUTH, "userwithauth"),
    (TPMA_OBJECT.ADMINWITHPOLICY, "adminwithpolicy"),
    (TPMA_OBJECT.NODA, "noda"),
    (TPMA_OBJECT.ENCRYPTEDDUPLICATION, "encryptedduplication"),
    (TPMA_OBJECT.RESTRICTED, "restricted"),
    (TPMA_OBJECT.DECRYPT, "decrypt"),
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),
)
_TYPES = {int(TPM2_ALG.ECC): "EC", int(TPM2_ALG.RSA): "RSA",
          int(TPM2_ALG.KEYEDHASH): "KEYEDHASH", int(TPM2_ALG.SYMCIPHER): "SYMCIPHER"}


def attribute_names(attributes: int) -> list[str]:
    return [name for bit, name in ATTRIBUTES if attributes & int(bit)]


def _hash_name(alg: int) -> str:
    try:
        return Hash(alg).hashlib_name
    except ValueError:
        return f"0x{alg:04x}"




def describe_object(handle: int, public: Any, name: bytes) -> dict[str, object]:
    """One persistent object (its TPMT_PUBLIC and Name) as KEYS lists it."""
    kind = int(public.type)
    out: dict[str, object] = {
        "handle": f"0x{handle:08x}",
        "type": _TYPES.get(kind, f"0x{kind:04x}"),
        "attributes": attribute_names(int(public.objectAttributes)),
        "policy": len(bytes(public.authPolicy)) > 0,  # an authPolicy must be satisfied
        "name_alg": _hash_name(int(public.nameAlg)),
        "name": name.hex(),
    }
    if kind == int(TPM2_ALG.ECC):
        out["curve"] = curve_name(int(public.parameters.eccDetail.curveID))
    elif kind == int(TPM2_ALG.RSA):
        out["bits"] = int(public.parameters.rsaDetail.keyBits)
    return out


def describe_loaded(entry: CachedKey) -> dict[str, object]:
    """One key the worker knows (LOADed by some connection) as KEYS lists it."""
    info = entry.info
    out: dict[str, object] = {
        "key_id": info.key_id.hex(),
        "type": info.key_type.name,
        "bits": info.bits,
        "resident": entry.handle is not None,  # in the TPM now (else loaded on next use)
        "attributes": attribute_names(int(entry.public.objectAttributes)),
    }
    if info.curve != Curve.NONE:
        out["curve"] = curve_name(info.curve)
    if entry.blob is not None:
        out["source"] = "file"
        out["parent"] = f"0x{entry.blob.parent:08x}"
    else:
        out["source"] = "handle"
        out["handle"] = f"0x{entry.persistent_handle:08x}"
    return out
