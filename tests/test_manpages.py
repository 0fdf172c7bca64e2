"""The manual pages (tpmbroker.cli.manpages) say what the command, the config reader and
the provider do: every subcommand and option the parser has is in tpmbroker(1), every key
the config reader takes in tpmbroker.conf(5), every configuration key the provider reads
and its URI schemes in provider-tpmbroker(7); and each page renders without a warning."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tpmbroker.cli import all_commands, main
from tpmbroker.cli.common import Command
from tpmbroker.cli.config import config_keys
from tpmbroker.cli.manpages import PAGES, write_pages
from tpmbroker.cli.serve import SERVE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    return {path.name: path.read_text() for path in write_pages(out, ROOT)}


def help_of(*words: str) -> str:
    """What `tpmbroker WORDS --help` prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        main([*words, "--help"])
    return printed.getvalue()


def commands(prefix: tuple[str, ...], declared: tuple[Command, ...]) -> list[tuple[str, ...]]:
    out = []
    for command in declared:
        out.append((*prefix, command.name))
        out += commands((*prefix, command.name), command.subcommands)
    return out


def subcommands_in(help_text: str) -> list[str]:
    """The subcommands `--help` lists (argparse indents each by four)."""
    return re.findall(r"(?m)^ {4}([a-z][\w-]*)(?: |$)", help_text)


def section(page: str, words: tuple[str, ...]) -> str:
    """The roff of one subcommand's section of tpmbroker(1)."""
    heading = ".SS " + " ".join(("tpmbroker", *words)).replace("-", "\\-") + "\n"
    start = page.index(heading) + len(heading)
    end = min(i for i in (page.find("\n.SS ", start), page.find("\n.SH ", start)) if i > 0)
    return page[start:end]


def test_every_subcommand_and_option_of_the_parser_is_in_tpmbroker_1(
        pages: dict[str, str]) -> None:
    page = pages["tpmbroker.1"]
    every = commands((), all_commands())
    assert len(every) > 15 and ("policy", "sign") in every
    # The parser's own listing of subcommands, level by level, is what the page has.
    listed: list[tuple[str, ...]] = [(name,) for name in subcommands_in(help_of())]
    for words in listed:
        listed += [(*words, name) for name in subcommands_in(help_of(*words))]
    assert sorted(listed) == sorted(every)
    for words in every:
        assert f".SS tpmbroker {' '.join(words)}".replace("-", "\\-") in page
        text = help_of(*words)
        options = set(re.findall(r"(?m)^ {2}(-[\w-]+(?:, --[\w-]+)?)", text)) - {"-h, --help"}
        body = section(page, words)
        for spelled in options:
            for flag in spelled.split(", "):
                assert f"\\fB{flag.replace('-', chr(92) + '-')}\\fR" in body, (words, flag)
        for positional in re.findall(r"(?m)^positional arguments:\n((?: {2}\S.*\n?)+)", text):
            for name in re.findall(r"(?m)^ {2}(\S+)", positional):
                if not name.startswith("{"):
                    assert f"\\fI{name.upper()}\\fR" in body, (words, name)


def test_every_config_key_is_in_tpmbroker_conf_5(pages: dict[str, str]) -> None:
    page = pages["tpmbroker.conf.5"]
    keys = config_keys(SERVE)
    assert "allow-uid" in keys and "tcti" in keys
    for key in keys:
        assert f".TP\n\\fB{key.replace('-', chr(92) + '-')}\\fR = " in page, key
    # the default file, as shipped, is in the page
    assert "allow\\-uid = [\"root\", \"www\\-data\"]" in page


def test_provider_page_names_every_key_the_provider_reads(pages: dict[str, str]) -> None:
    page = pages["provider-tpmbroker.7"]
    source = (ROOT / "provider" / "provider.c").read_text()
    keys = re.findall(r'OSSL_PARAM_utf8_ptr\("([\w-]+)"', source)
    assert {"socket", "timeout", "verify", "parent-auth"} <= set(keys)
    for key in keys:
        assert f".TP\n{key.replace('-', chr(92) + '-')}\n" in page, key
    environment = set(re.findall(r'getenv\("(TPMBROKER_\w+)"\)', " ".join(
        path.read_text() for path in (ROOT / "provider").glob("*.c"))))
    assert "TPMBROKER_SOCKET" in environment
    for name in environment:
        assert name in page, name
    for uri in ("handle:0x81xxxxxx", "object:FILE", "handle:0x01xxxxxx"):
        assert f".TP\n{uri}\n" in page, uri


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("groff") is None,
                    reason="needs man-db and groff")
@pytest.mark.parametrize("name", PAGES)
def test_pages_render_without_warnings(pages: dict[str, str], name: str,
                                       tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(pages[name])
    groff = subprocess.run(["groff", "-ww", "-z", "-man", "-Tutf8", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert (groff.returncode, groff.stderr) == (0, "")
    man = subprocess.run(["man", "-l", "-Tutf8", str(path)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "MANWIDTH": "80"})
    assert (man.returncode, man.stderr) == (0, "")
    # groff 1.23 (Debian 13) marks up even into a pipe: SGR escapes, or overstrikes.
    text = re.sub(r".\x08", "", re.sub(r"\x1b\[[0-9;]*m", "", man.stdout))
    title = name.rsplit(".", 1)[0].upper()
    assert text.split()[0] == f"{title}({name.rsplit('.', 1)[1]})"
