"""The command line as a whole: progress, limits, messages, names and exit statuses
that are the same from one command to the next."""

import os
import re

import pytest

from helpers import on_terminal, qcownbd_cmd, qcownbd_env, run

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def qcownbd(*args, status=0, timeout=60, **kwargs):
    """Run qcownbd; its exit status must be ``status``, a failure told in one line
    (after the log lines of a server that started to open its exports)."""
    result = run(qcownbd_cmd(*args), timeout=timeout, check=False, env=qcownbd_env(), **kwargs)
    assert result.returncode == status, f"{args}: {result.returncode} {result.stderr}"
    if status:
        told = [line for line in result.stderr.splitlines() if line.startswith("qcownbd: ")]
        assert len(told) == 1 and "Traceback" not in result.stderr, result.stderr
        result.stderr = told[0] + "\n"
    return result


# -- convert: progress by bytes ---------------------------------------------------------

def test_convert_progress_moves_with_the_bytes_copied(tmp_path):
    # every byte written: one data extent from the first byte to the last
    src = tmp_path / "full.raw"
    src.write_bytes(os.urandom(32 * MiB))
    status, output = on_terminal("convert", "-O", "qcow1", src, tmp_path / "copy.qcow")
    assert status == 0
    shown = [float(p) for p in re.findall(rb"\((\d+\.\d\d)/100%\)", output)]
    assert shown == sorted(shown) and shown[-1] == 100.0, output
    assert len({p for p in shown if 0 < p < 100}) >= 10, output

