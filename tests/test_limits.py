"""Connection limits: half-open floods, per-client caps, the handshake timeout,
the request size cap, and the open-files limit the server raises for itself.
"""

import resource
import socket
import struct
import time

import pytest

from helpers import QcownbdServer, raw_file, run
from nbdclient import CMD_READ, CMD_WRITE, NBD_EINVAL, OPT_GO, NbdClient

pytestmark = pytest.mark.timeout(120)
SIZE = 40 * 1024 * 1024
MAX_REQUEST = 32 * 1024 * 1024
MiB = 1024 * 1024


class LowFdServer(QcownbdServer):
    """A server started with a small soft open-files limit (it must raise it itself)."""

    def __init__(self, *serve_args, soft: int):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        super().__init__(*serve_args, launcher=["prlimit", f"--nofile={soft}:{hard}"])


@pytest.fixture
def image(tmp_path):
    return raw_file(tmp_path / "d.raw", b"L" * 4096, SIZE)


def _open_files_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return tuple(line.split()[3:5])
    raise AssertionError("no open-files line")


def _half_open(port: int, kind: int) -> socket.socket:
    """One idle or stalled handshake, of five kinds."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalls = (b"",                                            # silent
              b"\0\0",                                        # half the client flags
              b"\0\0\0\1IHAVEOPT\0\0",                        # half an option header
              b"\0\0\0\1IHAVEOPT" + struct.pack(">II", OPT_GO, 4000) + b"\0" * 100,
              b"\0\0\0\1")                                    # flags, then nothing
    if stalls[kind % 5]:
        sock.sendall(stalls[kind % 5])
    return sock


def test_half_open_flood_does_not_starve_real_clients(image, tmp_path):
    config = tmp_path / "c.toml"
    # the default limits (256 connections, 64 negotiating) and a long handshake
    # timeout: the timeout is not what gets the real client through
    config.write_text("[server]\nhandshake_timeout = 60\n")
    server = LowFdServer("--config", config, f"d={image}", soft=128)
    try:
        soft, hard = _open_files_limit(server.proc.pid)
        assert soft == hard
        early = NbdClient(server.port)
        early.go()
        flood = [_half_open(server.port, kind) for kind in range(300)]
        try:
            started = time.monotonic()
            info = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{server.port}/d"], timeout=30)
            assert int(info.stdout) == SIZE
            run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x4c 0 4096",
                 f"nbd://127.0.0.1:{server.port}/d"], timeout=30)
            assert time.monotonic() - started < 5
            early.send(early.request(CMD_READ, 0, 4, 1))
            assert early.simple_reply() == (0, 1) and early.recv(4) == b"LLLL"
            fds = server.fd_count()
            assert fds < 64 + 40      # the negotiation budget, not the flood, bounds it
        finally:
            for sock in flood:
                sock.close()
    finally:
        server.stop()
    assert "dropped: too many connections negotiating" in server.stderr
    assert "Traceback" not in server.stderr


def _admitted(port: int) -> NbdClient:
    """A client in transmission, retrying while a just-closed connection still counts."""
    deadline = time.monotonic() + 5
    while True:
        try:
            client = NbdClient(port)
            client.go()
            return client
        except (EOFError, ConnectionError):
            assert time.monotonic() < deadline, "no connection slot came free"
            time.sleep(0.1)


def test_per_client_limit_refuses_only_that_address(image, tmp_path, qcownbd_server):
    sock = tmp_path / "s.sock"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nmax_connections_per_client = 3\nunix = "{sock}"\n')
    server = qcownbd_server("--config", config, f"d={image}")
    # (the start-up probe's connection may still count for a moment)
    clients = [_admitted(server.port) for _ in range(3)]
    refused = NbdClient(server.port)
    assert refused.closed()
    # Unix-socket clients have no address to share a count with
    assert int(run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"]).stdout) == SIZE
    clients.pop().sock.close()
    late = _admitted(server.port)
    late.send(late.request(CMD_READ, 0, 2, 1))
    assert late.simple_reply() == (0, 1) and late.recv(2) == b"LL"
    server.stop()
    assert "too many connections from this address" in server.stderr


def test_handshake_timeout_runs_from_accept_to_transmission(image, tmp_path, qcownbd_server):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nhandshake_timeout = 1\n")
    server = qcownbd_server("--config", config, f"d={image}")
    working = NbdClient(server.port)
    working.go()
    stalled = [_half_open(server.port, kind) for kind in range(5)]
    silent_after_greeting = NbdClient(server.port)
    silent_after_greeting.recv(18)
    started = time.monotonic()
    for sock in stalled:
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    assert silent_after_greeting.closed()
    assert time.monotonic() - started < 4
    # transmission is not subject to the handshake timeout
    time.sleep(0.5)
    working.send(working.request(CMD_READ, 0, 1, 7))
    assert working.simple_reply() == (0, 7) and working.recv(1) == b"L"


def test_a_write_payload_that_stops_arriving_ends_its_connection(image, tmp_path, qcownbd_server):
    """payload_timeout: a stalled payload closes its connection; a slow one that
    keeps moving does not, and the other clients never notice either."""
    config = tmp_path / "c.toml"
    config.write_text("[server]\npayload_timeout = 1\n")
    server = qcownbd_server("--config", config, f"d={image}")
    working, stalled, slow = (NbdClient(server.port) for _ in range(3))
    for client in (working, stalled, slow):
        client.go()
    payload = b"P" * MiB
    stalled.send(stalled.request(CMD_WRITE, 0, MiB, 1) + payload[:100_000])
    slow.send(slow.request(CMD_WRITE, MiB, MiB, 2) + payload[:100_000])
    started = time.monotonic()
    for step in range(8):       # a byte every 0.4 s: never 1 s without one
        time.sleep(0.4)
        slow.send(payload[100_000 + step:100_000 + step + 1])
        working.send(working.request(CMD_READ, 0, 1, 10 + step))
        assert working.simple_reply() == (0, 10 + step) and working.recv(1) == b"L"
    assert stalled.closed()
    # the timer looks every payload_timeout seconds: closed after 1 to 2 s of silence
    assert time.monotonic() - started < 4
    slow.send(payload[100_008:])
    assert slow.simple_reply() == (0, 2)
    slow.send(slow.request(CMD_READ, MiB, MiB, 3))
    assert slow.simple_reply() == (0, 3) and slow.recv(MiB) == payload
    server.stop()
    assert "no byte of a WRITE payload for 1s" in server.stderr


def test_requests_are_capped_at_32_mib(image, qcownbd_server):
    server = qcownbd_server(f"d={image}")
    client = NbdClient(server.port, timeout=30)
    client.go()
    client.send(client.request(CMD_READ, 0, MAX_REQUEST + 1, 1),
                client.request(CMD_READ, 0, MAX_REQUEST, 2))
    assert client.simple_reply() == (NBD_EINVAL, 1)
    assert client.simple_reply() == (0, 2)
    data = client.recv(MAX_REQUEST)
    assert data[:4096] == b"L" * 4096 and data[4096:] == bytes(MAX_REQUEST - 4096)
