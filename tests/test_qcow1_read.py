"""QCOW1 reads against QEMU: images made by qemu-img/qemu-io read byte-identical
to `qemu-img convert -O raw`; block status and map agree with `qemu-img map`."""

import json
import os
import random
import subprocess
import time

import pytest

from helpers import open_image, qemu_io, qemu_raw, read_all, run, whole_status
from qcownbd.image.backend import Extent

pytestmark = pytest.mark.timeout(120)


def _mixed_source(path, size, seed):
    """Text, random, zero and repeated-byte stretches (compressible and not)."""
    rnd = random.Random(seed)
    parts, total = [], 0
    while total < size:
        kind = rnd.randrange(4)
        n = rnd.randrange(1, 20000)
        chunk = [b"qcownbd text " * (n // 13 + 1), rnd.randbytes(n), bytes(n),
                 bytes([rnd.randrange(256)]) * n][kind][:n]
        parts.append(chunk)
        total += n
    with open(path, "wb") as f:
        f.write(b"".join(parts)[:size])


def _assert_reads_like_qemu(img, tmp_path, **open_kwargs):
    expected = qemu_raw(img, tmp_path / "expected.raw")
    image = open_image(img, **open_kwargs)
    try:
        assert image.size == len(expected)
        assert read_all(image) == expected
        rnd = random.Random(7)
        for _ in range(200):  # unaligned reads of every size through the cache
            offset = rnd.randrange(image.size)
            length = rnd.randrange(1, min(70000, image.size - offset) + 1)
            buf = bytearray(length)
            image.read_into(offset, memoryview(buf))
            assert buf == expected[offset:offset + length], (offset, length)
    finally:
        image.close()


@pytest.mark.parametrize("size", ["2101760", "5000000", "3M"])
def test_plain_image_written_by_qemu(tmp_path, size):
    img = str(tmp_path / "a.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, size])
    qemu_io(img, "write -P 0xab 4096 10240", "write -P 0x11 1M 70000",
            "write -P 0x5a 2093056 8192", "write -z 0 4096")
    _assert_reads_like_qemu(img, tmp_path)
    _assert_reads_like_qemu(img, tmp_path, cache_tables=2)


def test_compressed_image(tmp_path):
    src = tmp_path / "src.raw"
    _mixed_source(src, 3 * 1024 * 1024 + 1000, seed=3)
    img = str(tmp_path / "c.qcow")
    # qemu-img 7.2 exits 1 after writing a complete image (qcow1.md §5): verify with compare
    run(["qemu-img", "convert", "-c", "-O", "qcow", src, img], check=False)
    run(["qemu-img", "compare", "-f", "qcow", img, "-F", "raw", src])
    kinds = set()
    image = open_image(img)
    kinds = {kind for _s, _l, kind, _h, _d in image.map_extents()}
    image.close()
    assert kinds == {"compressed", "data", "unallocated"}
    _assert_reads_like_qemu(img, tmp_path)


def test_backing_chain_raw_qcow1_qcow1(tmp_path):
    """raw ← qcow1 ← qcow1 with relative names and differing sizes."""
    (tmp_path / "bk").mkdir()
    base = tmp_path / "bk" / "base.raw"
    base.write_bytes(random.Random(1).randbytes(3 * 1024 * 1024 + 4096))
    mid = str(tmp_path / "bk" / "mid.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", mid, "5M"])
    qemu_io(mid, "write -P 0x22 1000k 300k", "write -P 0x23 4M 4096")
    top = str(tmp_path / "top.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "bk/mid.qcow", "-F", "qcow", top, "6M"])
    qemu_io(top, "write -P 0x33 1M 512", "write -P 0x34 5M 1M")
    _assert_reads_like_qemu(top, tmp_path)
    image = open_image(top)
    try:
        assert image.backing_name == "bk/mid.qcow"
        assert image.backing.backing_name == "base.raw"
        status = whole_status(image)
        assert sum(e.length for e in status) == image.size
        # the 4 KiB at 4M lie past the raw base, in mid only: depth 2
        found = _status_at(status, 4 * 1024 * 1024)
        assert (found.hole, found.depth) == (False, 2)
        assert _status_at(status, 1024 * 1024).depth == 1
        # between 3M+4K and 4M nothing anywhere: past the raw base's end, which
        # qemu-nbd -A still reports at the base's depth (3), as we do
        hole = _status_at(status, 3 * 1024 * 1024 + 8192)
        assert (hole.hole, hole.zero, hole.depth) == (True, True, 3)
    finally:
        image.close()


def _status_at(extents, offset):
    pos = 0
    for ext in extents:
        if pos <= offset < pos + ext.length:
            return ext
        pos += ext.length
    raise AssertionError(offset)


def test_map_matches_qemu_img_map(tmp_path):
    img = str(tmp_path / "m.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, "8M"])
    qemu_io(img, "write -P 1 0 12k", "write -P 2 2M 4k", "write -P 3 6M 100k")
    qmap = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow", img]).stdout)
    image = open_image(img)
    try:
        ours = list(image.map_extents())
        expected = [(e["start"], e["length"], "data" if e["data"] else "unallocated",
                     e.get("offset")) for e in qmap]
        assert [(s, n, k, h) for s, n, k, h, _d in ours] == expected
        status = whole_status(image)
        assert [(e.length, e.hole) for e in status] == [
            (e["length"], not e["data"]) for e in qmap]
    finally:
        image.close()


@pytest.mark.timeout(60)
def test_block_status_of_2tib_sparse_image_is_fast(tmp_path):
    img = str(tmp_path / "big.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, "2T"])
    qemu_io(img, "write -P 9 1T 4k", "write -P 9 1536G 8k")
    image = open_image(img)
    try:
        started = time.monotonic()
        status = whole_status(image)
        elapsed = time.monotonic() - started
        tib = 1 << 40
        assert status == [Extent(tib, True, True, 0), Extent(4096, False, False, 1),
                          Extent(tib // 2 - 4096, True, True, 0), Extent(8192, False, False, 1),
                          Extent(tib // 2 - 8192, True, True, 0)]
        assert elapsed < 2.0
        assert image.allocated_bytes() == 12288
    finally:
        image.close()


def test_size_not_multiple_of_cluster_or_sector(tmp_path):
    """size 1 MiB + 512 and a 1000-byte header size: QEMU's floor-to-512 view."""
    img = str(tmp_path / "odd.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, str(1024 * 1024 + 512)])
    qemu_io(img, "write -P 0x77 1048576 512", "write -P 0x78 1000 3000")
    _assert_reads_like_qemu(img, tmp_path)
    with open(img, "r+b") as f:  # header size 1000 → a 512-byte disk
        f.seek(24)
        f.write((1000).to_bytes(8, "big"))
    image = open_image(img)
    try:
        assert image.size == 512
        assert read_all(image) == bytes(512)
    finally:
        image.close()
    assert os.path.getsize(img) > 0


def _qemu_nbd_map(img, sock):
    """base:allocation of qemu-nbd serving the image: [(length, hole, zero)]."""
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow", "-k", str(sock), str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = run(["nbdinfo", "--map", f"nbd+unix:///?socket={sock}"]).stdout
    finally:
        proc.terminate()
        proc.wait(10)
    extents = []
    for line in out.splitlines():
        _offset, length, _type, flags = line.split(None, 3)
        _merge(extents, (int(length), "hole" in flags, "zero" in flags))
    return extents


def _merge(extents, item):
    if extents and extents[-1][1:] == item[1:]:
        extents[-1] = (extents[-1][0] + item[0], *item[1:])
    else:
        extents.append(item)


def test_block_status_matches_qemu_nbd(tmp_path):
    """Unallocated: hole,zero unless the backing file (raw holes included) has data."""
    base = tmp_path / "b.raw"
    with open(base, "wb") as f:
        f.truncate(3 * 1024 * 1024)
        f.seek(4096)
        f.write(b"x" * 8192)
        f.seek(1024 * 1024)
        f.write(b"y" * 100)
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "b.raw", "-F", "raw", img, "4M"])
    qemu_io(img, "write -P 1 2M 4k", "write -P 2 0 512", "write -P 3 3M 1536")
    expected = _qemu_nbd_map(img, tmp_path / "s.sock")
    image = open_image(img)
    try:
        ours = []
        for ext in whole_status(image):
            _merge(ours, (ext.length, ext.hole, ext.zero))
    finally:
        image.close()
    assert ours == expected
