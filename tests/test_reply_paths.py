"""The fast reply paths: direct writev, sendfile, pooled buffers, hole-free raw status.

Each path has a slow twin it must be byte-for-byte equal to, so these tests
compare what a client receives with the image's bytes while forcing the
awkward cases: a client that stops reading until the server's socket is
full (partial writev, partial sendfile, the hand-over to the transport),
writes overlapping pipelined reads, and non-contiguous QCOW1 clusters.
"""

import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time

import pytest

from helpers import run
from nbdclient import CMD_READ, CMD_WRITE, NbdClient
from qcownbd.image.probe import open_image
from qcownbd.image.qcow1 import Qcow1Image
from qcownbd.nbd import replies as output

MiB = 1 << 20


def _random_file(path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _image(tmp_path, fmt: str, size: int, seed: int):
    """(bytes, path) of a random disk image, raw or converted to QCOW1 by qemu-img."""
    image = _random_file(tmp_path / "d.raw", size, seed)
    if fmt == "raw":
        return image, tmp_path / "d.raw"
    path = tmp_path / "d.qcow"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow", tmp_path / "d.raw", path])
    return image, path


def _pipelined_reads_stalled(port: int, requests, stall: float, half_close: bool = False):
    """Send every request at once, read nothing for ``stall`` seconds, then all replies.

    ``half_close``: shut our sending side after the requests (the server sees EOF
    while replies are still queued, and must send them all before closing).
    """
    client = NbdClient.connect(port, "d")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    cookies = []
    for cmd, offset, length, payload in requests:
        cookies.append(client.submit(cmd, offset, length, payload=payload))
    if half_close:
        client.sock.shutdown(socket.SHUT_WR)
    time.sleep(stall)   # the server's socket fills: partial sends, hand-over, queueing
    replies = {}
    for _ in cookies:
        cookie, error, data = client.reply()
        assert error == 0, (cookie, error)
        replies[cookie] = data
    client.close()
    return [replies[c] for c in cookies]


def _workload(size: int, seed: int):
    """Reads of every size class (sendfile, pooled, small), with writes between them."""
    rng = random.Random(seed)
    requests = []
    for i in range(60):
        length = rng.choice([MiB, 3 * MiB // 2, 200_000, 65536, 4096, 777])
        offset = rng.randrange(0, size - length)
        requests.append((CMD_READ, offset, length, b""))
        if i % 10 == 9:
            payload = rng.randbytes(rng.choice([4096, 300_000]))
            requests.append((CMD_WRITE, rng.randrange(0, size - len(payload)), len(payload),
                             payload))
    return requests


def _expected(image: bytes, requests):
    """What each READ must return when requests run in order."""
    disk, out = bytearray(image), []
    for cmd, offset, length, payload in requests:
        if cmd == CMD_WRITE:
            disk[offset:offset + length] = payload
        else:
            out.append(bytes(disk[offset:offset + length]))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt,half_close", [("raw", False), ("qcow", False), ("raw", True)])
def test_stalled_client_gets_every_byte_in_order(tmp_path, qcownbd_server, fmt, half_close):
    size = 16 * MiB
    image, path = _image(tmp_path, fmt, size, seed=7)
    if fmt == "qcow":
        # rewrite some clusters so the host layout is not the guest layout
        run(["qemu-io", "-f", "qcow", "-c", "write -P 0x5a 5M 64k", "-c", "write -P 0xa5 2M 4k",
             path])
        image = bytearray(image)
        image[5 * MiB:5 * MiB + 65536] = b"\x5a" * 65536
        image[2 * MiB:2 * MiB + 4096] = b"\xa5" * 4096
        image = bytes(image)
    server = qcownbd_server(f"d={path}")
    requests = _workload(size, seed=11)
    got = _pipelined_reads_stalled(server.port, requests, stall=1.0, half_close=half_close)
    reads = [r for r in got if r is not None]
    expected = _expected(image, requests)
    assert len(reads) == len(expected)
    for index, (have, want) in enumerate(zip(reads, expected)):
        assert have == want, f"read #{index} differs"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["raw", "qcow"])
def test_large_writes_pipelined_with_small_requests_in_odd_pieces(tmp_path, qcownbd_server, fmt):
    """Large WRITE payloads are received into their own buffers, and after one the
    server reads a single header first: whatever the stream's chunking, the bytes
    must land where they belong and every request after them must parse."""
    size = 16 * MiB
    image, path = _image(tmp_path, fmt, size, seed=5)
    server = qcownbd_server(f"d={path}")
    rng = random.Random(9)
    requests, reads = [], []
    for _ in range(40):
        length = rng.choice([2 * MiB, MiB, 300_000, 65536, 4096, 333])
        offset = rng.randrange(0, size - length)
        # all 40 are in flight at once, and NBD leaves a READ and a later WRITE
        # over the same bytes unordered then (a sendfile reply may show the
        # write): a WRITE keeps off earlier READs, a READ may cover earlier WRITEs
        for _attempt in range(50):
            if not any(offset < end and start < offset + length for start, end in reads):
                break
            offset = rng.randrange(0, size - length)
        else:
            offset = None
        if offset is not None and rng.random() < 0.6:
            requests.append((CMD_WRITE, offset, length, rng.randbytes(length)))
        else:
            offset = rng.randrange(0, size - length) if offset is None else offset
            reads.append((offset, offset + length))
            requests.append((CMD_READ, offset, length, b""))
    client = NbdClient.connect(server.port, "d")
    wire = [client.encode(cmd, offset, length, 0, payload)[1]
            for cmd, offset, length, payload in requests]

    def send_in_odd_pieces():
        # every header is cut in two with a pause between, so the server sees a
        # partial header right after a large payload; payloads go in odd pieces
        pieces = random.Random(1)
        with contextlib.suppress(OSError):   # a server that broke off: the replies tell
            for data in wire:
                cut = pieces.randrange(1, 28)
                client.sock.sendall(data[:cut])
                time.sleep(0.002)
                pos = cut
                while pos < len(data):
                    step = pieces.choice([1, 27, 4096, 65536 + 3, 700_000])
                    client.sock.sendall(data[pos:pos + step])
                    pos += step

    sender = threading.Thread(target=send_in_odd_pieces)
    sender.start()
    replies = {}
    for _ in requests:
        cookie, error, data = client.reply()
        assert error == 0, (cookie, error)
        replies[cookie] = data
    sender.join()
    reads = [replies[cookie] for cookie in sorted(replies) if replies[cookie] is not None]
    expected = _expected(image, requests)
    assert len(reads) == len(expected)
    for index, (have, want) in enumerate(zip(reads, expected)):
        assert have == want, f"read #{index} differs"
    client.close()
    assert server.stop() == 0
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw" if fmt == "raw" else "qcow",
         _disk_after(tmp_path, image, requests), path])


