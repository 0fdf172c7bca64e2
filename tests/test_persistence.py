"""Persistent keys through the broker: `tpmbroker persist`, `keys`, `evict` (PERSIST,
KEYS, EVICT) against swtpm, the real broker and the real openssl CLI.

(tests/test_broker_life.py is about the broker's own start and stop.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP

from tpmbroker import protocol as p
from tpmbroker.client import Client
from tpmbroker.errors import BadKeyError, PermissionDeniedError, UnknownKeyError
from tpmbroker.keyfile import pem_to_der
from tpmbroker.ops.load import Load, LoadResult
from tpmbroker.ops.persistence import Evict, EvictResult, KeysRequest, KeysResult, Persist
from tpmbroker.protocol import Curve, Hash, KeyType
from tpmbroker.protocol import key_id_for as _key_id_for
from tpmbroker.simulator import Swtpm

from .test_provider import MODULE, OPENSSL, PROV, TPMBROKER, persist_with_tools
from .tpmfixtures import Abrmd, Broker

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="provider not built")
HANDLE = 0x81000010


def cli(broker: Broker, *args: str, check: bool = True,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    res = subprocess.run([*prefix, TPMBROKER, *args, "--socket", broker.socket],
                         capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"tpmbroker {' '.join(args)}: {res.stderr}\n{broker.log()}")
    return res


def load_key_id(der: bytes) -> bytes:
    return _key_id_for(p.KeySource.TSS2_DER, der)


def tpm_persistent_handles(tcti: str) -> list[int]:
    """What the TPM itself holds, asked beside the broker (through tpm2-abrmd)."""
    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, 0x81000000, 64)
    return [int(h) for h in data.data.handles]


def make_key(broker: Broker, path: Path, alg: str = "ec:P-256") -> Path:
    cli(broker, "keygen", "--alg", alg, "-o", str(path))
    path.chmod(0o644)
    return path


def test_persist_keys_evict_round_trip(abrmd: Abrmd, abrmd_broker: Broker,
                                       tmp_path: Path) -> None:
    broker = abrmd_broker
    key = make_key(broker, tmp_path / "key.pem")
    assert HANDLE not in tpm_persistent_handles(abrmd.tcti)

    out = cli(broker, "persist", str(key), f"0x{HANDLE:08x}").stdout.split()
    assert out[0] == f"0x{HANDLE:08x}"
    name = out[1]
    assert HANDLE in tpm_persistent_handles(abrmd.tcti)

    # The persisted key signs by handle through the openssl CLI, as the file's key.
    env = dict(os.environ, TPMBROKER_SOCKET=broker.socket, OPENSSL_CONF=os.devnull)
    data = tmp_path / "data"
    data.write_bytes(b"persisted")
    pub = tmp_path / "key.pub"
    subprocess.run([OPENSSL, "pkey", *PROV, "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, env=env, capture_output=True, timeout=60)
    sig = tmp_path / "sig"
    res = subprocess.run([OPENSSL, "dgst", "-sha256", *PROV, "-sign", f"handle:0x{HANDLE:08x}",
                          "-out", str(sig), str(data)], env=env, capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr.decode() + broker.log()
    res = subprocess.run([OPENSSL, "dgst", "-sha256", "-verify", str(pub), "-signature",
                          str(sig), str(data)], capture_output=True, timeout=60)
    assert b"Verified OK" in res.stdout

    with Client(broker.socket) as client:
        by_handle = client.load_key(HANDLE)
        by_file = client.load_key(str(key))
        assert by_handle.public_key == by_file.public_key
        listing = json.loads(cli(broker, "keys", "--json").stdout)
        (entry,) = [o for o in listing["persistent"] if o["handle"] == f"0x{HANDLE:08x}"]
        assert entry["type"] == "EC" and entry["curve"] == "P-256"
        assert entry["name"] == name and entry["policy"] is False
        assert {"sign", "decrypt", "fixedtpm", "fixedparent", "sensitivedataorigin",
                "userwithauth"} <= set(entry["attributes"])  # the default: sign and decrypt
        assert "restricted" not in entry["attributes"]
        # What the broker holds: the key by handle and by file, each on the client's
        # connection (the CLI's own connection asks, and holds nothing).
        loaded = {k["key_id"]: k for k in listing["loaded"]}
        held = loaded[by_handle.key_id.hex()]
        assert held["source"] == "handle" and held["handle"] == f"0x{HANDLE:08x}"
        assert held["connections"] == 1 and held["uids"] == [os.geteuid()]
        assert loaded[by_file.key_id.hex()]["source"] == "file"
        assert loaded[by_file.key_id.hex()]["parent"] == "0x40000001"

        # A taken handle is refused, and what is there stays.
        with pytest.raises(BadKeyError, match="in use"):
            client.persist(make_key(broker, tmp_path / "other.pem"), HANDLE)
        assert client.keys()["persistent"] == listing["persistent"]

        # Evicted: gone from the TPM and from KEYS; the connection that had it loaded by
        # handle gets a clear error, not a crash.
        cli(broker, "evict", f"0x{HANDLE:08x}")
        assert HANDLE not in tpm_persistent_handles(abrmd.tcti)
        after = client.keys()
        assert f"0x{HANDLE:08x}" not in [o["handle"] for o in after["persistent"]]
        assert by_handle.key_id.hex() not in [k["key_id"] for k in after["loaded"]]
        with pytest.raises(BadKeyError, match=f"no persistent key at 0x{HANDLE:08x}"):
            client.sign(by_handle, bytes(32), Hash.SHA256)
        # The file's key is unaffected.
        client.sign(by_file, bytes(32), Hash.SHA256)

        # Nothing at a handle, and handles that are no owner's persistent handles.
        with pytest.raises(BadKeyError, match="no persistent object at 0x81000011"):
            client.evict(0x81000011)
        with pytest.raises(BadKeyError, match="platform"):
            client.evict(0x81800000)
        with pytest.raises(BadKeyError, match="not a persistent handle"):
            client.evict(0x80000001)
        # The CLI checks what it is given before asking the broker.
        refused = cli(broker, "evict", "0x8100001", check=False)
        assert refused.returncode != 0 and "0x81xxxxxx" in refused.stderr
    assert "event=key_persisted" in broker.log() and "event=key_evicted" in broker.log()


def test_persist_an_rsa_key_from_the_python_api(broker: Broker, tmp_path: Path) -> None:
    with Client(broker.socket) as client:
        der, spki = client.generate_key(KeyType.RSA, 2048)
        key = client.load_key(der)
        with pytest.raises(UnknownKeyError):
            # PERSIST names a key LOADed on the connection; an unknown id is refused.
            client._call(Persist(bytes(32), HANDLE))
        name = client.persist(key, HANDLE)
        by_handle = client.load_key(HANDLE)
        assert by_handle.public_key == spki
        client.sign(by_handle, bytes(32), Hash.SHA256)  # verified by the client
        (entry,) = client.keys()["persistent"]
        assert entry == {**entry, "handle": f"0x{HANDLE:08x}", "type": "RSA", "bits": 2048,
                         "name": name.hex()}
        with pytest.raises(BadKeyError, match="persistent already"):
            client.persist(by_handle, 0x81000011)
        client.evict(HANDLE)
        assert client.keys()["persistent"] == []


def test_keys_lists_persistent_handles_while_every_object_slot_is_taken(
        broker: Broker) -> None:
    """The TPM brings a persistent object into an object slot to read its public area;
    with swtpm's three slots full of loaded keys, KEYS makes room instead of failing
    (TPM_RC_OBJECT_MEMORY, as the demo once found)."""
    with Client(broker.socket) as client:
        keys = [client.load_key(client.generate_key(KeyType.EC, Curve.P256)[0])
                for _ in range(4)]
        client.persist(keys[0], HANDLE)
        for key in keys[1:]:
            client.sign(key, bytes(32), Hash.SHA256)  # resident: every slot taken
        (entry,) = client.keys()["persistent"]
        assert entry["handle"] == f"0x{HANDLE:08x}"
        client.evict(HANDLE)


@pytest.mark.skipif(shutil.which("tpm2_evictcontrol") is None, reason="tpm2-tools not installed")
def test_keys_made_by_tpm2_tools_are_listed(swtpm: Swtpm, tmp_path: Path) -> None:
    persist_with_tools(swtpm, tmp_path, "0x81000020", "-a",
                       "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda")
    tenv = dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti)
    for args in (["tpm2_createprimary", "-C", "o", "-G", "rsa2048", "-c", "srk.ctx", "-Q"],
                 ["tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", "0x81000001"],
                 ["tpm2_flushcontext", "-t"]):
        subprocess.run(args, check=True, capture_output=True, env=tenv, cwd=tmp_path,
                       timeout=60)
    broker = Broker(swtpm.tcti, tmp_path / "broker").start()
    try:
        listing = json.loads(cli(broker, "keys", "--json").stdout)
        text = cli(broker, "keys").stdout
    finally:
        broker.stop()
    by_handle = {o["handle"]: o for o in listing["persistent"]}
    assert set(by_handle) == {"0x81000001", "0x81000020"}
    srk, signer = by_handle["0x81000001"], by_handle["0x81000020"]
    assert srk["type"] == "RSA" and srk["bits"] == 2048
    assert {"restricted", "decrypt", "fixedtpm"} <= set(srk["attributes"])
    assert "sign" not in srk["attributes"]
    assert signer["type"] == "EC" and signer["curve"] == "P-256"
    assert set(signer["attributes"]) == {"sign", "fixedtpm", "fixedparent",
                                         "sensitivedataorigin", "userwithauth", "noda"}
    assert listing["loaded"] == []
    assert "0x81000020  EC P-256" in text and "noda" in text


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root to run a client as www-data")
# A client as www-data: the system's python3 with its standard library alone (this
# package's interpreter is not www-data's to run), sending frames the test's codec made.
RAW_CLIENT = """
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for frame in sys.argv[2:]:
    s.sendall(bytes.fromhex(frame))
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    rest = b""
    while len(rest) < struct.unpack(">I", head)[0]:
        rest += s.recv(65536)
    print((head + rest).hex())
