"""tpm2-pkcs11's token set-up says what went wrong, in the tool's own words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import pkcs11


@pytest.mark.skipif(pkcs11.missing() is not None, reason=str(pkcs11.missing()))
def test_a_failing_tpm2_ptool_shows_its_error(tmp_path: Path) -> None:
    # No tpm2-abrmd answers on this bus: tpm2_ptool init really fails, as it did when
    # tpm2-abrmd's connection table was full.
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    token = pkcs11.Token("tabrmd:bus_name=com.intel.tss2.Tabrmd.none,bus_type=session", env,
                         tmp_path)
    with pytest.raises(RuntimeError) as failed:
        token.start()
    token.stop()
    message = str(failed.value)
    assert message.startswith("tpm2_ptool init exited 1: "), message
    assert "tcti" in message.lower(), message  # tpm2_ptool's own words, not just a status