def _disk_after(tmp_path, image: bytes, requests):
    """A raw file with what the image must hold once ``requests`` ran in order."""
    disk = bytearray(image)
    for cmd, offset, length, payload in requests:
        if cmd == CMD_WRITE:
            disk[offset:offset + length] = payload
    out = tmp_path / "expected.raw"
    out.write_bytes(disk)
    return out


@pytest.mark.timeout(60)
def test_structured_reads_match_qemu_io(tmp_path, qcownbd_server):
    """libnbd (structured replies) through nbdcopy: sendfile path and hole chunks."""
    path = tmp_path / "d.raw"
    data = bytearray(_random_file(path, 8 * MiB, seed=3))
    # a hole, so reads mix data and hole chunks
    run(["fallocate", "--punch-hole", "--offset", str(3 * MiB), "--length", str(MiB), path])
    data[3 * MiB:4 * MiB] = bytes(MiB)
    server = qcownbd_server(f"d={path}")
    out = tmp_path / "copy.raw"
    run(["nbdcopy", "--request-size=1048576", server.uri("d"), out])
    assert out.read_bytes() == bytes(data)


@pytest.mark.timeout(60)
def test_reads_across_holes_send_each_data_run_from_the_file(tmp_path, qcownbd_server):
    """Structured READs that cross data and holes: the hole chunks, and data runs
    sent from the image file (a raw image; a QCOW1 overlay's unwritten clusters,
    from its backing file), each at its own offset."""
    golden = tmp_path / "golden.raw"
    data = bytearray(_random_file(golden, 8 * MiB, seed=11))
    for start, length in ((2 * MiB, MiB), (5 * MiB, MiB // 2)):
        run(["fallocate", "--punch-hole", "--offset", str(start), "--length", str(length),
             golden])
        data[start:start + length] = bytes(length)
    overlay = tmp_path / "o.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", golden, "-F", "raw", overlay, "8M"])
    run(["qemu-io", "-f", "qcow", "-c", "write -P 9 1536k 128k", overlay])
    written = bytearray(data)
    written[1536 * 1024:1664 * 1024] = b"\x09" * 128 * 1024
    reads = [(3 * MiB - 200 * 1024, 700 * 1024), (2 * MiB - 96 * 1024, MiB),
             (5 * MiB - 300 * 1024, MiB), (1536 * 1024 - 64 * 1024, 900 * 1024),
             (4 * MiB + 4096, MiB), (5 * MiB + 100 * 1024, 512 * 1024)]
    copy = tmp_path / "copy.raw"        # the golden image is the overlay's, read-only
    run(["cp", "--sparse=always", golden, copy])
    server = qcownbd_server(f"raw={copy}", f"qcow={overlay}")
    script = f'''
import hashlib, json, nbd, sys
out = {{}}
for name in ("raw", "qcow"):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1] + name)
    assert h.get_structured_replies_negotiated()
    out[name] = [hashlib.sha256(h.pread(length, offset)).hexdigest()
                 for offset, length in {reads!r}]
    h.shutdown()
print(json.dumps(out))
'''
    result = run(["/usr/bin/python3", "-c", script, server.uri("")], timeout=45)
    got = json.loads(result.stdout)
    for name, disk in (("raw", data), ("qcow", written)):
        assert got[name] == [hashlib.sha256(disk[offset:offset + length]).hexdigest()
                             for offset, length in reads], name


