"""The command line as a whole: progress, limits, messages, names and exit statuses
that are the same from one command to the next."""

import argparse
import os
import re
import shlex
import struct

import pytest

from helpers import (LoggedServer, free_port, on_terminal, qcownbd_cmd, qcownbd_env, qemu_img,
                     raw_file, run)
from nbdclient import NbdClient
from qcownbd.cli import build_parser
from qcownbd.config import parse_config

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
    qemu_img("create", "-q", "-f", "qcow", big, "1M")
    # what `qemu-img create ... 100T` makes, without its 800,000 writes of 512 zero bytes
    # (a minute on a loaded machine): the same header with the size, an all-zero L1 table
    with open(big, "r+b") as image:
        image.seek(24)
        image.write(struct.pack(">Q", 100 << 40))
        image.seek(32)
        cluster_bits, l2_bits = image.read(2)
        image.seek(40)
        l1_offset = struct.unpack(">Q", image.read(8))[0]
        image.truncate(l1_offset + 8 * ((100 << 40) >> (cluster_bits + l2_bits)))
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
    # one process: with workers an image reached by another path (a hard link, a
    # backing file) may be in another worker, whose image lock refuses it instead
    with LoggedServer("--config", config, "--workers", "1") as server:
        for name in ("b", "base"):
            assert run(["nbdinfo", server.uri(name)], check=False).returncode != 0
        for name in ("a", "over", "ro1", "ro2"):
            run(["nbdinfo", server.uri(name)])
        log = server.log
    assert f"export b: same image as export a ({tmp_path / 'link.raw'})" in log
    assert "export base: same image as a backing file of export over" in log
    assert "another process" not in log


# -- one vocabulary ---------------------------------------------------------------------

def format_options(parser, command=()):
    """{(command..., option): choices} of every option of the parser tree that names a format."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(format_options(sub, (*command, name)))
        elif action.dest.endswith("format") and action.option_strings:
            found[(*command, action.option_strings[0])] = set(action.choices)
    return found


def test_every_format_option_takes_the_same_names():
    names = {"raw", "qcow1", "qcow"}
    found = format_options(build_parser())
    probed = {("serve", "--format"), ("info", "-f"), ("map", "-f"), ("check", "-f"),
              ("convert", "-f"), ("create", "-F"), ("convert", "-F"), ("commit", "-F")}
    written = {("create", "-f"), ("convert", "-O"), ("fleet", "commit", "-O")}
    assert set(found) == probed | written
    for option in probed:
        assert found[option] == names | {"auto"}, option
    for option in written:
        assert found[option] == names, option
    for name in ("raw", "qcow1", "qcow", "auto"):
        assert parse_config({"exports": {"d": {"path": "x", "format": name}}})


@pytest.mark.parametrize("fmt", ["qcow", "qcow1"])
def test_qemu_name_and_ours_work_in_every_command(tmp_path, fmt):
    image, base = tmp_path / "disk.img", tmp_path / "base.img"
    qcownbd("create", "-f", fmt, base, "1M")
    qcownbd("create", "-f", fmt, "-b", "base.img", "-F", fmt, image)
    for command in ("info", "map", "check"):
        qcownbd(command, "-f", fmt, image)
    qcownbd("convert", "-f", fmt, "-O", fmt, "-B", "base.img", "-F", fmt, image,
            tmp_path / "copy.img")
    qcownbd("create", "-f", "raw", tmp_path / "scratch.raw", "1M")
    qcownbd("create", "-f", "raw", "-b", "base.img", tmp_path / "no.raw", status=2)
    with LoggedServer("--format", fmt, f"d={image}") as server:
        run(["nbdinfo", server.uri("d")])


def test_options_are_never_abbreviated(tmp_path):
    image = raw_file(tmp_path / "disk.raw")
    for args in (["serve", "--list", f"127.0.0.1:{free_port()}", f"d={image}"],
                 ["info", "--js", image],
                 ["convert", "--output", "qcow1", image, tmp_path / "copy.qcow"],
                 ["fleet", "list", "--js", tmp_path]):
        refused = qcownbd(*args, status=2, timeout=20).stderr
        assert "unrecognized arguments: --" in refused
    assert not (tmp_path / "copy.qcow").exists()


# -- one set of exit statuses ------------------------------------------------------------

def test_fleet_failures_exit_1_and_command_line_mistakes_2(tmp_path):
    golden = raw_file(tmp_path / "golden.raw")
    config = tmp_path / "fleet.toml"
    config.write_text(f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "raw"\n'
                      f'overlay_dir = "{tmp_path / "overlays"}"\n')
    (tmp_path / "overlays").mkdir()
    for args in (["list", tmp_path / "missing.toml"], ["info", config, "nope"],
                 ["info", config, "other/vm1"], ["delete", config, "nope"],
                 ["commit", config, "nope", tmp_path / "new.raw"],
                 ["list", tmp_path / "golden.raw"]):
        qcownbd("fleet", *args, status=1)
    for args in ([], ["list"], ["info", config, "fleet/.."], ["delete", config, "vm 1"],
                 ["commit", config, "vm1"], ["list", "--bogus", config]):
        qcownbd("fleet", *args, status=2)


HELPED = ["", "serve", "create", "info", "map", "check", "convert", "fleet", "fleet list",
          "fleet info", "fleet delete", "fleet commit"]


def help_section(text: str, title: str) -> list[str]:
    """The lines of the help section that starts with ``title``, up to a blank line."""
    lines = text.split(f"\n{title}", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.strip() for line in lines[1:]]


@pytest.mark.parametrize("command", HELPED)
def test_help_ends_with_examples_that_parse_and_the_exit_statuses(command):
    text = qcownbd(*command.split(), "--help").stdout
    examples = [shlex.split(line, comments=True) for line in help_section(text, "examples:")]
    assert examples
    parser = build_parser()
    for example in examples:
        assert example[0] == "qcownbd" and " ".join(example[1:]).startswith(command), example
        parser.parse_args(example[1:])
    statuses = help_section(text, "exit status")
    codes = [line.split()[0] for line in statuses if line[:1].isdigit()]
    if command == "check":
        assert codes == ["0", "1", "2", "3", "63", "130"]
    else:
        assert codes == ["0", "1", "2", "130"]
