"""`tpmbroker serve --config FILE` (tpmbroker.conf(5)): the file's keys are serve's options,
checked as the command line's, and a mistake names the file, the key and its line. Also
where clients look for the socket when none is named: the session's broker where one
listens, else the system service's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpmbroker.cli import build_parser
from tpmbroker.cli.common import UsageError
from tpmbroker.cli.config import config_keys, read_config, with_config
from tpmbroker.cli.serve import SERVE
from tpmbroker.paths import SYSTEM_SOCKET, default_socket, provider_path

TPMBROKER = str(Path(sys.executable).parent / "tpmbroker")


def parse(tmp_path: Path, text: str, *typed: str):  # type: ignore[no-untyped-def]
    config = tmp_path / "tpmbroker.conf"
    config.write_text(text)
    argv = ["serve", "--config", str(config), *typed]
    return build_parser().parse_args(with_config(argv, SERVE, str(config)))


def test_keys_are_serves_long_options() -> None:
    options = {flag[2:] for option in SERVE.args for flag in option.flags[:1]} - {"config"}
    assert set(config_keys(SERVE)) == options
    assert {"socket", "tcti", "allow-uid", "policy", "sessions"} <= options


def test_settings_become_options_and_the_command_line_wins(tmp_path: Path) -> None:
    args = parse(tmp_path, 'socket = "/tmp/a.sock"\nsessions = 3\nsocket-mode = "600"\n'
                 'allow-uid = ["root", "1000"]\ntimeout = 2.5\n',
                 "--sessions", "1", "--allow-uid", "www-data")
    assert args.socket == "/tmp/a.sock"
    assert args.sessions == 1  # typed after the file: wins
    assert args.socket_mode == 0o600
    assert args.allow_uid == ["root", "1000", "www-data"]  # repeatable: adds
    assert args.timeout == 2.5
    assert args.tcti is None  # not in the file: the option's default


@pytest.mark.parametrize(("text", "message"), [
    ("\n\nsesions = 2\n", "unknown key 'sesions' (line 3): the keys are "),
    ('sessions = [1, 2]\n', "sessions (line 1) takes one value, not a list"),
    ('# c\nsessions = "two"\n', "sessions (line 2): invalid int value: 'two'"),
    ('log-level = "loud"\n', "log-level (line 1): invalid choice: 'loud'"),
    ('socket-mode = "999"\n', "socket-mode (line 1): '999': give permissions in octal"),
    ("tcti = true\n", "tcti (line 1): give a string or a number"),
    ("sessions = \n", "not TOML: "),
])
def test_a_mistake_names_the_file_the_key_and_its_line(tmp_path: Path, text: str,
                                                       message: str) -> None:
    config = tmp_path / "bad.conf"
    config.write_text(text)
    with pytest.raises(UsageError) as caught:
        read_config(str(config), SERVE)
    assert str(caught.value).startswith(f"--config {config}: ")
    assert message in str(caught.value)


def test_serve_refuses_a_bad_file_before_starting(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("sessions = 9\nsocket = 5\nfoo = 1\n")
    out = subprocess.run([TPMBROKER, "serve", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == (f"tpmbroker serve: --config {config}: unknown key 'foo' (line 3): "
                          "the keys are " + ", ".join(sorted(config_keys(SERVE)))
                          + " (tpmbroker.conf(5))\n")
    missing = subprocess.run([TPMBROKER, "serve", "--config", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert (missing.returncode, missing.stderr) == (
        2, f"tpmbroker serve: --config {tmp_path / 'none'}: No such file or directory\n")


def test_the_shipped_config_is_valid() -> None:
    config = str(Path(__file__).resolve().parents[1] / "contrib" / "tpmbroker.conf")
    assert read_config(config, SERVE)


def test_clients_use_the_session_socket_only_where_a_broker_listens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPMBROKER_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket() == SYSTEM_SOCKET
    assert default_socket(serving=True) == str(tmp_path / "tpmbroker.sock")
    (tmp_path / "tpmbroker.sock").touch()
    assert default_socket() == str(tmp_path / "tpmbroker.sock")


def test_the_provider_looks_where_the_python_client_looks(tmp_path: Path) -> None:
    """No broker anywhere: the provider's error names the socket it tried."""
    env = {k: v for k, v in os.environ.items() if k not in ("TPMBROKER_SOCKET", "OPENSSL_CONF")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    command = ["openssl", "rand", "-provider-path", str(provider_path().parent),
               "-provider", "tpmbroker", "-hex", "8"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert f"cannot reach tpmbroker at {SYSTEM_SOCKET}:" in out.stderr
    (tmp_path / "tpmbroker.sock").touch()  # a session broker's socket (none listens)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert f"cannot reach tpmbroker at {tmp_path / 'tpmbroker.sock'}:" in out.stderr
