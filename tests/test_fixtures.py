"""The fixtures are real: a TPM that answers, a resource manager in front of it."""

from __future__ import annotations

import subprocess

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT, TPM2_PT_HR, TPM2_SE
from tpm2_pytss.types import TPM2B_NONCE, TPMT_SYM_DEF

from tpmbroker.simulator import Swtpm

from .tpmfixtures import Abrmd


def _pt(ectx: ESAPI, prop: int) -> int:
    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
    (entry,) = data.data.tpmProperties
    assert entry.property == prop
    return int(entry.value)


def _exercise(tcti: TCTILdr) -> None:
    with ESAPI(tcti) as ectx:
        assert _pt(ectx, TPM2_PT.ACTIVE_SESSIONS_MAX) >= 3
        before = _pt(ectx, TPM2_PT_HR.ACTIVE)
        session = ectx.start_auth_session(
            tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), auth_hash=TPM2_ALG.SHA256,
            nonce_caller=TPM2B_NONCE(b"\x01" * 16))
        assert _pt(ectx, TPM2_PT_HR.ACTIVE) == before + 1
        ectx.flush_context(session)
        assert _pt(ectx, TPM2_PT_HR.ACTIVE) == before


def test_swtpm_is_a_real_tpm(swtpm: Swtpm) -> None:
    _exercise(TCTILdr.parse(swtpm.tcti))


def test_abrmd_fronts_the_swtpm(abrmd: Abrmd) -> None:
    _exercise(TCTILdr.parse(abrmd.tcti))


def test_swtpm_stops_with_its_fixture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tpm = Swtpm(tmp_path / "s").start()
    pid = tpm.pid
    tpm.stop()
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