class _Sink(asyncio.Protocol):
    """The smallest protocol a ReplyWriter can serve: forwards flow control."""

    writer = None

    def pause_writing(self):
        self.writer.transport_paused()

    def resume_writing(self):
        self.writer.transport_resumed()


def _drain_slowly(sock, total: int, into: bytearray):
    time.sleep(0.3)
    while len(into) < total:
        chunk = sock.recv(65536)
        if not chunk:
            return
        into += chunk
        time.sleep(0.0005)


@pytest.mark.timeout(60)
def test_reply_writer_keeps_order_and_never_reuses_a_queued_buffer():
    """Many batches through a small socket: bytes arrive whole and in order even
    though every pooled buffer is overwritten as soon as the writer gives it back."""

    async def main():
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        loop = asyncio.get_running_loop()
        transport, sink = await loop.connect_accepted_socket(_Sink, ours)
        backlog = []
        writer = output.ReplyWriter(transport, backlog.append, 4 * MiB, MiB, plain=True,
                                    pool=output.BufferPool())
        sink.writer = writer
        assert writer.direct
        rng, sent = random.Random(5), bytearray()
        received = bytearray()
        batches = [[rng.choice([16, 4096, 70_000, MiB]) for _ in range(rng.randrange(1, 9))]
                   for _ in range(60)]
        total = sum(map(sum, batches))
        reader = threading.Thread(target=_drain_slowly, args=(theirs, total, received))
        reader.start()
        for sizes in batches:
            writer.corked = True
            for size in sizes:
                view = writer.lend(size)
                view[:] = rng.randbytes(size)
                sent += view
                writer.send([view])
            writer.corked = False
            writer.flush()
            # scribble over whatever the pool would hand out next: a buffer still
            # queued (or held by the transport) must not be among them
            for size in (70_000, MiB):
                buf = writer.pool.take(size)
                buf[:] = bytes(len(buf))
                writer.pool.give_back([buf])
            await asyncio.sleep(0)
        while len(received) < total and reader.is_alive():
            await asyncio.sleep(0.01)
        reader.join(10)
        transport.close()
        theirs.close()
        return bytes(sent), bytes(received), backlog

    sent, received, backlog = asyncio.run(main())
    assert len(received) == len(sent)
    assert received == sent
    assert True in backlog and backlog[-1] is False   # reading paused, then resumed


