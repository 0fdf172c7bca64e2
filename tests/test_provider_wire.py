"""provider/wire.c against the golden frames the Python codec is tested with."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tpmbroker import protocol as p

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = [
    (name, bytes.fromhex(hexdata))
    for name, hexdata in (
        line.split() for line in (ROOT / "tests" / "golden" / "frames.txt")
        .read_text().splitlines() if line and not line.startswith("#")
    )
]


@pytest.fixture(scope="module")
def wire_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("wire") / "provider_wire_test"
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-I",
                    str(ROOT / "provider"), "-o", str(exe),
                    str(ROOT / "tests" / "provider_wire_test.c"),
                    str(ROOT / "provider" / "wire.c")], check=True, capture_output=True)
    return exe


def test_c_encoder_writes_every_golden_request(wire_test: Path) -> None:
    out = subprocess.run([str(wire_test), "encode"], capture_output=True, text=True,
                         check=True).stdout
    encoded = dict(line.split() for line in out.splitlines())
    golden = {name: data for name, data in GOLDEN if name.endswith("_request")}
    assert set(encoded) == set(golden)
    for name, data in golden.items():
        assert bytes.fromhex(encoded[name]) == data, name


def _expected(name: str, frame: bytes) -> str:
    """What the C decoder should print, from the Python codec's reading of the frame."""
    header = p.decode_header(frame)
    result = p.decode_response(header, frame[p.HEADER_SIZE:])
    if isinstance(result, p.ErrorResult):
        return f"{name} {header.request_id} {result.status} {result.tpm_rc} " \
               f"{result.message.encode().hex()}"
    fields = []
    for field_name, kind in result.FIELDS:
        value = getattr(result, field_name)
        if kind == "str":
            fields.append(value.encode().hex() or "-")
        elif kind == "bytes":
            fields.append(value.hex() or "-")
        else:
            fields.append(str(value))
    return " ".join([name, str(header.request_id), "0", "0", *fields])


def test_c_decoder_reads_every_golden_response(wire_test: Path) -> None:
    responses = [(n, d) for n, d in GOLDEN if p.decode_header(d).is_response]
    stdin = "".join(f"{n} {d.hex()}\n" for n, d in responses)
    out = subprocess.run([str(wire_test), "decode"], input=stdin, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == [_expected(n, d) for n, d in responses]


def test_c_codec_refuses_what_the_protocol_forbids(wire_test: Path) -> None:
    out = subprocess.run([str(wire_test), "malformed"], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stdout


def test_c_decoder_rejects_truncated_and_padded_bodies(wire_test: Path) -> None:
    frame = dict(GOLDEN)["load_response"]
    short = bytearray(frame[:-1])
    short[0:4] = (len(short) - 4).to_bytes(4, "big")
    long = bytearray(frame + b"\x00")
    long[0:4] = (len(long) - 4).to_bytes(4, "big")
    stdin = f"short {bytes(short).hex()}\nlong {bytes(long).hex()}\n"
    out = subprocess.run([str(wire_test), "decode"], input=stdin, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert all(line.endswith("MALFORMED") for line in out), out
