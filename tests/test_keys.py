"""Key templates in tpm/keys.py, without a TPM."""

from __future__ import annotations

import pytest
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT

from tpmbroker.templates import storage_parent_template


@pytest.mark.parametrize("rsa", [False, True])
def test_storage_parent_template_is_tpm2_pytss_own(rsa: bool) -> None:
    """Keys made by tpm2-pytss name its storage primary as parent; ours must be identical,
    byte for byte, or such keys fail to load (and ours fail to load there).

    tpm2-pytss offers these templates only under private names. They are imported here,
    and only here, as the oracle that catches a divergence after a tpm2-pytss upgrade.
    """
    from tpm2_pytss.tsskey import _parent_ecc_template, _parent_rsa_template

    theirs = _parent_rsa_template if rsa else _parent_ecc_template
    assert storage_parent_template(rsa).marshal() == theirs.marshal()


@pytest.mark.parametrize("rsa", [False, True])
def test_storage_parent_template_fields(rsa: bool) -> None:
    template = storage_parent_template(rsa)
    assert template.nameAlg == TPM2_ALG.SHA256
    assert int(template.objectAttributes) == int(
        TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
    assert len(template.authPolicy) == 0
    if rsa:
        assert template.type == TPM2_ALG.RSA
        details = template.parameters.rsaDetail
        assert details.keyBits == 2048 and details.exponent == 0
        assert len(template.unique.rsa) == 0
    else:
        assert template.type == TPM2_ALG.ECC
        details = template.parameters.eccDetail
        assert details.curveID == TPM2_ECC.NIST_P256
        assert details.kdf.scheme == TPM2_ALG.NULL
        assert len(template.unique.ecc.x) == 0 and len(template.unique.ecc.y) == 0
    assert details.scheme.scheme == TPM2_ALG.NULL
    assert details.symmetric.algorithm == TPM2_ALG.AES
    assert details.symmetric.keyBits.aes == 128
    assert details.symmetric.mode.aes == TPM2_ALG.CFB
    assert storage_parent_template(rsa).marshal() == template.marshal()  # a fresh object
