"""open_image: format probing and pins, open errors, and the backing-chain policy
against the hostile names of qcow1.md §12 (#22-#30), with qemu-img making the images."""

import os
import struct

import pytest

from helpers import qemu_img, raw_file, read
from qcownbd.errors import ImageFormatError
from qcownbd.image.probe import identify, open_image

pytestmark = pytest.mark.timeout(60)

KiB = 1024


def overlay(path, backing_name, backing_fmt="raw", size="1M"):
    """A qemu-img-made QCOW1 overlay storing ``backing_name`` verbatim (-u: unchecked)."""
    qemu_img("create", "-f", "qcow", "-u", "-b", backing_name, "-F", backing_fmt, path, size)
    return path


def refused(path, match, **kwargs):
    with pytest.raises(ImageFormatError, match=match) as info:
        open_image(path, **kwargs).close()
    assert "\n" not in str(info.value)
    return str(info.value)


# -- probing and pins ---------------------------------------------------------

@pytest.mark.parametrize("fmt, name", [
    ("qcow2", "qcow2"), ("vmdk", "VMDK"), ("vdi", "VDI"), ("vhdx", "VHDX"),
    ("vpc", "VPC"), ("qed", "QED")])
def test_foreign_formats_named_and_refused_unless_pinned_raw(tmp_path, fmt, name):
    path = tmp_path / f"img.{fmt}"
    qemu_img("create", "-f", fmt, path, "1M")
    message = refused(path, name)
    assert str(path) in message and "pin the format to raw" in message
    img = open_image(path, fmt="raw")
    try:
        assert img.format_name == "raw" and img.size == os.path.getsize(path)
    finally:
        img.close()


def test_luks_and_odd_qcow_versions_refused(tmp_path):
    luks = raw_file(tmp_path / "luks.img", b"LUKS\xba\xbe\x00\x01")
    refused(luks, "LUKS")
    for version, name in ((3, "qcow2"), (0, "unknown version 0"), (7, "unknown version 7")):
        path = raw_file(tmp_path / f"v{version}.img", struct.pack(">4sI", b"QFI\xfb", version))
        refused(path, name)
    assert identify(b"") == identify(b"hello") == "raw"


def test_qcow1_probed_but_raw_pin_wins(tmp_path):
    path = tmp_path / "looks.qcow"
    qemu_img("create", "-f", "qcow", path, "64M")
    probed = open_image(path, read_only=True)
    try:
        assert probed.format_name == "qcow1" and probed.size == 64 << 20
    finally:
        probed.close()
    pinned = open_image(path, fmt="raw", read_only=True)
    try:
        assert pinned.format_name == "raw" and pinned.size == os.path.getsize(path) == 560
        assert read(pinned, 0, 8) == b"QFI\xfb\0\0\0\1"
    finally:
        pinned.close()
    qcow1_pin_on_raw = raw_file(tmp_path / "plain.raw")
    refused(qcow1_pin_on_raw, "bad magic", fmt="qcow1")


def test_open_errors_are_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    refused(tmp_path / "missing.img", "missing.img: no such file")
    refused(tmp_path, "a directory")
    refused(tmp_path, "a directory", read_only=True)
    refused(tmp_path / "fifo", "not a regular file or block device")
    refused(raw_file(tmp_path / "x.raw"), "unknown format 'vmdk'", fmt="vmdk")
    refused(raw_file(tmp_path / "y.raw"), "unknown backing format", backing_format="qcow2")
    img = open_image(raw_file(tmp_path / "z.raw"), read_only=True)
    assert img.read_only and img.format_name == "raw"
    img.close()


# -- backing chains -------------------------------------------------------------

def test_relative_names_resolve_against_overlay_dir_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "bk").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    raw_file(tmp_path / "bk" / "base.raw", b"BASE" * 128)
    raw_file(tmp_path / "elsewhere" / "base.raw", b"WRONG" * 100)
    overlay(tmp_path / "sub" / "up.qcow", "../bk/base.raw")
    overlay(tmp_path / "sub" / "abs.qcow", str(tmp_path / "bk" / "base.raw"))
    raw_file(tmp_path / "sub" / "x:y.raw", b"COLON" * 100)
    overlay(tmp_path / "sub" / "colon.qcow", "./x:y.raw")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name, want in (("up.qcow", b"BASE"), ("abs.qcow", b"BASE"), ("colon.qcow", b"COLON")):
        img = open_image(os.path.relpath(tmp_path / "sub" / name), read_only=True)
        try:
            assert img.backing.format_name == "raw"
            assert read(img, 0, 5)[:len(want)] == want
        finally:
            img.close()


@pytest.mark.parametrize("name", [
    'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/hostname"}}',
    "x:y.raw", "nbd:localhost:10809", "file:/etc/hostname", "nbd+unix:///?socket=/tmp/s"])
def test_protocol_names_refused(tmp_path, name):
    raw_file(tmp_path / "y.raw")
    path = overlay(tmp_path / "p.qcow", name)
    message = refused(path, "protocol syntax", read_only=True)
    assert str(path) in message


