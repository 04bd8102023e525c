"""QCOW1 writes against QEMU: seeded random workloads through the backend and
on a raw reference, then `qemu-img compare`; QEMU keeps writing the result."""

import errno
import os
import random
import threading

import pytest

from helpers import open_image, qemu_compare, read_all, run
from qcownbd.errors import ImageIOError

pytestmark = pytest.mark.timeout(150)
MiB = 1024 * 1024


def _whole_clusters(start, end, cluster, size):
    """The clusters a trim may unmap: whole ones, the disk's last partial one counting whole."""
    aligned_end = -(-end // cluster) * cluster if end == size else end // cluster * cluster
    return -(-start // cluster) * cluster, aligned_end


def _random_range(rnd, size, cluster):
    """Unaligned, cross-cluster and cross-L2-table (2 MiB boundary) ranges."""
    choice = rnd.randrange(4)
    if choice == 0:  # straddle an L2 table boundary
        boundary = rnd.randrange(1, max(2, size // (2 * MiB) + 1)) * 2 * MiB
        offset = max(0, min(size - 1, boundary - rnd.randrange(1, 3 * cluster)))
    elif choice == 1:  # cluster aligned
        offset = rnd.randrange(size // cluster) * cluster
    else:
        offset = rnd.randrange(size)
    length = rnd.choice([1, 511, 512, cluster, 3 * cluster + 7, rnd.randrange(1, 40000)])
    return offset, min(length, size - offset)


def _apply_workload(image, ref: bytearray, seed: int, ops: int, trim: bool):
    rnd = random.Random(seed)
    size, cluster = image.size, image.cluster_size
    for step in range(ops):
        offset, length = _random_range(rnd, size, cluster)
        action = rnd.random()
        if action < 0.6:
            data = rnd.randbytes(length)
            image.write(offset, data)
            ref[offset:offset + length] = data
        elif action < 0.75:
            image.write_zeroes(offset, length, may_trim=rnd.random() < 0.5)
            ref[offset:offset + length] = bytes(length)
        elif action < 0.85 and trim:
            image.trim(offset, length)
            start, end = _whole_clusters(offset, offset + length, cluster, size)
            end = min(end, size)
            if start < end:
                ref[start:end] = bytes(end - start)
        elif action < 0.95:
            buf = bytearray(length)
            image.read_into(offset, memoryview(buf))
            assert buf == ref[offset:offset + length], (step, offset, length)
        else:
            image.flush()


def _new_image(tmp_path, size: str, *, read_only=False):
    """A fresh qemu-img-made QCOW1 image without backing, opened; returns (path, image)."""
    img = str(tmp_path / "new.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, size])
    return img, open_image(img, read_only=read_only)


def _close_and_compare(image, img, ref, tmp_path):
    """Our reads equal ``ref``; after close, qemu-img compare agrees."""
    try:
        assert read_all(image) == ref
    finally:
        image.close()
    (tmp_path / "ref.raw").write_bytes(ref)
    result = qemu_compare(img, tmp_path / "ref.raw")
    assert result.returncode == 0, result.stdout + result.stderr


def _run_workload(tmp_path, img, ref_bytes, *, seed, ops=1000, cache=None):
    ref = bytearray(ref_bytes)
    image = open_image(img, read_only=False, cache_tables=cache)
    try:
        _apply_workload(image, ref, seed, ops, trim=image.backing is None)
        assert read_all(image) == ref
        assert image.check().corruptions == []
    finally:
        image.close()
    ref_path = tmp_path / "ref.raw"
    ref_path.write_bytes(ref)
    result = qemu_compare(img, ref_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # QEMU can keep writing what we wrote; we read its writes back
    cmds = ["write -P 0x5c 4095 10000", "write -P 0x3d 2093000 9000", "write -z 65536 8192"]
    for tool_fmt, path in (("qcow", img), ("raw", ref_path)):
        run(["qemu-io", "-f", tool_fmt] + sum((["-c", c] for c in cmds), []) + [path])
    assert qemu_compare(img, ref_path).returncode == 0
    image = open_image(img, read_only=False)
    try:
        assert read_all(image) == ref_path.read_bytes()
        assert image.check().corruptions == []
    finally:
        image.close()


@pytest.mark.parametrize("cache", [None, 2])
def test_random_workload_plain(tmp_path, cache):
    img = str(tmp_path / "w.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, str(9 * MiB + 1536)])
    size = 9 * MiB + 1536
    _run_workload(tmp_path, img, bytes(size), seed=11 + (cache or 0), ops=2000, cache=cache)


@pytest.mark.parametrize("cluster_bits, l2_bits", [(16, 6), (9, 13)])
def test_random_workload_table_not_one_cluster(tmp_path, cluster_bits, l2_bits):
    """A 512 B L2 table in a 64 KiB slot, and a 64 KiB table over 128 clusters of 512 B:
    a new table and its first clusters are laid out (and written) back to back."""
    img = str(tmp_path / "g.qcow")
    size = 9 * MiB + 1536
    run(["qemu-img", "create", "-f", "qcow", img, str(size)])
    with open(img, "r+b") as f:  # both keep l1_shift >= 21: the L1 qemu-img made is big enough
        f.seek(32)
        f.write(bytes([cluster_bits, l2_bits]))
    _run_workload(tmp_path, img, bytes(size), seed=41 + l2_bits, ops=600)


def test_random_workload_into_compressed_clusters(tmp_path):
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    src.write_bytes(b"".join(rnd.choice([(b"abc" * 1400)[:4096], rnd.randbytes(4096), bytes(4096)])
                             for _ in range(1000)))
    img = str(tmp_path / "c.qcow")
    run(["qemu-img", "convert", "-c", "-O", "qcow", src, img], check=False)  # exits 1 in 7.2
    assert qemu_compare(img, src).returncode == 0
    _run_workload(tmp_path, img, src.read_bytes(), seed=21, ops=1500)


def test_random_workload_over_backing_data(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(8).randbytes(5 * MiB))
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", img, str(7 * MiB)])
    _run_workload(tmp_path, img, base.read_bytes() + bytes(2 * MiB), seed=31, ops=1500)


def test_big_cluster_overlay_copies_backing_data(tmp_path):
    """§12 #51: 4 KiB clusters over a backing file, write 512 B: the rest is the backing's."""
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(9).randbytes(2 * MiB))
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", img, "2M"])
    with open(img, "r+b") as f:  # cluster_bits 12, l2_bits 9
        f.seek(32)
        f.write(b"\x0c\x09")
    ref = bytearray(base.read_bytes())
    image = open_image(img, read_only=False)
    image.write(0, b"\xee" * 512)
    image.write(8192 + 100, b"\xdd" * 5000)
    ref[0:512] = b"\xee" * 512
    ref[8292:13292] = b"\xdd" * 5000
    _close_and_compare(image, img, ref, tmp_path)


def test_layout_after_post_commit_overlay(tmp_path):
    """§12 #53: a file ending right after its L1: L2 table at 512, data at 33,280."""
    (tmp_path / "b.raw").write_bytes(bytes(MiB))
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "b.raw", "-F", "raw", img, "1M"])
    os.truncate(img, 64)
    image = open_image(img, read_only=False)
    try:
        image.write(0, b"\x42" * 512)
        image.flush()
        assert list(image.map_extents(0, 512)) == [(0, 512, "data", 33280, 1)]
    finally:
        image.close()
    with open(img, "rb") as f:
        assert int.from_bytes(f.read(64)[56:64], "big") == 512
    run(["qemu-io", "-f", "qcow", "-c", "read -P 0x42 0 512", img])


def test_next_cluster_after_unaligned_compressed_end(tmp_path):
    """§12 #55: the next allocation starts at align_up(EOF)."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"xyz" * 5000 + bytes(2 * MiB))
    img = str(tmp_path / "c.qcow")
    run(["qemu-img", "convert", "-c", "-O", "qcow", src, img], check=False)
    file_size = os.path.getsize(img)
    image = open_image(img, read_only=False)
    try:
        image.write(MiB, b"\x01")
        extents = list(image.map_extents(MiB, 4096))
        assert extents == [(MiB, 4096, "data", -(-file_size // 4096) * 4096, 1)]
    finally:
        image.close()


def test_concurrent_writes_to_one_cluster_allocate_once(tmp_path):
    _, image = _new_image(tmp_path, "4M")
    # the L2 table exists already, so only the data cluster is contended
    image.write(MiB + 8192, b"\x01")
    start_size = os.fstat(image.fd).st_size
    barrier = threading.Barrier(8)

    def writer(k):
        barrier.wait()
        image.write(MiB + 512 * k, bytes([k + 1]) * 512)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert os.fstat(image.fd).st_size == start_size + 4096
        buf = bytearray(4096)
        image.read_into(MiB, memoryview(buf))
        assert buf == b"".join(bytes([k + 1]) * 512 for k in range(8))
    finally:
        image.close()


def test_write_zeroes_and_trim_semantics(tmp_path):
    _, image = _new_image(tmp_path, "4M")
    try:
        assert image.can_trim and image.can_fast_zero
        size_before = os.fstat(image.fd).st_size
        image.write_zeroes(0, 3 * MiB, fast=True)  # unallocated, no backing: nothing to do
        assert os.fstat(image.fd).st_size == size_before
        image.write(0, b"\x07" * 10000)
        with pytest.raises(ImageIOError) as info:  # partial cluster would need a data write
            image.write_zeroes(100, 5000, fast=True)
        assert info.value.errno == errno.ENOTSUP
        buf = bytearray(10000)
        image.read_into(0, memoryview(buf))
        assert buf == b"\x07" * 10000
        image.write_zeroes(0, 8192, fast=True)  # whole clusters: unmapped
        assert [e.hole for e in image.block_status(0, 12288)] == [True, False]
        assert image.has_pending_metadata
        image.flush()
        assert not image.has_pending_metadata
    finally:
        image.close()


def test_write_zeroes_over_backing_writes_zero_clusters(tmp_path):
    (tmp_path / "b.raw").write_bytes(b"\xff" * MiB)
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "b.raw", "-F", "raw", img, "1M"])
    image = open_image(img, read_only=False)
    try:
        assert not image.can_trim and not image.can_fast_zero
        with pytest.raises(ImageIOError) as info:
            image.write_zeroes(0, 4096, fast=True)
        assert info.value.errno == errno.ENOTSUP
        image.trim(0, MiB)  # no-op: unmapping would resurrect nothing, but keep backing
        image.write_zeroes(1000, 3000)
        buf = bytearray(5000)
        image.read_into(0, memoryview(buf))
        assert buf == b"\xff" * 1000 + bytes(3000) + b"\xff" * 1000
    finally:
        image.close()


def test_enospc_on_data_write_leaves_image_consistent(tmp_path, monkeypatch):
    img, image = _new_image(tmp_path, "4M")
    try:
        image.write(0, b"\x01" * 4096)
        image.flush()

        def full(*_args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", full)
        with pytest.raises(ImageIOError) as info:
            image.write(2 * MiB + 10, b"\x02" * 100)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert not image.has_pending_metadata
        assert image.block_status(2 * MiB, 4096)[0].hole
        image.write(MiB, b"\x03" * 10)
        image.flush()
    finally:
        image.close()
    assert run(["qemu-io", "-f", "qcow", "-c", "read -P 3 1M 10", "-c", "read -P 1 0 4096",
                "-c", "read -P 0 2M 4096", img]).returncode == 0


def test_read_only_image_refuses_changes(tmp_path):
    _, image = _new_image(tmp_path, "1M", read_only=True)
    try:
        for call in (lambda: image.write(0, b"x"), lambda: image.trim(0, 4096),
                     lambda: image.write_zeroes(0, 4096)):
            with pytest.raises(ImageIOError) as info:
                call()
            assert info.value.errno == errno.EROFS
        image.flush()
    finally:
        image.close()
        image.close()


def test_flush_in_a_worker_thread_during_writes(tmp_path):
    """The server may flush from a worker thread while the loop thread writes."""
    img = str(tmp_path / "f.qcow")
    run(["qemu-img", "create", "-f", "qcow", img, "8M"])
    image = open_image(img, read_only=False, cache_tables=2)
    ref = bytearray(8 * MiB)
    stop = threading.Event()
    flushes = []

    def flusher():
        while not stop.is_set():
            image.flush()
            flushes.append(1)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        _apply_workload(image, ref, seed=77, ops=1500, trim=True)
    finally:
        stop.set()
        thread.join(30)
    assert len(flushes) > 1
    _close_and_compare(image, img, ref, tmp_path)


def test_through_probe_open_image(tmp_path):
    """The agreed entry point builds this backend with its backing policy."""
    from qcownbd.image.probe import open_image as probe_open

    (tmp_path / "base.raw").write_bytes(b"\x5a" * MiB)
    img = str(tmp_path / "ov.qcow")
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", img, "2M"])
    image = probe_open(img, read_only=False, backing_format="raw")
    try:
        assert image.format_name == "qcow1" and image.backing.format_name == "raw"
        image.write(MiB - 100, b"\x01" * 200)
    finally:
        image.close()
    expected = b"\x5a" * (MiB - 100) + b"\x01" * 200 + bytes(MiB - 100)
    (tmp_path / "ref.raw").write_bytes(expected)
    assert qemu_compare(img, tmp_path / "ref.raw").returncode == 0
