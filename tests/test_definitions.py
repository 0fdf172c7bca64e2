"""The C side's shared numbers against broker/tpmbroker/definitions.py, and every number
having its place on both sides (ops table, error classes, golden frames)."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

import build_provider
from tpmbroker import definitions as d
from tpmbroker import errors
from tpmbroker import protocol as p

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def c_view(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    build_provider.write_definitions_header()
    exe = tmp_path_factory.mktemp("definitions") / "definitions_test"
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-I",
                    str(ROOT / "provider"), "-o", str(exe),
                    str(ROOT / "tests" / "definitions_test.c"),
                    str(ROOT / "provider" / "wire.c")], check=True, capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True,
                          text=True).stdout.splitlines()


def test_the_header_on_disk_is_generated_from_the_definitions() -> None:
    build_provider.write_definitions_header()
    assert (ROOT / "provider" / "definitions.h").read_text() == d.c_header()


def test_c_enums_match_python(c_view: list[str]) -> None:
    expected = [f"{group} {member.name} {int(member)}"
                for group, enum in d.SHARED_ENUMS for member in enum]
    assert [line for line in c_view if line.split()[0] != "NAME"
            and line.split()[0] != "CONST"] == expected


def test_c_constants_match_python(c_view: list[str]) -> None:
    consts = {line.split()[1]: int(line.split()[2]) for line in c_view
              if line.startswith("CONST ")}
    assert consts == dict(d.SHARED_CONSTANTS)


def test_c_status_names_match_python(c_view: list[str]) -> None:
    names = [line.split()[1:] for line in c_view if line.startswith("NAME ")]
    assert names == [[str(int(s)), s.name] for s in d.Status]


def test_every_opcode_has_its_messages_and_a_procedure() -> None:
    importlib.import_module("tpmbroker.ops")
    assert set(p.REQUESTS) == set(p.RESULTS) == set(d.Opcode)
    for opcode in d.Opcode:
        assert p.REQUESTS[opcode].OPCODE == opcode == p.RESULTS[opcode].OPCODE
    from tpmbroker import procedures

    assert set(procedures.SERVE) == set(d.Opcode)


def test_every_status_has_an_exception_class() -> None:
    for status in d.Status:
        if status is d.Status.OK:
            continue
        exc = errors.error_for_status(status, "m")
        assert exc.status == status and type(exc) is not errors.TpmBrokerError, status
