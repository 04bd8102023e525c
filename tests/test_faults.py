"""I/O faults through a real server: injected EIO/ENOSPC (QCOWNBD_FAULTS) and a full tmpfs.

Each test proves the same four things: the client gets the errno as an NBD
error reply, the server keeps serving (a new connection works), the image
stays consistent (`qcownbd check` 0 or 3, `qemu-img compare` with a
reference holding exactly the successful writes), and writes that succeed
after the fault is gone land correctly.
"""

import errno
import os
import random
import subprocess

import pytest

from helpers import (SECTOR, assert_sectors_old_or_new, make_qcow1, qcownbd_check, qcownbd_cmd,
                     qcownbd_env, qemu_compare, qemu_raw, run)
from nbdclient import CMD_FLUSH, CMD_READ, FLAG_FUA, NBD_EIO, NBD_ENOSPC, NbdClient
from qcownbd.image.faults import parse_rules

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
SIZE = 8 * MiB


def _write_ok(client, ref: bytearray, offset: int, data: bytes, flags: int = 0) -> None:
    assert client.write(offset, data, flags) == 0, f"write at {offset} failed"
    ref[offset:offset + len(data)] = data


def _finish(server, client, image: str, ref: bytearray, tmp_path, fmt: str) -> None:
    """Flush, read all back, stop cleanly; then check the image and compare it with ``ref``."""
    assert client.flush() == 0
    assert client.read(0, len(ref)) == ref
    client.close()
    assert server.stop() == 0
    assert "Traceback" not in server.stderr
    if fmt == "qcow1":
        qcownbd_check(image)
    (tmp_path / "ref.raw").write_bytes(ref)
    result = qemu_compare(image, tmp_path / "ref.raw", "qcow" if fmt == "qcow1" else "raw")
    assert result.returncode == 0, result.stdout + result.stderr


def _new_image(tmp_path, fmt: str, size: int = SIZE, where=None) -> str:
    where = where or tmp_path
    image = str(where / ("disk.qcow" if fmt == "qcow1" else "disk.raw"))
    run(["qemu-img", "create", "-f", "qcow" if fmt == "qcow1" else "raw", image, str(size)])
    return image


def test_fault_spec_parsing():
    rules = parse_rules("write:EIO:after=3,count=2;fdatasync:ENOSPC:prob=0.5,seed=7,while=/x")
    assert [(r.op, r.errno) for r in rules] == [("write", 5), ("sync", 28)]
    first = rules[0]
    assert [first.should_fail() for _ in range(8)] == [False] * 3 + [True] * 2 + [False] * 3
    assert rules[1].while_path == "/x" and not rules[1].should_fail()  # /x does not exist
    for bad in ("write", "scribble:EIO", "write:ENOPE", "write:EIO:after=x", "write:EIO:when=1"):
        with pytest.raises(ValueError):
            parse_rules(bad)


