"""Key attestation end to end: CERTIFY against swtpm with EK certificates from a local
CA (tests/tpmfixtures.py CertifiedTpm), the statement checked offline by
tpmbroker.attestation.verify and `tpmbroker attest --verify`, and refused after each of
its fields is tampered with."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpmbroker import attestation
from tpmbroker.attestation import AttestationError, verify
from tpmbroker.client import Client
from tpmbroker.ek_trust import load_anchors
from tpmbroker.errors import BadKeyError, UnsupportedError
from tpmbroker.keyfile import der_to_pem
from tpmbroker.protocol import Curve, KeyType
from tpmbroker.simulator import Swtpm

from .tpmfixtures import Broker, CertifiedTpm, running_swtpm

TPMBROKER = [sys.executable, "-m", "tpmbroker.cli"]
CHALLENGE = b"a fresh challenge from the CA"


class Attested:
    """One genuine statement, made once for the module, and what checks it."""

    def __init__(self, statement: bytes, anchors: Path, public_key: bytes) -> None:
        self.statement = statement
        self.anchors_path = anchors
        self.anchors = load_anchors(anchors)
        self.public_key = public_key


@pytest.fixture(scope="module")
def verified_broker(certified_tpm: CertifiedTpm,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    base = tmp_path_factory.mktemp("attest")
    with running_swtpm(certified_tpm.copy(base / "tpm")) as tpm:
        with Broker(tpm.tcti, base / "broker",
                    extra_args=("--ek-ca", str(certified_tpm.anchors))) as broker:
            yield broker


@pytest.fixture(scope="module")
def attested(verified_broker: Broker, certified_tpm: CertifiedTpm) -> Attested:
    with Client(verified_broker.socket) as client:
        der, _ = client.generate_key(KeyType.EC, Curve.P256)
        key = client.load_key(der_to_pem(der))
        statement = client.attest(key, CHALLENGE)
    return Attested(statement, certified_tpm.anchors, key.public_key)


def test_a_tpm_key_is_attested_and_verified_offline(attested: Attested) -> None:
    verified = verify(attested.statement, attested.anchors, challenge=CHALLENGE)
    assert verified.public_key == attested.public_key
    assert verified.ek.startswith("sha256:")
    assert "swtpm-localca" in verified.ek_issuer
    doc = json.loads(attested.statement)
    assert doc["fmt"] == "tpm"
    assert set(doc["attStmt"]) == {"ver", "alg", "x5c", "sig", "certInfo", "pubArea"}
