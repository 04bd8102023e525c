"""The command line as a whole: progress, limits, messages, names and exit statuses
that are the same from one command to the next."""

import os
import re

import pytest

from helpers import (LoggedServer, free_port, on_terminal, qcownbd_cmd, qcownbd_env, qemu_img,
                     raw_file, run)
from nbdclient import NbdClient

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


# -- create: the limit every open applies -----------------------------------------------

def test_create_refuses_what_info_and_serve_refuse_with_the_same_message(tmp_path):
    big = tmp_path / "qemu-made.qcow"
    qemu_img("create", "-q", "-f", "qcow", big, "100T")
    info = qcownbd("info", big, status=1).stderr
    served = qcownbd("serve", "--listen", f"127.0.0.1:{free_port()}", f"d={big}",
                     status=1).stderr
    new = tmp_path / "new.qcow"
    created = qcownbd("create", new, "100T", status=1).stderr
    assert not new.exists()
    reason = info.split(f"{big}: ", 1)[1]
    assert reason.startswith("image too large: L1 table of ") and "at most 64 TiB" in reason
    assert created == f"qcownbd: error: {new}: {reason}"
    assert served.endswith(f"{big}: {reason}")
    # an overlay's geometry has the same reach; up to the limit, create goes on
    raw_file(tmp_path / "base.raw")
    qcownbd("create", "-b", "base.raw", "-F", "raw", tmp_path / "over.qcow", "100T", status=1)
    qcownbd("create", tmp_path / "edge.qcow", str(64 * (1 << 40) + 512), status=1)
    qcownbd("create", tmp_path / "largest.qcow", "64T")
    assert not (tmp_path / "over.qcow").exists() and not (tmp_path / "edge.qcow").exists()


# -- images in use ---------------------------------------------------------------------

def test_image_in_use_says_how_to_read_it_anyway_where_the_command_can(tmp_path):
    image = tmp_path / "disk.qcow"
    qemu_img("create", "-q", "-f", "qcow", image, "4M")
    with LoggedServer(f"d={image}") as server:
        NbdClient.connect(server.port, "d").close()
        for command in ("info", "map"):
            refused = qcownbd(command, image, status=1).stderr
            assert "image is in use by another process" in refused
            assert "-U (--force-share)" in refused
            qcownbd(command, "-U", image)
        # no -U here: the message says only what does help
        for args in (["check", image], ["convert", image, tmp_path / "copy.raw"]):
            refused = qcownbd(*args, status=1).stderr
            assert "image is in use by another process" in refused and "-U" not in refused


def test_two_exports_of_one_image_name_each_other(tmp_path):
    image = raw_file(tmp_path / "disk.raw")
    refused = qcownbd("serve", "--listen", f"127.0.0.1:{free_port()}", f"a={image}",
                      f"b={image}", status=1).stderr
    assert refused.startswith(f"qcownbd: error: export b: same image as export a ({image})")
    assert "another process" not in refused
    os.link(image, tmp_path / "link.raw")
    raw_file(tmp_path / "base.raw")
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw",
             tmp_path / "over.qcow")
    raw_file(tmp_path / "shared.raw", b"shared")
    config = tmp_path / "c.toml"
    config.write_text(f'[exports.a]\npath = "{image}"\n'
                      f'[exports.b]\npath = "{tmp_path / "link.raw"}"\n'
                      f'[exports.over]\npath = "{tmp_path / "over.qcow"}"\nformat = "qcow1"\n'
                      f'[exports.base]\npath = "{tmp_path / "base.raw"}"\n'
                      f'[exports.ro1]\npath = "{tmp_path / "shared.raw"}"\nread_only = true\n'
                      f'[exports.ro2]\npath = "{tmp_path / "shared.raw"}"\nread_only = true\n')
    with LoggedServer("--config", config) as server:
        for name in ("b", "base"):
            assert run(["nbdinfo", server.uri(name)], check=False).returncode != 0
        for name in ("a", "over", "ro1", "ro2"):
            run(["nbdinfo", server.uri(name)])
        log = server.log
    assert f"export b: same image as export a ({tmp_path / 'link.raw'})" in log
    assert "export base: same image as a backing file of export over" in log
    assert "another process" not in log

