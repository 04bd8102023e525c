"""QCOW1 space: freed clusters are reused and given back, so the file stays bounded.

A client writes, trims and zeroes at random through the server; after every
request the file must fit the disk (every cluster and table it can need) plus
one allocation batch, and QEMU must read what the client wrote.
"""

import json
import os
import random
import struct

import pytest

from helpers import LoggedServer, qcownbd_cmd, qcownbd_env, qemu_compare, qemu_io, run
from nbdclient import NbdClient

MiB = 1 << 20
CMD_TRIM, CMD_WRITE_ZEROES = 4, 6
FLAG_NO_HOLE = 1 << 1
#: the largest request of the workload: one allocation batch
LARGEST = 256 * 1024


def growth_bound(image) -> int:
    """What the image can need at most (header, L1, a slot per L2 table, a cluster per
    guest cluster), plus one allocation batch."""
    with open(image, "rb") as file:
        header = file.read(48)
    size, cluster_bits, l2_bits, l1_offset = (struct.unpack(">Q", header[24:32])[0], header[32],
                                              header[33], struct.unpack(">Q", header[40:48])[0])
    cluster = 1 << cluster_bits
    whole = lambda n: -(-n // cluster) * cluster   # noqa: E731
    tables = -(-size // (cluster << l2_bits))
    return whole(l1_offset + 8 * tables) + tables * whole(8 << l2_bits) + whole(size) + LARGEST


def allocated_bytes(image) -> int:
    """Bytes the image itself (not its backing file) stores, by qemu-img map."""
    entries = json.loads(run(["qemu-img", "map", "-U", "-f", "qcow", "--output=json",
                              image]).stdout)
    return sum(e["length"] for e in entries if e["data"] and e["depth"] == 0)


def stored_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of ``fd`` between ``start`` and ``end`` that are data, not holes (whole
    pages: SEEK_DATA and SEEK_HOLE see no finer)."""
    total, pos = 0, start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:     # ENXIO: nothing but hole to the end of the file
            break
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        total += min(hole, end) - data
        pos = hole
    return total


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backing", [False, True], ids=["plain", "overlay"])
def test_random_writes_trims_and_zeroes_keep_the_file_bounded(tmp_path, backing):
    size = 16 * MiB
    image = tmp_path / "disk.qcow"
    rnd = random.Random(13)
    ref = bytearray(size)
    if backing:
        ref[:] = rnd.randbytes(size)
        (tmp_path / "base.raw").write_bytes(ref)
        run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", image])
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow", image, str(size)])
    bound, cluster = growth_bound(image), 512 if backing else 4096
    with LoggedServer(f"d={image}") as server:
        client = NbdClient.connect(server.port, "d")
        for round_ in range(1, 1001):
            offset = rnd.randrange(size - 1)
            length = min(rnd.choice([512, 4096, 65536, LARGEST, rnd.randrange(1, LARGEST)]),
                         size - offset)
            action = rnd.random()
            if action < 0.5:
                data = rnd.randbytes(length)
                assert client.write(offset, data) == 0
                ref[offset:offset + length] = data
            elif action < 0.75:
                flags = FLAG_NO_HOLE if rnd.random() < 0.3 else 0
                assert client.call(CMD_WRITE_ZEROES, offset, length, flags)[0] == 0
                ref[offset:offset + length] = bytes(length)
            else:
                assert client.call(CMD_TRIM, offset, length)[0] == 0
                if not backing:     # TRIM over a backing file changes nothing
                    start = -(-offset // cluster) * cluster
                    end = (offset + length) // cluster * cluster
                    ref[start:end] = bytes(max(0, end - start))
            assert os.path.getsize(image) <= bound, f"round {round_}: the file outgrew {bound}"
            if round_ % 100 == 0:
                assert client.flush() == 0
                (tmp_path / "ref.raw").write_bytes(ref)
                result = qemu_compare(image, tmp_path / "ref.raw", live=True)
                assert result.returncode == 0, f"round {round_}: {result.stdout}"
        stored = os.stat(image).st_blocks * 512
        client.close()
    # host blocks follow the live data: what the image maps, its tables, one batch
    assert stored <= allocated_bytes(image) + (bound - size), (stored, allocated_bytes(image))
    qemu_io(image, "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")
    ref[MiB:MiB + 65536] = b"\x5a" * 65536
    (tmp_path / "ref.raw").write_bytes(ref)
    assert qemu_compare(image, tmp_path / "ref.raw").returncode == 0
    result = run(qcownbd_cmd("check", image), check=False, env=qcownbd_env())
    assert result.returncode == 0, result.stdout



def test_a_new_table_at_the_end_of_an_overlay_is_written_sparsely(tmp_path, qcownbd_server):
    """An overlay's 512-byte clusters give 32 KiB L2 tables: one made at the file's end
    is written as the entries it sets (the rest stays a hole, read as zeros), and
    QEMU reads the writes and finds the image clean."""
    golden, overlay = tmp_path / "golden.raw", tmp_path / "o.qcow"
    with open(golden, "wb") as f:
        f.write(os.urandom(16 * MiB))
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", golden, "-F", "raw", overlay])
    server = qcownbd_server(f"o={overlay}")
    places = [3 * MiB + 4096, 9 * MiB, 14 * MiB + 65536]    # three 2 MiB table ranges
    qemu_io(server.uri("o"), *(f"write -P {i + 1} {p} 4k" for i, p in enumerate(places)),
            fmt="raw")
    server.stop()
    data = open(overlay, "rb").read()
    l1_offset = struct.unpack(">Q", data[40:48])[0]
    tables = [struct.unpack(">Q", data[l1_offset + 8 * (p >> 21):l1_offset + 8 * (p >> 21) + 8])[0]
              for p in places]
    fd = os.open(overlay, os.O_RDONLY)
    try:
        for table in tables:
            assert table, "no table linked"
            # of the table's 32 KiB, only the page of its entry (and one it shares with
            # what lies before it) holds data
            assert stored_bytes(fd, table, table + 32 * 1024) <= 2 * 4096, table
    finally:
        os.close(fd)
    assert run(qcownbd_cmd("check", overlay), check=False).returncode == 0
    out = qemu_io(overlay, *(f"read -P {i + 1} {p} 4k" for i, p in enumerate(places)),
                  f"read -v 0 16", read_only=True).stdout
    assert "fail" not in out.lower() and out.count("read 4096/4096") == 3, out
