"""The manual pages qcownbd(8) and qcownbd.toml(5): they render without a warning
and say everything the program knows (every command, option, config key, exit
status), so that they cannot fall behind it unnoticed."""

import argparse
import os
import re
import shutil
from dataclasses import fields

import pytest

from helpers import REPO, qcownbd_cmd, qcownbd_env, run
from qcownbd.cli import build_parser, common_options
from qcownbd.config import ExportConfig, FleetConfig, ServerConfig

pytestmark = pytest.mark.timeout(60)
PAGES = [REPO / "man" / "qcownbd.8", REPO / "man" / "qcownbd.toml.5"]


def render(page) -> str:
    """The page as plain text, as man shows it, without hyphenation (so that no option
    or key is split over two lines)."""
    assert shutil.which("groff"), "groff is missing: apt-get install groff-base man-db"
    return run(["groff", "-man", "-rHY=0", "-Tascii", "-P-cbou", page], timeout=30).stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_renders_without_warnings(page):
    checked = run(["groff", "-man", "-ww", "-z", "-Tutf8", page], timeout=30)
    assert checked.stderr == ""
    assert shutil.which("man"), "man is missing: apt-get install man-db"
    shown = run(["man", "--warnings=all", "-l", page], timeout=30,
                env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"})
    assert shown.stderr == "" and "NAME" in shown.stdout and "SEE ALSO" in shown.stdout


def commands(parser, path=()):
    """(command path, parser) of every command of the tree, the top one first."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    return found


def sections(text: str) -> dict[str, str]:
    """The page's subsections by heading ("qcownbd serve", "Options of every command")."""
    parts = re.split(r"^   (\S.*)$", text, flags=re.MULTILINE)
    return {heading.split(" [")[0].split(" ACTION")[0]: body
            for heading, body in zip(parts[1::2], parts[2::2])}


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_command_and_option_is_in_the_page():
    page = sections(render(PAGES[0]))
    common = {option for action in common_options()._actions for option in action.option_strings}
    common |= {"-h", "--help"}
    everywhere = page["Options of every command"]
    for option in common | {"--version"}:
        assert mentions(everywhere, option), option
    for path, parser in commands(build_parser())[1:]:
        # a fleet action is told under "qcownbd fleet"
        section = page[f"qcownbd {path[0]}"]
        if len(path) > 1:
            assert re.search(rf"^ +fleet {path[1]}\b", section, re.MULTILINE), path
        for action in parser._actions:
            for option in set(action.option_strings) - common:
                assert mentions(section, option), (path, option)


def test_exit_statuses_of_the_help_are_in_the_page():
    text = render(PAGES[0])
    told = text.split("\nEXIT STATUS\n", 1)[1].split("\nSIGNALS\n", 1)[0]
    for command in ([], ["check"]):
        shown = run(qcownbd_cmd(*command, "--help"), env=qcownbd_env()).stdout
        for code in re.findall(r"^  (\d+) ", shown.split("\nexit status", 1)[1], re.MULTILINE):
            assert mentions(told, code), (command, code)


def test_every_config_key_is_in_the_config_page():
    text = render(PAGES[1])
    keys = ({f.name for f in fields(ServerConfig)} - {"exports"}) \
        | ({f.name for f in (*fields(ExportConfig), *fields(FleetConfig))} - {"name"})
    for key in keys:
        assert re.search(rf"^ +{key} = ", text, re.MULTILINE), key
