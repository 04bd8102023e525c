"""Logs that read well under journald: no timestamps of our own there, one line per event."""

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

# cli.setup_logging reconfigures the root logger, so it runs in a child
# process rather than inside pytest's own logging capture.
CHILD = r"""
import argparse, logging, sys
from qcownbd.console import setup_logging
flags = dict(log_level=None, verbose=False, quiet=False)
for arg in sys.argv[1:]:
    key, _, value = arg.partition("=")
    flags[key] = value if key == "log_level" else True
setup_logging(argparse.Namespace(**flags), "info")
logging.getLogger("qcownbd.test").debug("debug event")
logging.getLogger("qcownbd.test").info("client 127.0.0.1 connected to export disk")
logging.getLogger("qcownbd.test").error("export disk: image missing")
"""

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "


def log_lines(*flags, journal: bool) -> list[str]:
    """stderr lines of a child that logs three events at debug/info/error."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    if journal:
        env["JOURNAL_STREAM"] = "8:123456"  # device:inode of the journal stream
    out = subprocess.run([sys.executable, "-c", CHILD, *flags], capture_output=True,
                         text=True, timeout=30, check=True, env=env)
    return out.stderr.splitlines()


def test_under_journald_lines_carry_no_timestamp():
    assert log_lines(journal=True) == [
        "INFO client 127.0.0.1 connected to export disk",
        "ERROR export disk: image missing",
    ]


def test_on_a_terminal_lines_start_with_a_timestamp():
    lines = log_lines(journal=False)
    assert len(lines) == 2
    assert re.fullmatch(TIMESTAMP + "INFO client 127.0.0.1 connected to export disk", lines[0])
    assert re.fullmatch(TIMESTAMP + "ERROR export disk: image missing", lines[1])


@pytest.mark.parametrize("flags,levels", [
    (("verbose",), ["DEBUG", "INFO", "ERROR"]),
    (("quiet",), ["ERROR"]),
    (("log_level=error", "verbose"), ["ERROR"]),
])
def test_verbosity_flags_choose_the_level(flags, levels):
    assert [line.split()[0] for line in log_lines(*flags, journal=True)] == levels
