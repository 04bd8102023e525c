"""RawImage against the kernel's own view (SEEK_DATA/SEEK_HOLE) and qemu-io/qemu-img."""

import errno
import json
import os
import random
import subprocess
import threading

import pytest

from helpers import raw_file, read, run
from qcownbd.errors import ImageIOError
from qcownbd.image.raw import RawImage

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def open_raw(path, read_only=False):
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    return RawImage(fd, str(path), read_only=read_only)


def kernel_map(path, length):
    """[(start, end, is_data)] straight from lseek, the truth block_status must match."""
    fd = os.open(path, os.O_RDONLY)
    try:
        runs, pos = [], 0
        while pos < length:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                data = length
            if data > pos:
                runs.append((pos, min(data, length), False))
                pos = min(data, length)
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), length)
            runs.append((pos, hole, True))
            pos = hole
        return runs
    finally:
        os.close(fd)


def our_map(img):
    runs, pos = [], 0
    while pos < img.size:
        extents = img.block_status(pos, img.size - pos)
        assert extents and sum(e.length for e in extents) <= img.size - pos
        for e in extents:
            assert e.hole == e.zero and e.depth == 1  # QEMU: all of a raw image is 'local'
            runs.append((pos, pos + e.length, not e.hole))
            pos += e.length
    return runs


def qemu_data_runs(path):
    """qemu-img's map of the raw file as [(start, end, is_data)], adjacent equal runs merged."""
    out = run(["qemu-img", "map", "-f", "raw", "--output=json", path], timeout=30).stdout
    runs = []
    for e in json.loads(out):
        start, end, data = e["start"], e["start"] + e["length"], e["data"]
        if runs and runs[-1][2] == data and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end, data)
        else:
            runs.append((start, end, data))
    return runs


def test_reads_what_qemu_wrote_and_qemu_reads_what_we_wrote(tmp_path):
    path = raw_file(tmp_path / "a.raw", size=4 * MiB)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4095 10000", path], timeout=30)
    img = open_raw(path)
    assert img.size == 4 * MiB and img.format_name == "raw"
    assert read(img, 4095, 10000) == b"\xab" * 10000
    assert read(img, 4090, 5) == bytes(5)
    img.write(MiB + 7, b"\xcd" * 70001)
    img.write(3 * MiB, memoryview(bytearray(b"\x11" * 512))[100:300])
    img.flush()
    img.close()
    img.close()  # idempotent
    run(["qemu-io", "-f", "raw", "-c", "read -P 0xcd 1048583 70001",
         "-c", "read -P 0x11 3145728 200", "-c", "read -P 0 3145928 312", path], timeout=30)


def test_zeroes_and_trim_punch_holes_or_allocate(tmp_path):
    path = raw_file(tmp_path / "z.raw", size=2 * MiB)
    img = open_raw(path)
    img.write(0, b"\x55" * (2 * MiB))
    img.write_zeroes(65536, 131072)                      # may_trim: a hole
    img.write_zeroes(524288, 65536, may_trim=False)       # must stay allocated
    img.write_zeroes(1000, 3000)                          # inside one block: zeros
    img.trim(MiB, 262144)
    img.flush()
    assert read(img, 0, 1000) == b"\x55" * 1000
    assert read(img, 1000, 3000) == bytes(3000)
    assert read(img, 4000, 61536) == b"\x55" * 61536
    assert read(img, 65536, 131072) == bytes(131072)
    assert read(img, 524288, 65536) == bytes(65536)
    assert read(img, MiB, 262144) == bytes(262144)
    truth = kernel_map(path, 2 * MiB)
    holes = [(s, e) for s, e, data in truth if not data]
    assert (65536, 196608) in holes and (MiB, MiB + 262144) in holes
    assert not any(s < 589824 and e > 524288 for s, e in holes)
    img.close()
    run(["qemu-io", "-f", "raw", "-c", "read -P 0 65536 131072",
         "-c", "read -P 0x55 196608 327680", path], timeout=30)


