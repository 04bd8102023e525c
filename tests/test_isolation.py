"""One client, one request or one operator action must not take service from the others.

Each test plays one attacker (or careless client) of the isolation issue against
a real server while a victim client measures what it still gets.
"""

import socket
import struct
import threading
import time

import pytest
from helpers import LoggedServer, allocated_qcow1, run
from nbdclient import (
    CMD_BLOCK_STATUS, CMD_FLUSH, CMD_WRITE, ERR_TOO_BIG, OPT_EXPORT_NAME, OPT_EXTENDED, OPT_LIST,
    REP_ACK, NbdClient,
)

MiB = 1 << 20
CMD_WRITE_ZEROES = 6


def victim_latencies(port: int, export: str, seconds: float, stop=None) -> list[float]:
    """512-byte READs one at a time for ``seconds`` (or until ``stop`` is set): their latencies."""
    client = NbdClient.connect(port, export, timeout=60)
    latencies, deadline = [], time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            start = time.perf_counter()
            client.read(0, 512)
            latencies.append(time.perf_counter() - start)
    finally:
        client.close()
    return latencies


@pytest.mark.timeout(120)
def test_whole_disk_block_status_does_not_stall_other_clients(tmp_path):
    """BLOCK_STATUS over 1 GiB of 512-byte clusters, all allocated, pipelined again and
    again: another client's 512-byte READs still come back at once."""
    image = tmp_path / "big.qcow"
    allocated_qcow1(image, 1024 * MiB)
    with LoggedServer("--read-only", f"d={image}") as server:
        attacker = NbdClient(server.port, timeout=60)
        attacker.go(structured=True, contexts=(b"base:allocation",))
        stop = threading.Event()

        def attack():
            while not stop.is_set():
                attacker.send(*(attacker.request(CMD_BLOCK_STATUS, 0, 1024 * MiB, c)
                                for c in range(8)))
                for _ in range(8):
                    attacker.chunk()
        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        time.sleep(0.5)
        try:
            latencies = victim_latencies(server.port, "d", 4.0)
        finally:
            stop.set()
            thread.join(60)
    assert max(latencies) < 0.3, f"a READ waited {max(latencies):.2f}s behind BLOCK_STATUS"


@pytest.mark.timeout(180)
def test_a_huge_write_zeroes_on_an_overlay_does_not_stall_other_clients(tmp_path):
    """WRITE_ZEROES of 512 MiB on an overlay (zero clusters must really be written, the
    backing file shows through holes) runs in pieces: other clients' READs go on."""
    run(["qemu-img", "create", "-q", "-f", "raw", tmp_path / "base.raw", "1G"])
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw",
         tmp_path / "top.qcow"])
    (tmp_path / "other.raw").write_bytes(bytes(MiB))
    with LoggedServer(f"top={tmp_path / 'top.qcow'}", f"other={tmp_path / 'other.raw'}") as server:
        attacker = NbdClient.connect(server.port, "top", timeout=120)
        done = {}

        def attack():
            start = time.monotonic()
            done["errno"] = attacker.call(CMD_WRITE_ZEROES, 0, 512 * MiB)[0]
            done["seconds"] = time.monotonic() - start
        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        stop = threading.Event()
        waiter = threading.Thread(target=lambda: (thread.join(120), stop.set()), daemon=True)
        waiter.start()
        latencies = victim_latencies(server.port, "other", 120, stop)
        thread.join(120)
        attacker.close()
    assert done.get("errno") == 0, done
    assert len(latencies) > 10, f"only {len(latencies)} READs in {done['seconds']:.1f}s"
    assert max(latencies) < 0.3, f"a READ waited {max(latencies):.2f}s behind WRITE_ZEROES"


@pytest.mark.timeout(120)
def test_opening_a_large_fleet_overlay_does_not_stall_other_clients(tmp_path):
    """A VM reconnects to its 1 GiB overlay, every cluster written (512-byte clusters):
    opening it scans 2 M table entries, which happens off the event loop."""
    golden = tmp_path / "golden.raw"
    with open(golden, "wb") as f:
        f.truncate(1024 * MiB)
    (tmp_path / "overlays").mkdir()
    allocated_qcow1(tmp_path / "overlays" / "big.qcow", 1024 * MiB, backing=str(golden))
    (tmp_path / "other.raw").write_bytes(bytes(MiB))
    config = tmp_path / "c.toml"
    config.write_text(f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "raw"\n'
                      f'overlay_dir = "overlays"\n[exports.other]\npath = "other.raw"\n')
    with LoggedServer("--config", config) as server:
        stop, opened = threading.Event(), {}

        def open_big():
            start = time.monotonic()
            with NbdClient.connect(server.port, "fleet/big", timeout=60) as vm:
                opened["seconds"] = time.monotonic() - start
                opened["byte"] = vm.read(0, 512)
            stop.set()
        thread = threading.Thread(target=open_big, daemon=True)
        thread.start()
        latencies = victim_latencies(server.port, "other", 60, stop)
        thread.join(60)
    assert opened.get("byte") == bytes(512), opened
    assert opened["seconds"] > 0.2, "the open was too quick to show anything"
    assert max(latencies) < 0.3, f"a READ waited {max(latencies):.2f}s behind an overlay open"


