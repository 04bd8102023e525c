"""Load: 64 concurrent clients doing verified I/O on their own regions.

64 asyncio NBD clients in the test process share one server: three in four
on a QCOW1 export (one shared backend: allocations race), the rest on a raw
export.  Each writes random pieces of its own region (some with FUA), reads
back and compares, flushes now and then, and finally reads its whole
region.  Proved: zero mismatches and zero error replies, the server's RSS
(sampled throughout) stays under 100 MiB, and after a clean stop QEMU reads
exactly the clients' data from both images.
"""

import asyncio
import random
import socket
import struct
import threading
import time

import pytest

from helpers import LoggedServer, qemu_compare, run
from nbdclient import (CMD_BLOCK_STATUS, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FUA, AsyncNbdClient,
                       NbdClient)

MiB = 1 << 20
CLIENTS = 64
REGION = 2 * MiB
RSS_LIMIT = 100 * MiB


async def client_loop(port: int, export: str, region: int, ref: bytearray, seed: int,
                      deadline: float) -> int:
    """Verified I/O on [region, region + REGION) until the deadline; returns the op count."""
    rnd = random.Random(seed)
    client = await AsyncNbdClient.connect(port, export)
    ops = 0
    try:
        while time.monotonic() < deadline:
            length = rnd.choice([1, 512, 4096, 4096, 65536, 200000])
            offset = rnd.randrange(REGION - length)
            at = region + offset
            roll = rnd.random()
            if roll < 0.5:
                data = rnd.randbytes(length)
                error, _ = await client.call(CMD_WRITE, at, length,
                                             FLAG_FUA if rnd.random() < 0.05 else 0, data)
                ref[offset:offset + length] = data
            elif roll < 0.95:
                error, got = await client.call(CMD_READ, at, length)
                assert got == ref[offset:offset + length], f"{export}: mismatch at {at}+{length}"
            else:
                error, _ = await client.call(CMD_FLUSH)
            assert error == 0, f"{export}: error {error} at {at}+{length}"
            ops += 1
        error, got = await client.call(CMD_READ, region, REGION)
        assert error == 0 and got == ref, f"{export}: final read of region {region} differs"
    finally:
        await client.close()
    return ops


async def sample_rss(server, stop: asyncio.Event, samples: list) -> None:
    """The server's RSS every 200 ms until ``stop``."""
    while not stop.is_set():
        samples.append(server.rss_bytes())
        await asyncio.sleep(0.2)


async def load(server, refs: dict, seconds: float) -> tuple[int, int]:
    """Run all clients and the RSS sampler; (total ops, peak RSS)."""
    deadline = time.monotonic() + seconds
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(sample_rss(server, stop, samples))
    tasks = []
    for index in range(CLIENTS):
        export = "r" if index % 4 == 3 else "q"
        slot = index // 4 if export == "r" else index - index // 4
        refs[export][slot] = bytearray(REGION)
        tasks.append(client_loop(server.port, export, slot * REGION, refs[export][slot],
                                 seed=index, deadline=deadline))
    ops = await asyncio.gather(*tasks)
    stop.set()
    await sampler
    return sum(ops), max(samples)


def run_load(tmp_path, seconds: float) -> None:
    q_slots, r_slots = CLIENTS - CLIENTS // 4, CLIENTS // 4
    qcow, raw = tmp_path / "load.qcow", tmp_path / "load.raw"
    run(["qemu-img", "create", "-f", "qcow", qcow, str(q_slots * REGION)])
    run(["qemu-img", "create", "-f", "raw", raw, str(r_slots * REGION)])
    server = LoggedServer(f"q={qcow}", f"r={raw}")
    refs = {"q": {}, "r": {}}
    try:
        ops, peak = asyncio.run(load(server, refs, seconds))
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    assert ops > CLIENTS * 10, f"only {ops} operations"
    assert peak < RSS_LIMIT, f"server RSS peaked at {peak >> 20} MiB"
    for export, image, fmt in (("q", qcow, "qcow"), ("r", raw, "raw")):
        ref = tmp_path / f"{export}.ref"
        ref.write_bytes(b"".join(refs[export][slot] for slot in sorted(refs[export])))
        result = qemu_compare(image, ref, fmt)
        assert result.returncode == 0, f"{export}: {result.stdout}{result.stderr}"


@pytest.mark.timeout(120)
def test_64_clients_verified_io(tmp_path):
    run_load(tmp_path, seconds=20)


@pytest.mark.long
@pytest.mark.timeout(300)
def test_64_clients_verified_io_long(tmp_path):
    run_load(tmp_path, seconds=60)


def send_until_stalled(sock, data: bytes, stall: float = 0.5) -> int:
    """Send ``data`` until done or until the peer stops reading for ``stall`` seconds."""
    sock.settimeout(stall)
    view, sent = memoryview(data), 0
    try:
        while sent < len(view):
            sent += sock.send(view[sent:sent + MiB])
    except (TimeoutError, socket.timeout):
        pass
    return sent