def test_bad_fault_spec_is_one_line_error(tmp_path):
    result = run(qcownbd_cmd("check", tmp_path / "x"), timeout=60, check=False,
                 env=qcownbd_env(QCOWNBD_FAULTS="write:EIO:often"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "QCOWNBD_FAULTS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["qcow1", "raw"])
@pytest.mark.parametrize("errname, nbd_errno", [("EIO", NBD_EIO), ("ENOSPC", NBD_ENOSPC)])
def test_injected_write_fault(tmp_path, logged_server, fmt, errname, nbd_errno):
    image = _new_image(tmp_path, fmt)
    switch = tmp_path / "faults-on"
    server = logged_server(f"d={image}", env={"QCOWNBD_FAULTS": f"write:{errname}:while={switch}"})
    rnd, ref = random.Random(5), bytearray(SIZE)
    client = NbdClient.connect(server.port, "d")
    for offset in range(0, 2 * MiB, 256 * 1024):       # allocated before the fault
        _write_ok(client, ref, offset, rnd.randbytes(70000))
    assert client.flush() == 0

    switch.touch()
    for offset in (0, 100000, 3 * MiB, 5 * MiB + 7):   # overwrites and new allocations
        assert client.write(offset, rnd.randbytes(9000)) == nbd_errno
    assert client.write(6 * MiB, rnd.randbytes(4096), FLAG_FUA) == nbd_errno
    qemu_io = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 4k", server.uri("d")],
                  check=False, timeout=60)
    assert f"write failed: {os.strerror(getattr(errno, errname))}" in qemu_io.stdout
    assert client.read(0, 70000) == ref[:70000]       # reads go on
    other = NbdClient.connect(server.port, "d")        # and so do new clients
    assert other.read(100000, 9000) == ref[100000:109000]
    other.close()

    switch.unlink()
    for offset in (100000, 3 * MiB, 5 * MiB + 7, 6 * MiB):
        _write_ok(client, ref, offset, rnd.randbytes(12345))
    _finish(server, client, image, ref, tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["qcow1", "raw"])
def test_failed_flush_then_successful_flush_is_durable(tmp_path, logged_server, fmt):
    """Acknowledged writes survive a failed FLUSH: the next good FLUSH must cover them."""
    image = _new_image(tmp_path, fmt)
    switch = tmp_path / "faults-on"
    server = logged_server(f"d={image}", env={"QCOWNBD_FAULTS": f"sync:EIO:while={switch}"})
    rnd, ref = random.Random(6), bytearray(SIZE)
    client = NbdClient.connect(server.port, "d")
    switch.touch()
    for offset in range(0, 4 * MiB, 300000):
        _write_ok(client, ref, offset, rnd.randbytes(40000))
    assert client.flush() == NBD_EIO
    fua_data = rnd.randbytes(5000)
    assert client.write(7 * MiB, fua_data, FLAG_FUA) == NBD_EIO
    assert client.call(CMD_FLUSH)[0] == NBD_EIO
    switch.unlink()
    _write_ok(client, ref, 6 * MiB, rnd.randbytes(777))
    assert client.flush() == 0
    server.kill9()                                      # no clean shutdown to hide a loss
    assert "Traceback" not in server.log
    if fmt == "qcow1":
        qcownbd_check(image)
    got = qemu_raw(image, tmp_path / "got.raw", "qcow" if fmt == "qcow1" else "raw")
    # the FUA write failed: each of its sectors may hold the old or the new bytes
    fua_got = got[7 * MiB:7 * MiB + len(fua_data)]
    assert_sectors_old_or_new(fua_got, bytes(len(fua_data)), fua_data)
    ref[7 * MiB:7 * MiB + len(fua_data)] = fua_got
    assert got == ref


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for the test (skipped, with the reason, if mounting fails)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)


@pytest.mark.parametrize("fmt", ["qcow1", "raw"])
def test_real_enospc_on_a_full_tmpfs(tmp_path, small_tmpfs, logged_server, fmt):
    size = 32 * MiB
    image = _new_image(tmp_path, fmt, size, where=small_tmpfs)
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(bytes(2 * MiB))
    server = logged_server(f"d={image}")
    rnd, ref = random.Random(7), bytearray(size)
    client = NbdClient.connect(server.port, "d")
    chunk, offset, errors = 64 * 1024, 0, []
    while offset < size and len(errors) < 3:
        data = rnd.randbytes(chunk)
        error = client.write(offset, data)
        if error:
            errors.append(error)
        else:
            ref[offset:offset + chunk] = data
        offset += chunk
    assert errors == [NBD_ENOSPC] * 3, errors
    assert 4 * MiB < offset < 8 * MiB
    assert client.flush() == 0
    assert client.read(0, offset) == ref[:offset]      # what was written still reads back
    other = NbdClient.connect(server.port, "d")
    assert other.read(0, 4096) == ref[:4096]
    other.close()

    ballast.unlink()                                   # free space: writes work again
    for again in range(offset, offset + MiB, chunk):
        _write_ok(client, ref, again, rnd.randbytes(chunk))
    _finish(server, client, image, ref, tmp_path, fmt)