"""


def as_www_data(broker: Broker, *requests: p.Message) -> list[p.Message | p.ErrorResult]:
    frames = [p.encode_request(i + 1, msg, 30000).hex() for i, msg in enumerate(requests)]
    res = subprocess.run(["runuser", "-u", "www-data", "--", "/usr/bin/python3", "-c",
                          RAW_CLIENT, broker.socket, *frames], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    answers = []
    for line in res.stdout.split():
        frame = bytes.fromhex(line)
        answers.append(p.decode_response(p.decode_header(frame), frame[p.HEADER_SIZE:]))
    return answers


@needs_root
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_only_administrators_persist_and_evict(swtpm: Swtpm, world_dir: Path) -> None:
    run = world_dir / "run"
    run.mkdir(mode=0o755)
    admitted = ("--socket-mode", "666", "--allow-uid", "www-data")
    broker = Broker(swtpm.tcti, run, extra_args=admitted).start()
    try:
        key = make_key(broker, world_dir / "key.pem")
        der = pem_to_der(key.read_bytes())
        load = Load(p.KeySource.TSS2_DER, der)
        loaded, persist = as_www_data(broker, load, Persist(load_key_id(der), HANDLE))
        assert isinstance(loaded, LoadResult)  # www-data may use the key ...
        assert isinstance(persist, p.ErrorResult)  # ... not persist it
        assert persist.status == PermissionDeniedError.status
        assert "uid 33 may not persist keys" in persist.message
        cli(broker, "persist", str(key), f"0x{HANDLE:08x}")  # root may
        (evict,) = as_www_data(broker, Evict(HANDLE))
        assert isinstance(evict, p.ErrorResult) and evict.status == PermissionDeniedError.status
        assert "may not evict" in evict.message
        # Listing is for every admitted peer; who holds a key is not told them.
        with Client(broker.socket) as client:
            client.load_key(HANDLE)
            (keys,) = as_www_data(broker, KeysRequest())
            assert isinstance(keys, KeysResult)
            listing = json.loads(keys.json)
            assert [o["handle"] for o in listing["persistent"]] == [f"0x{HANDLE:08x}"]
            (held,) = [k for k in listing["loaded"] if k["source"] == "handle"]
            assert held["connections"] == 1 and "uids" not in held
            (told,) = [k for k in client.keys()["loaded"] if k["source"] == "handle"]
            assert told["uids"] == [0]  # root is told
    finally:
        broker.stop()
    persisted = [line for line in broker.log().splitlines() if "event=key_persisted" in line]
    assert len(persisted) == 1 and "uid=0" in persisted[0]
    # With --admin-uid www-data, the same user may.
    broker = Broker(swtpm.tcti, run, extra_args=(*admitted, "--admin-uid", "www-data")).start()
    try:
        (evict,) = as_www_data(broker, Evict(HANDLE))
        assert isinstance(evict, EvictResult), evict
        with Client(broker.socket) as client:
            assert client.keys()["persistent"] == []
    finally:
        broker.stop()
    evicted = [line for line in broker.log().splitlines() if "event=key_evicted" in line]
    assert len(evicted) == 1 and "uid=33" in evicted[0]