def test_block_status_matches_seek_data_and_qemu_map(tmp_path):
    path = raw_file(tmp_path / "s.raw", size=8 * MiB + 512)
    rng = random.Random(4)
    img = open_raw(path)
    for _ in range(40):
        off = rng.randrange(0, img.size - 70000)
        img.write(off, os.urandom(rng.randrange(1, 70000)))
    for _ in range(15):
        off = rng.randrange(0, img.size - 300000)
        img.trim(off, rng.randrange(1, 300000))
    img.flush()
    ours = our_map(img)
    assert ours == kernel_map(path, img.size)
    assert ours == qemu_data_runs(path)
    # any sub-range: extents start at the offset asked and stay inside the length
    for _ in range(20):
        off = rng.randrange(0, img.size - 1)
        length = rng.randrange(1, img.size - off + 1)
        extents = img.block_status(off, length)
        assert 0 < sum(e.length for e in extents) <= length
        first = next(r for r in ours if r[0] <= off < r[1])
        assert extents[0].hole == (not first[2])
    img.close()


def test_fast_zero_refused_where_only_writes_would_do(tmp_path):
    # tmpfs can punch holes but has no FALLOC_FL_ZERO_RANGE: zeroing without
    # leaving a hole costs real writes there, so fast must say ENOTSUP untouched
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = raw_file(f"/dev/shm/qcownbd-test-{os.getpid()}.raw", size=MiB)
    try:
        img = open_raw(path)
        img.write(0, b"\x77" * MiB)
        with pytest.raises(ImageIOError) as info:
            img.write_zeroes(4096, 8192, may_trim=False, fast=True)
        assert info.value.errno == errno.ENOTSUP
        assert read(img, 4096, 8192) == b"\x77" * 8192
        img.write_zeroes(4096, 8192, may_trim=True, fast=True)    # punch: cheap
        img.write_zeroes(65536, 8192, may_trim=False)              # real zero writes
        assert read(img, 4096, 8192) == bytes(8192) == read(img, 65536, 8192)
        assert all(data for s, e, data in kernel_map(path, MiB) if s < 73728 and e > 65536)
        img.close()
    finally:
        os.unlink(path)


def test_read_only_refuses_changes_and_errors_carry_errno(tmp_path):
    path = raw_file(tmp_path / "ro.raw", size=MiB)
    img = open_raw(path, read_only=True)
    assert img.read_only and not img.can_trim and not img.can_fast_zero
    for call in (lambda: img.write(0, b"x"), lambda: img.trim(0, 512),
                 lambda: img.write_zeroes(0, 512)):
        with pytest.raises(ImageIOError) as info:
            call()
        assert info.value.errno == errno.EROFS
    img.flush()
    img.close()
    with pytest.raises(ImageIOError) as info:
        img.read_into(0, memoryview(bytearray(10)))
    assert info.value.errno == errno.EBADF


def test_file_shrunk_under_us_reads_zeros_and_flush_from_thread(tmp_path):
    path = raw_file(tmp_path / "t.raw", size=MiB)
    img = open_raw(path)
    img.write(0, b"\x01" * MiB)
    os.truncate(path, 4096)
    assert read(img, 0, 8192) == b"\x01" * 4096 + bytes(4096)
    errors = []

    def flusher():
        try:
            for _ in range(20):
                img.flush()
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=flusher)
    thread.start()
    for i in range(200):
        img.write(i * 512, b"\x02" * 512)
    thread.join(30)
    assert not errors
    img.close()
    assert open(path, "rb").read(102400) == b"\x02" * 102400


@pytest.fixture
def loop_device(tmp_path):
    backing = raw_file(tmp_path / "loop.img", size=4 * MiB)
    res = subprocess.run(["losetup", "-f", "--show", str(backing)],
                         capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    yield dev, backing
    subprocess.run(["losetup", "-d", dev], timeout=20, check=True)


def test_block_device(loop_device):
    dev, backing = loop_device
    img = open_raw(dev)
    assert img.is_block_device and img.size == 4 * MiB
    assert img.block_status(0, img.size)[0].length == img.size   # no SEEK_DATA on devices
    img.write(1000, b"\x99" * 100000)
    img.write_zeroes(1001, 50000)         # unaligned: edges written, middle zeroed cheaply
    img.write_zeroes(60000, 1000, may_trim=False)
    img.trim(2 * MiB, MiB)
    img.flush()
    expected = bytes(1000) + b"\x99" + bytes(50000) + b"\x99" * 8999 + bytes(1000) \
        + b"\x99" * 40000
    assert read(img, 0, 101000) == expected
    img.close()
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x99 61000 40000",
         "-c", "read -P 0 1001 50000", dev], timeout=30)