def test_nul_in_name_and_name_past_eof_refused(tmp_path):
    raw_file(tmp_path / "base.raw")
    path = overlay(tmp_path / "nul.qcow", "base.raw_junk")
    with open(path, "r+b") as f:
        f.seek(48 + len("base.raw"))
        f.write(b"\0")
    refused(path, "NUL", read_only=True)
    past = overlay(tmp_path / "past.qcow", "base.raw")
    with open(past, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">Q", 1 << 30))      # backing_file_offset far past EOF
    refused(past, "backing", read_only=True)


def test_missing_backing_named(tmp_path):
    path = overlay(tmp_path / "m.qcow", "gone.raw")
    message = refused(path, "no such file", read_only=True)
    assert "gone.raw" in message and "m.qcow" in message


def test_loops_refused(tmp_path):
    overlay(tmp_path / "self.qcow", "self.qcow", "qcow")
    refused(tmp_path / "self.qcow", "backing loop", read_only=True)
    overlay(tmp_path / "a.qcow", "b.qcow", "qcow")
    overlay(tmp_path / "b.qcow", "a.qcow", "qcow")
    refused(tmp_path / "a.qcow", "backing loop")
    # the same file under another name is the same file
    os.symlink("c.qcow", tmp_path / "alias.qcow")
    overlay(tmp_path / "c.qcow", "alias.qcow", "qcow")
    refused(tmp_path / "c.qcow", "backing loop", read_only=True)


def make_chain(tmp_path, depth):
    raw_file(tmp_path / "c0.raw", b"BOTTOM")
    overlay(tmp_path / "c1.qcow", "c0.raw")
    for i in range(2, depth + 1):
        overlay(tmp_path / f"c{i}.qcow", f"c{i - 1}.qcow", "qcow")
    return tmp_path / f"c{depth}.qcow"


def test_depth_cap(tmp_path):
    top = make_chain(tmp_path, 20)       # 20 overlays over a raw base: 20 backing levels
    refused(top, "deeper than 16", read_only=True)
    refused(tmp_path / "c5.qcow", "deeper than 4", read_only=True, max_backing_depth=4)
    img = open_image(tmp_path / "c5.qcow", read_only=True, max_backing_depth=5)
    try:
        assert read(img, 0, 6) == b"BOTTOM"
    finally:
        img.close()


def test_confinement_to_allowed_dirs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "outside").mkdir()
    raw_file(tmp_path / "images" / "base.raw", b"OK")
    raw_file(tmp_path / "outside" / "secret.raw", b"SECRET")
    os.symlink("../outside/secret.raw", tmp_path / "images" / "link.raw")
    ok = overlay(tmp_path / "images" / "ok.qcow", "base.raw")
    escape = overlay(tmp_path / "images" / "esc.qcow", "../outside/secret.raw")
    via_link = overlay(tmp_path / "images" / "lnk.qcow", "link.raw")
    absolute = overlay(tmp_path / "images" / "abs.qcow", "/etc/hostname")
    allowed = [tmp_path / "images"]
    img = open_image(ok, read_only=True, allowed_backing_dirs=allowed)
    assert read(img, 0, 2) == b"OK"
    img.close()
    for path in (escape, via_link, absolute):
        refused(path, "outside the allowed directories", read_only=True,
                allowed_backing_dirs=allowed)
    open_image(escape, read_only=True).close()    # no confinement configured: allowed


def test_raw_backing_pin_defeats_planted_qcow_header(tmp_path):
    """#30: a guest-written raw base whose sector 0 is a QCOW1 header naming a host file."""
    qemu_img("create", "-f", "qcow", "-u", "-b", "/etc/hostname", "-F", "raw",
             tmp_path / "planted", "1M")
    planted = (tmp_path / "planted").read_bytes()
    raw_file(tmp_path / "base.raw", planted, size=1 << 20)
    top = overlay(tmp_path / "top.qcow", "base.raw")
    pinned = open_image(top, read_only=True, backing_format="raw")
    try:
        assert pinned.backing.format_name == "raw"
        assert read(pinned, 0, len(planted)) == planted
    finally:
        pinned.close()
    refused(top, "outside the allowed directories", read_only=True,
            allowed_backing_dirs=[tmp_path])


def test_backing_opened_read_only_and_locked_shared(tmp_path):
    raw_file(tmp_path / "base.raw", b"B")
    top = overlay(tmp_path / "top.qcow", "base.raw")
    img = open_image(top)
    try:
        assert not img.read_only and img.backing.read_only
        open_image(tmp_path / "base.raw", read_only=True).close()   # readers may share
        refused(tmp_path / "base.raw", "in use by another process")  # writers may not
    finally:
        img.close()
    open_image(tmp_path / "base.raw").close()


def test_permission_denied_is_one_line(tmp_path):
    """As an unprivileged user (root would bypass the mode bits)."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    path = raw_file(tmp_path / "private.raw")
    os.chmod(path, 0o600)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                        # child: drop to nobody, report the error text
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_image(path, read_only=True).close()
                message = "opened"
            except ImageFormatError as exc:
                message = str(exc)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message == f"{path}: permission denied"