@pytest.mark.timeout(120)
def test_slow_uploads_cannot_hold_the_write_budget(tmp_path):
    """Four clients announce 32 MiB WRITEs and trickle their payloads (together they
    reserve the whole payload budget): another client's 4 MiB WRITE still completes."""
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(64 * MiB))
    with LoggedServer(f"d={image}") as server:
        slow = [NbdClient.connect(server.port, "d", timeout=60) for _ in range(4)]
        for client in slow:
            client.sock.sendall(client.encode(CMD_WRITE, 0, 32 * MiB)[1] + b"x")
        stop = threading.Event()

        def trickle():
            while not stop.wait(0.5):
                for client in slow:
                    try:
                        client.sock.sendall(b"x")
                    except OSError:
                        pass
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(1.5)
        fast = NbdClient.connect(server.port, "d", timeout=60)
        start = time.monotonic()
        try:
            fast.sock.settimeout(15)
            assert fast.write(0, b"F" * 4 * MiB) == 0
            waited = time.monotonic() - start
        finally:
            stop.set()
            thread.join(10)
        assert fast.read(0, 4) == b"FFFF"
        fast.close()
        log = server.log
    assert waited < 8, f"the fast WRITE waited {waited:.1f}s behind slow uploads"
    assert "while others wait for the payload budget" in log


@pytest.mark.timeout(120)
def test_pipelined_options_of_a_client_that_does_not_read_keep_rss_bounded(tmp_path):
    """Clients pipelining NBD_OPT_LIST without reading the replies: the server stops
    reading them (as in transmission) instead of buffering replies without end."""
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    config = tmp_path / "c.toml"
    exports = "".join(f'[exports.e{i}]\npath = "{image}"\nread_only = true\n'
                      f'description = "{"an export " * 20}"\n' for i in range(8))
    config.write_text("[server]\nhandshake_timeout = 60\n" + exports)
    with LoggedServer("--config", config) as server:
        before = server.rss_bytes()
        clients = []
        for _ in range(4):
            client = NbdClient(server.port, timeout=60)
            client.greet()
            client.sock.setblocking(False)
            clients.append(client)
        burst = (b"IHAVEOPT" + struct.pack(">II", OPT_LIST, 0)) * 4096
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            sent = 0
            for client in clients:
                try:
                    sent += client.sock.send(burst)
                except BlockingIOError:
                    pass
            if not sent:
                time.sleep(0.05)
        grown = server.rss_bytes() - before
        for client in clients:
            client.sock.close()
    assert grown < 48 * MiB, f"server RSS grew {grown >> 20} MiB buffering option replies"


@pytest.mark.timeout(60)
def test_a_4_gib_option_is_refused_and_the_connection_closed_at_once(tmp_path):
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    with LoggedServer(f"d={image}") as server:
        client = NbdClient(server.port, timeout=10)
        client.greet()
        client.sock.sendall(b"IHAVEOPT" + struct.pack(">II", OPT_LIST, 0xFFFFFFFF) + bytes(4096))
        start = time.monotonic()
        _opt, rep, message = client.option_reply()
        assert rep == ERR_TOO_BIG and b"too big" in message
        assert client.closed()
        assert time.monotonic() - start < 3


@pytest.mark.timeout(60)
def test_export_name_after_extended_headers_closes(tmp_path):
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    with LoggedServer(f"d={image}") as server:
        client = NbdClient(server.port)
        client.greet()
        client.option(OPT_EXTENDED)
        assert client.option_reply()[1] == REP_ACK
        client.option(OPT_EXPORT_NAME, b"d")
        assert client.sock.recv(10) == b""      # closed: no size and flags


@pytest.mark.timeout(60)
def test_flush_replies_are_sent_before_a_half_closed_connection_closes(tmp_path):
    """WRITE+FLUSH pipelined, then the client shuts its sending side: every reply,
    the flushes' too (they finish in a worker thread), arrives before the close."""
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4 * MiB))
    with LoggedServer(f"d={image}") as server:
        client = NbdClient.connect(server.port, "d")
        cookies = set()
        for index in range(160):
            cookies.add(client.submit(CMD_WRITE, index * 4096, 4096, payload=b"w" * 4096))
            cookies.add(client.submit(CMD_FLUSH))
        client.sock.shutdown(socket.SHUT_WR)
        replies = [client.reply() for _ in range(320)]
        assert {cookie for cookie, _error, _data in replies} == cookies
        assert all(error == 0 for _cookie, error, _data in replies)
        assert client.sock.recv(1) == b""
        client.sock.close()


@pytest.mark.timeout(60)
def test_error_messages_to_clients_name_no_host_path(tmp_path):
    """A failed WRITE tells the client what failed; the path is for the log only."""
    image = tmp_path / "customer-42.raw"
    image.write_bytes(bytes(MiB))
    with LoggedServer(f"d={image}", env={"QCOWNBD_FAULTS": "write:EIO"}) as server:
        client = NbdClient(server.port)
        client.go(structured=True)
        client.send(client.request(CMD_WRITE, 0, 512, 1, payload=bytes(512)))
        flags, rtype, cookie, _offset, payload = client.chunk()
        error, length = struct.unpack(">IH", payload[:6])
        message = payload[6:6 + length].decode()
        client.sock.close()
        time.sleep(0.2)
        log = server.log
    assert (rtype, cookie, error) == (0x8001, 1, 5)
    assert message and "customer-42" not in message and str(tmp_path) not in message
    assert f"{image}" in log


@pytest.mark.timeout(60)
def test_a_flood_of_invalid_requests_does_not_flood_the_log(tmp_path):
    """20,000 requests with an unknown command: the first are logged in full, the rest
    counted, so one client cannot drown the operator's log."""
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    with LoggedServer(f"d={image}") as server:
        client = NbdClient.connect(server.port, "d")
        for batch in range(20):
            client.sock.sendall(b"".join(client.encode(99, 0, 512)[1] for _ in range(1000)))
            for _ in range(1000):
                assert client.reply()[1] == 22
        assert client.read(0, 4) == bytes(4)       # still served
        client.close()
        time.sleep(0.2)
        lines = [line for line in server.log.splitlines() if "command 99" in line]
    assert 1 <= len(lines) <= 20, f"{len(lines)} log lines for 20,000 bad requests"
