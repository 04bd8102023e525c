"""create_qcow1 is byte-identical to `qemu-img create -f qcow` (qcow1.md §2, §13)."""

import pytest

from helpers import open_image, run
from qcownbd.errors import ImageFormatError
from qcownbd.image.qcow1 import create_qcow1

pytestmark = pytest.mark.timeout(60)
SIZES = [512, 1000, 2 * 1024 * 1024, 2 * 1024 * 1024 + 512, 64 * 1024 * 1024, 10_000_000]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backing", [None, "base.raw", "../some dir/longer-backing-name.raw"])
def test_create_is_byte_identical_to_qemu_img(tmp_path, size, backing):
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    theirs, ours = tmp_path / "theirs.qcow", tmp_path / "ours.qcow"
    cmd = ["qemu-img", "create", "-f", "qcow"]
    if backing:
        cmd += ["-u", "-b", backing, "-F", "raw"]
    run(cmd + [theirs, str(size)])
    create_qcow1(ours, size, backing)
    assert ours.read_bytes() == theirs.read_bytes()


def test_created_image_opens_and_is_empty(tmp_path):
    path = tmp_path / "new.qcow"
    create_qcow1(path, 3 * 1024 * 1024)
    image = open_image(path, read_only=False)
    try:
        assert image.size == 3 * 1024 * 1024
        assert image.cluster_size == 4096 and image.backing is None
        assert image.check().corruptions == []
        assert image.allocated_bytes() == 0
    finally:
        image.close()
    run(["qemu-io", "-f", "qcow", "-c", "read -P 0 0 3M", path])


@pytest.mark.parametrize("size,backing,message", [
    (0, None, "zero length"),
    (1024, "x" * 1024, "too long"),
])
def test_create_refuses_bad_arguments(tmp_path, size, backing, message):
    with pytest.raises(ImageFormatError, match=message):
        create_qcow1(tmp_path / "bad.qcow", size, backing)
    assert not (tmp_path / "bad.qcow").exists()


def test_create_refuses_existing_file_unless_told(tmp_path):
    path = tmp_path / "exists.qcow"
    path.write_bytes(b"keep me")
    with pytest.raises(ImageFormatError, match="File exists"):
        create_qcow1(path, 4096)
    assert path.read_bytes() == b"keep me"
    create_qcow1(path, 4096, overwrite=True)
    assert len(path.read_bytes()) == 560


def test_create_accepts_1023_byte_backing_name(tmp_path):
    name = "n" * 1023
    theirs, ours = tmp_path / "theirs.qcow", tmp_path / "ours.qcow"
    run(["qemu-img", "create", "-f", "qcow", "-u", "-b", name, "-F", "raw", theirs, "1M"])
    create_qcow1(ours, 1024 * 1024, name.encode())
    assert ours.read_bytes() == theirs.read_bytes()