@pytest.mark.timeout(120)
def test_half_sent_big_writes_keep_rss_bounded(tmp_path):
    """40 clients each send a 32 MiB WRITE header and 31 MiB of its payload, then stall.

    A server that buffers every half-received payload holds 40 × 31 MiB; a
    bounded one stops reading at some budget (our sends then stall: fine).
    """
    image = tmp_path / "big.raw"
    run(["qemu-img", "create", "-f", "raw", image, "64M"])
    payload = b"\xab" * (31 * MiB)
    with LoggedServer(f"d={image}") as server:
        clients = []
        try:
            for index in range(40):
                clients.append(NbdClient.connect(server.port, "d"))
                send_until_stalled(clients[-1].sock,
                                   clients[-1].request(CMD_WRITE, 0, 32 * MiB, index) + payload)
            time.sleep(1)
            rss = server.rss_bytes()
            assert rss < 400 * MiB, f"server RSS {rss >> 20} MiB with 40 half-sent writes"
        finally:
            for client in clients:
                client.sock.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("length", [32 * 1024, MiB])
def test_pipelined_reads_of_clients_that_do_not_read_keep_rss_bounded(tmp_path, length):
    """4 clients each send 128 MiB worth of READs at once and read nothing for a while.

    Replies must wait in the socket and a bounded backlog, not in memory: the
    server stops taking requests until the client catches up. Then every
    reply arrives, in full and correct.
    """
    image = tmp_path / "d.raw"
    content = random.Random(4).randbytes(MiB)
    image.write_bytes(content * 16)
    count = 128 * MiB // length
    offsets = [index * length % (16 * MiB) for index in range(count)]
    with LoggedServer(f"d={image}") as server:
        clients, senders = [], []
        for _ in range(4):
            client = NbdClient.connect(server.port, "d")
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            burst = b"".join(client.encode(CMD_READ, offset, length)[1] for offset in offsets)
            # the server stops reading once its backlog is full: send from a thread
            senders.append(threading.Thread(target=client.sock.sendall, args=(burst,)))
            senders[-1].start()
            clients.append(client)
        time.sleep(1.5)
        rss = server.rss_bytes()
        assert rss < 150 * MiB, f"server RSS {rss >> 20} MiB holding replies"
        doubled = content * 2
        for client in clients:
            for cookie in range(1, count + 1):
                got, error, data = client.reply()
                offset = offsets[got - 1] % MiB
                assert error == 0 and data == doubled[offset:offset + length], got
            client.close()
        for sender in senders:
            sender.join()


def wait_until_idle(pid: int, timeout: float = 30.0) -> None:
    """Return once the process used no CPU for half a second (it waits for the client)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            used = sum(map(int, stat.read().rsplit(")", 1)[1].split()[11:13]))
        if used == last:
            return
        last = used
        time.sleep(0.5)
    raise AssertionError("the server never went idle")


@pytest.mark.timeout(120)
def test_pipelined_block_status_of_a_client_that_does_not_read_keeps_rss_bounded(tmp_path):
    """Each BLOCK_STATUS of a finely fragmented image answers up to 16384 extents (128 KiB);
    of 250 pipelined ones only a backlog's worth may be answered into memory
    while the client reads nothing."""
    image = tmp_path / "d.raw"
    with open(image, "wb") as file:
        file.truncate(64 * MiB)
        for offset in range(0, 64 * MiB, 8192):
            file.seek(offset)
            file.write(b"D" * 4096)
    with LoggedServer(f"d={image}") as server:
        client = NbdClient(server.port, timeout=60)
        client.go(structured=True, contexts=(b"base:allocation",))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        before = server.rss_bytes()
        client.send(*(client.request(CMD_BLOCK_STATUS, 0, 64 * MiB, cookie)
                      for cookie in range(250)))
        wait_until_idle(server.proc.pid)
        grown = server.rss_bytes() - before
        assert grown < 16 * MiB, f"server RSS grew {grown >> 20} MiB holding status replies"
        for _ in range(10):
            _flags, _type, _cookie, _offset, payload = client.chunk()
            _context, *descriptors = struct.unpack(f">{len(payload) // 4}I", payload)
            # up to 16384 descriptors, fewer when the server's time slice ended first
            count = len(descriptors) // 2
            assert 2 <= count <= 16384
            assert descriptors[0::2] == [4096] * count
            assert descriptors[1::2] == ([0, 3] * count)[:count]     # data, then hole|zero
        client.sock.close()


@pytest.mark.timeout(120)
def test_big_writes_beyond_the_payload_budget_all_complete(tmp_path):
    """12 clients write 32 MiB each at once (3× the server's payload budget).

    Connections past the budget wait instead of buffering; each must be woken
    when another payload completes, so every write succeeds and reads back.
    """
    image = tmp_path / "big.raw"
    run(["qemu-img", "create", "-f", "raw", image, f"{12 * 32}M"])
    with LoggedServer(f"d={image}") as server:
        clients = [NbdClient.connect(server.port, "d") for _ in range(12)]
        patterns = [bytes([index + 1]) * (32 * MiB) for index in range(12)]
        try:
            cookies = []
            for index, client in enumerate(clients):
                # the header goes first; the payload is sent by a thread below
                cookies.append(client.next_cookie())
                client.send(client.request(CMD_WRITE, index * 32 * MiB, 32 * MiB, cookies[-1]))
            senders = [threading.Thread(target=client.sock.sendall, args=(pattern,))
                       for client, pattern in zip(clients, patterns)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(60)
            for client, cookie in zip(clients, cookies):
                assert client.reply()[:2] == (cookie, 0)
            for index, client in enumerate(clients):
                assert client.read(index * 32 * MiB, 32 * MiB) == patterns[index]
        finally:
            for client in clients:
                client.close()
