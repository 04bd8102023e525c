"""QEMU-compatible image locks: QEMU tools and a second qcownbd keep off a live image."""

import subprocess

import pytest

from helpers import run
from qcownbd.errors import ImageFormatError
from qcownbd.image.probe import open_image

pytestmark = pytest.mark.timeout(60)


def qemu(*args):
    """A QEMU tool's CompletedProcess, whatever its exit status."""
    return run(args, timeout=30, check=False)


@pytest.fixture
def images(tmp_path):
    qcow = tmp_path / "img.qcow"
    raw = tmp_path / "img.raw"
    run(["qemu-img", "create", "-f", "qcow", qcow, "1M"], timeout=30)
    run(["qemu-img", "create", "-f", "raw", raw, "1M"], timeout=30)
    return qcow, raw


def test_qemu_refuses_an_image_we_write(images):
    qcow, raw = images
    live_qcow = open_image(qcow)
    live_raw = open_image(raw)
    try:
        assert live_qcow.format_name == "qcow1" and not live_qcow.read_only
        for args in (["qemu-io", "-f", "qcow", "-c", "read 0 512", qcow],
                     ["qemu-io", "-r", "-f", "qcow", "-c", "read 0 512", qcow],
                     ["qemu-img", "info", qcow],
                     ["qemu-io", "-f", "raw", "-c", "write 0 512", raw]):
            res = qemu(*args)
            assert res.returncode != 0, args
            assert "lock" in res.stderr and "another process" in res.stderr, res.stderr
        # QEMU's raw readers share writes, as between two QEMU processes; -U
        # (force share) lets a qcow reader peek
        assert qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", raw).returncode == 0
        assert qemu("qemu-io", "-U", "-r", "-f", "qcow", "-c", "read 0 512", qcow).returncode == 0
        assert qemu("qemu-img", "info", "-U", qcow).returncode == 0
    finally:
        live_qcow.close()
        live_raw.close()
    # closing the fd released everything
    run(["qemu-io", "-f", "qcow", "-c", "write 0 512", qcow], timeout=30)
    run(["qemu-io", "-f", "raw", "-c", "write 0 512", raw], timeout=30)


def test_read_only_open_lets_readers_in_but_keeps_writers_out(images):
    _, raw = images
    reader = open_image(raw, read_only=True)
    try:
        second_reader = open_image(raw, read_only=True)
        second_reader.close()
        assert qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", raw).returncode == 0
        res = qemu("qemu-io", "-f", "raw", "-c", "write 0 512", raw)
        assert res.returncode != 0 and "write" in res.stderr and "lock" in res.stderr
        with pytest.raises(ImageFormatError, match="in use by another process"):
            open_image(raw)
    finally:
        reader.close()


def test_second_qcownbd_refuses_and_qemu_holder_blocks_us(images, tmp_path):
    qcow, raw = images
    live = open_image(raw)
    try:
        with pytest.raises(ImageFormatError, match=rf"{raw}: image is in use"):
            open_image(raw)
        with pytest.raises(ImageFormatError, match="in use"):
            open_image(raw, read_only=True)
        # lock=False is the operator's explicit override
        open_image(raw, read_only=True, lock=False).close()
    finally:
        live.close()
    # a QEMU writer (qemu-io waiting on stdin) keeps us out in turn
    proc = subprocess.Popen(["qemu-io", "-f", "qcow", str(qcow)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        assert "read 512/512" in proc.stdout.readline()
        with pytest.raises(ImageFormatError, match="in use"):
            open_image(qcow, fmt="raw", read_only=True)
    finally:
        proc.communicate("quit\n", timeout=30)
    open_image(qcow, fmt="raw").close()
