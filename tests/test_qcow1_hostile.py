"""Every hostile/edge image of qcow1.md §12 gets the "want" column's behaviour.

The images are hostile_qcow1's, crafted with the §14 header packer.  Rows
24-30 (backing-name policy: json:, protocols, loops, depth, format pin) belong
to probe.open_image and are tested with it; row 26's resolution is what
`backing_opener_for` (helpers) does.
"""

import errno
import logging
import os
import random
from array import array

import pytest

from helpers import hdr, open_image, read_all, run
from hostile_qcow1 import MAPPINGS, OPEN_ERRORS, TEXT, MiB, layout
from qcownbd.errors import ImageFormatError, ImageIOError
from qcownbd.image import qcow1_check
from qcownbd.image.qcow1 import Qcow1Image

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("case,data,message", OPEN_ERRORS, ids=[c[0] for c in OPEN_ERRORS])
@pytest.mark.parametrize("read_only", [True, False])
def test_open_errors(tmp_path, case, data, message, read_only):
    path = tmp_path / "hostile.qcow"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        with pytest.raises(ImageFormatError) as info:
            Qcow1Image(fd, str(path), read_only=read_only, backing_opener=None)
    finally:
        os.close(fd)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text, text


@pytest.mark.parametrize("case,data,guest,want,rw", MAPPINGS, ids=[c[0] for c in MAPPINGS])
def test_hostile_mappings(tmp_path, case, data, guest, want, rw):
    path = tmp_path / "hostile.qcow"
    path.write_bytes(data)
    image = open_image(path)
    try:
        buf = bytearray(4096 if want == "eio" else len(want))
        if want == "eio":
            with pytest.raises(ImageIOError) as info:
                image.read_into(guest, memoryview(buf))
            assert info.value.errno == errno.EIO
            # only that read fails: the rest of the disk stays readable
            image.read_into(image.size - 4096 if guest == 0 else 0, memoryview(buf))
        else:
            image.read_into(guest, memoryview(buf))
            assert buf == want
    finally:
        image.close()
    if rw == "refused":
        with pytest.raises(ImageFormatError, match="corrupt metadata, refusing read-write"):
            open_image(path, read_only=False)
    else:
        open_image(path, read_only=False).close()


@pytest.mark.parametrize("case", ["32-L1-past-eof", "34-two-L1-same-L2", "39-two-L2-same-data",
                                  "37-L2-past-eof", "50-run-over-L2"])
def test_repair_drops_bad_pointers_durably(tmp_path, case):
    data = next(m[1] for m in MAPPINGS if m[0] == case)
    path = tmp_path / "hostile.qcow"
    path.write_bytes(data)
    image = open_image(path, read_only=False, allow_corrupt=True)
    try:
        with pytest.raises(ImageIOError):
            image.write(0, b"x")
        report = image.check()
        assert report.corruptions and not report.repaired
        report = image.check(repair=True)
        assert report.repaired
        assert image.check().corruptions == []
        image.write(0, TEXT)  # writable again
    finally:
        image.close()
    image = open_image(path, read_only=False)
    try:
        assert image.check().corruptions == []
        buf = bytearray(4096)
        image.read_into(0, memoryview(buf))
        assert buf == TEXT
    finally:
        image.close()
    run(["qemu-io", "-f", "qcow", "-c", "read -P 0x68 0 1", path])  # 'h' of TEXT


def test_accepted_oddities(tmp_path, caplog):
    """#6 size 1000 → 512-byte export + warning; #18 padding/mtime; #21 empty name."""
    caplog.set_level(logging.WARNING)
    cases = {"size1000": layout(size=1000), "pad": layout(pad=0xFFFF, mtime=0x12345678),
             "emptyname": layout(bfo=48, bfs=0, l1o=48)}
    for name, data in cases.items():
        path = tmp_path / f"{name}.qcow"
        path.write_bytes(data)
        image = open_image(path)
        try:
            assert image.size == (512 if name == "size1000" else MiB)
            assert image.backing is None
        finally:
            image.close()
    assert "not a multiple of 512" in caplog.text
    assert "name length 0: no backing file" in caplog.text


def test_1023_byte_backing_name(tmp_path):
    """#20: the longest name QEMU accepts opens (resolved against the overlay's dir)."""
    (tmp_path / "b.raw").write_bytes(b"\x61" * 4096)
    name = "./" * 509 + "b.raw"
    assert len(name) == 1023
    path = tmp_path / "ov.qcow"
    run(["qemu-img", "create", "-f", "qcow", "-b", name, "-F", "raw", path, "4096"])
    image = open_image(path)
    try:
        assert image.backing_name == name
        assert read_all(image) == b"\x61" * 4096
    finally:
        image.close()


def test_dangling_l1_is_unallocated_read_only_and_next_free_past_tail(tmp_path):
    """#32 read-only parity; #56: allocation starts after a cluster straddling EOF."""
    path = tmp_path / "tail.qcow"
    path.write_bytes(layout({0: 8192}, {8192: TEXT[:1000]}))
    image = open_image(path, read_only=False)
    try:
        image.write(4096, b"\x01")
        host = [h for _s, _n, kind, h, _d in image.map_extents(4096, 4096)]
        assert host == [12288]
    finally:
        image.close()


def test_unaligned_l1_offset_is_read_only(tmp_path):
    """Pointer writes into an L1 at 52 could straddle sectors: refuse read-write."""
    path = tmp_path / "l1at52.qcow"
    path.write_bytes(hdr(l1o=52) + bytes(12))
    open_image(path).close()
    with pytest.raises(ImageFormatError, match="not 8-aligned"):
        open_image(path, read_only=False)


def test_check_counts_leaks_of_unmapped_clusters(tmp_path):
    """Clusters nobody references are leaks, unless the file stores nothing there: a
    trim gives them back (the file shrinks, or they are punched out), qemu-img's
    leaks are counted."""
    path = tmp_path / "leak.qcow"
    run(["qemu-img", "create", "-f", "qcow", path, "1M"])
    image = open_image(path, read_only=False)
    try:
        image.write(0, TEXT * 3)
        assert image.check().leaked_bytes == 0
        size = os.path.getsize(path)
        image.trim(4096, 8192)
        report = image.check()
        assert (report.corruptions, report.leaked_bytes) == ([], 0)
        assert os.path.getsize(path) == size - 8192
    finally:
        image.close()
    # a leak the way QEMU leaves them: a cluster written, its pointer gone
    with open(path, "r+b") as file:
        file.seek(0, os.SEEK_END)
        file.write(b"L" * 4096)
    image = open_image(path, read_only=True)       # as `qcownbd check` opens it
    try:
        assert image.check().leaked_bytes == 4096
    finally:
        image.close()


@pytest.mark.parametrize("shape", ["ascending", "shuffled", "one step out of order"])
def test_cluster_order_in_steps_equals_one_sort(shape):
    """The scan orders data clusters in steps (so a worker thread yields the GIL):
    the same order as one stable sort, across step boundaries and duplicates."""
    count = 3 * qcow1_check._SORT_RUN + 1234
    keys = array("Q", (start * 512 for start in range(count)))
    if shape == "shuffled":
        random.Random(3).shuffle(keys)
        keys[10:20] = keys[1000:1010]           # duplicates: aliased clusters
    elif shape == "one step out of order":
        keys[qcow1_check._SORT_RUN] = 0        # only a boundary comparison catches this
    order = qcow1_check._order_of(keys)
    assert list(order) == sorted(range(count), key=keys.__getitem__)