async def _writer_over_small_socket(**options):
    """A direct ReplyWriter on one end of a socket pair with a small send buffer."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    loop = asyncio.get_running_loop()
    transport, sink = await loop.connect_accepted_socket(_Sink, ours)
    writer = output.ReplyWriter(transport, lambda high: None, 4 * MiB, MiB, plain=True,
                                pool=output.BufferPool(), **options)
    sink.writer = writer
    assert writer.direct
    return writer, transport, theirs


@pytest.mark.timeout(60)
def test_queued_file_ranges_are_sent_in_order_and_materialized_on_demand(tmp_path):
    """File ranges queued behind a full socket go out with sendfile, in order with
    the other parts; past the file's end they read zeros; once materialized they
    no longer depend on the file (here: it is truncated to nothing)."""
    path = tmp_path / "f"
    size = 3 * MiB
    path.write_bytes(random.Random(8).randbytes(size))
    fd = os.open(path, os.O_RDWR)
    rng = random.Random(9)
    ranges = [(rng.randrange(0, size), rng.choice([65536, 300_000, MiB])) for _ in range(24)]
    ranges.append((size - 1000, 70_000))      # runs past the end of the file
    total = sum(16 + length for _, length in ranges)

    async def main():
        writer, transport, theirs = await _writer_over_small_socket()
        expected, received = bytearray(), bytearray()
        reader = threading.Thread(target=_drain_slowly, args=(theirs, total, received))
        reader.start()
        writer.corked = True
        for index, (offset, length) in enumerate(ranges):
            header = index.to_bytes(16, "big")
            writer.send_file(header, fd, offset, length)
            part = os.pread(fd, length, offset)
            expected += header + part + bytes(length - len(part))
            if index == 12:
                writer.corked = False
                writer.flush()          # the socket fills: most of it waits queued
                writer.materialize_files()
                # sendfile's pages already in the socket keep their bytes when the
                # file lets go of them; the ranges still queued were read into memory
                os.ftruncate(fd, 0)
                writer.corked = True
        writer.corked = False
        writer.flush()
        while len(received) < total and reader.is_alive():
            await asyncio.sleep(0.01)
        reader.join(10)
        transport.close()
        theirs.close()
        return bytes(expected), bytes(received)

    try:
        expected, received = asyncio.run(main())
    finally:
        os.close(fd)
    assert len(received) == len(expected) == total
    assert received == expected


@pytest.mark.timeout(60)
def test_a_file_range_that_cannot_be_read_breaks_the_connection(tmp_path):
    """A queued range whose file fails to read cannot be completed (its header is
    sent): the writer reports the connection broken instead of sending garbage."""
    broken = []
    directory = os.open(tmp_path, os.O_RDONLY)   # sendfile and pread both fail on it

    async def main():
        writer, transport, theirs = await _writer_over_small_socket(on_broken=broken.append)
        writer.send_file(b"h" * 16, directory, 0, 65536)
        await asyncio.sleep(0)
        transport.abort()
        theirs.close()

    try:
        asyncio.run(main())
    finally:
        os.close(directory)
    assert len(broken) == 1 and "after its header was sent" in broken[0]


def test_raw_without_holes_is_one_extent_and_a_trim_shows_again(tmp_path):
    path = tmp_path / "d.raw"
    _random_file(path, 4 * MiB, seed=1)
    img = open_image(str(path), fmt="raw")
    try:
        extents = img.block_status(0, img.size)
        assert [(e.length, e.hole) for e in extents] == [(img.size, False)]
        img.trim(MiB, MiB)
        extents = img.block_status(0, img.size)
        assert [(e.length, e.hole) for e in extents] == [(MiB, False), (MiB, True),
                                                         (2 * MiB, False)]
    finally:
        img.close()


def test_qcow1_host_range_only_for_one_contiguous_data_run(tmp_path):
    path = tmp_path / "d.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", path, "8M"])
    # clusters 0-15 in order; cluster 32 before 31, so 31..32 are not contiguous
    # (4k clusters, 2 MiB per L2 table)
    run(["qemu-io", "-f", "qcow", "-c", "write -P 1 0 64k", "-c", "write -P 2 128k 4k",
         "-c", "write -P 3 124k 4k", path])
    raw, packed = tmp_path / "c.raw", tmp_path / "c.qcow"
    raw.write_bytes(b"\4" * MiB)
    # qemu-img 7.2 exits 1 after writing a complete compressed qcow image (qcow1.md §5)
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", raw, packed], check=False)
    run(["qemu-img", "compare", "-f", "qcow", packed, "-F", "raw", raw])
    img = open_image(str(packed), fmt="qcow1", read_only=True)
    try:
        assert img.host_range(0, 4096) is None                 # compressed
    finally:
        img.close()
    img = open_image(str(path), fmt="qcow1", read_only=True)
    try:
        assert isinstance(img, Qcow1Image)
        fd, host = img.host_range(4096, 60 * 1024)
        assert os.pread(fd, 60 * 1024, host) == b"\1" * 60 * 1024
        fd, host = img.host_range(128 * 1024 + 100, 100)
        assert os.pread(fd, 100, host) == b"\2" * 100
        assert img.host_range(124 * 1024, 8192) is None        # two clusters out of order
        assert img.host_range(32 * 1024, 64 * 1024) is None    # data then unallocated
        assert img.host_range(6 * MiB, 4096) is None           # no L2 table
        assert img.host_range(2 * MiB - 4096, 8192) is None    # crosses an L2 table
    finally:
        img.close()


def test_an_overlay_gives_the_backing_files_range_where_it_maps_nothing(tmp_path):
    backing, overlay = tmp_path / "golden.raw", tmp_path / "o.qcow"
    golden = _random_file(backing, 3 * MiB, seed=5)
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", backing, "-F", "raw", overlay, "4M"])
    run(["qemu-io", "-f", "qcow", "-c", "write -P 7 1M 4k", overlay])
    img = open_image(str(overlay), fmt="qcow1", read_only=True)
    try:
        fd, host = img.host_range(0, MiB)                      # the golden image's bytes
        assert host == 0 and os.pread(fd, MiB, host) == golden[:MiB]
        fd, host = img.host_range(MiB + 4096, 256 * 1024)      # after the written cluster
        assert os.pread(fd, 256 * 1024, host) == golden[MiB + 4096:MiB + 4096 + 256 * 1024]
        fd, host = img.host_range(MiB, 4096)                   # the overlay's own cluster
        assert os.pread(fd, 4096, host) == b"\7" * 4096
        assert img.host_range(MiB - 4096, 8192) is None       # golden then overlay
        assert img.host_range(3 * MiB - 4096, 8192) is None   # past the golden's end
    finally:
        img.close()


@pytest.mark.timeout(60)
def test_replies_queued_at_eof_are_all_sent(tmp_path, qcownbd_server):
    """The client half-closes right after its requests: the server sees EOF while
    replies still wait for socket space, and must send them all before closing."""
    path = tmp_path / "d.raw"
    image = _random_file(path, 4 * MiB, seed=9)
    server = qcownbd_server(f"d={path}")
    rng = random.Random(4)
    requests = [(CMD_READ, rng.randrange(0, 4 * MiB - 4096), 4096, b"") for _ in range(3000)]
    got = _pipelined_reads_stalled(server.port, requests, stall=1.0, half_close=True)
    assert got == _expected(image, requests)