class MaybeWritten:
    """The reference disk of a client whose writes may fail part-way.

    ``ref`` holds the bytes if no failed write had any effect; ``alternatives``
    maps a sector to the other contents it may have (a failed write may have
    reached some of its sectors, never part of one: the backends split
    writes at sector-aligned cluster boundaries only).
    """

    def __init__(self, size: int):
        self.ref = bytearray(size)
        self.alternatives: dict[int, set[bytes]] = {}

    def _sectors(self, offset: int, length: int) -> range:
        return range(offset // SECTOR, -(-(offset + length) // SECTOR))

    def _overlay(self, sector: int, base: bytes, offset: int, data: bytes) -> bytes:
        start = sector * SECTOR
        merged = bytearray(base)
        lo, hi = max(offset, start), min(offset + len(data), start + SECTOR)
        merged[lo - start:hi - start] = data[lo - offset:hi - offset]
        return bytes(merged)

    def succeeded(self, offset: int, data: bytes) -> None:
        for sector in self._sectors(offset, len(data)):
            if sector in self.alternatives:
                self.alternatives[sector] = {self._overlay(sector, alt, offset, data)
                                             for alt in self.alternatives[sector]}
        self.ref[offset:offset + len(data)] = data

    def failed(self, offset: int, data: bytes) -> None:
        for sector in self._sectors(offset, len(data)):
            start = sector * SECTOR
            now = {bytes(self.ref[start:start + SECTOR])} | self.alternatives.get(sector, set())
            self.alternatives[sector] = now | {self._overlay(sector, c, offset, data) for c in now}

    def check(self, got: bytes) -> None:
        for sector in range(len(self.ref) // SECTOR):
            start = sector * SECTOR
            now = got[start:start + SECTOR]
            if now != self.ref[start:start + SECTOR]:
                assert now in self.alternatives.get(sector, ()), f"sector {sector} is wrong"


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backing"])
def test_random_write_faults_keep_qcow1_consistent(tmp_path, logged_server, backing):
    """One pwrite/pwritev in five fails (data, new L2 tables, pointer commits alike)."""
    image, before = make_qcow1(tmp_path, backing, SIZE)
    switch = tmp_path / "faults-on"
    server = logged_server(f"d={image}",
                           env={"QCOWNBD_FAULTS": f"write:EIO:prob=0.2,seed=3,while={switch}"})
    disk = MaybeWritten(SIZE)
    disk.ref[:] = before
    rnd, client, errors = random.Random(8), NbdClient.connect(server.port, "d"), []
    switch.touch()
    for _ in range(300):
        if rnd.random() < 0.1:
            errors.append(client.flush())
            continue
        length = rnd.choice([1, 512, 700, 4096, 9000, 70000])
        offset = rnd.randrange(SIZE - length)
        data = rnd.randbytes(length)
        error = client.write(offset, data, FLAG_FUA if rnd.random() < 0.1 else 0)
        (disk.failed if error else disk.succeeded)(offset, data)
        errors.append(error)
    assert set(errors) == {0, NBD_EIO}, set(errors)
    switch.unlink()
    assert client.flush() == 0
    disk.check(client.read(0, SIZE))
    server.kill9()
    assert "Traceback" not in server.log
    qcownbd_check(image)
    disk.check(qemu_raw(image, tmp_path / "got.raw"))


@pytest.mark.parametrize("fmt", ["qcow1", "raw"])
def test_injected_read_fault(tmp_path, logged_server, fmt):
    image = _new_image(tmp_path, fmt)
    switch = tmp_path / "faults-on"
    server = logged_server(f"d={image}", env={"QCOWNBD_FAULTS": f"read:EIO:while={switch}"})
    rnd, ref = random.Random(9), bytearray(SIZE)
    client = NbdClient.connect(server.port, "d")
    _write_ok(client, ref, 4096, rnd.randbytes(100000))
    switch.touch()
    assert client.call(CMD_READ, 4096, 100000)[0] == NBD_EIO
    assert client.call(CMD_READ, 50001, 10)[0] == NBD_EIO
    switch.unlink()
    _write_ok(client, ref, 200000, rnd.randbytes(5000))
    _finish(server, client, image, ref, tmp_path, fmt)
