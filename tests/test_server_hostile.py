"""Raw-socket NBD sessions: extended headers, and what polite clients never send."""

import socket
import struct
import time

import pytest

from helpers import run
from nbdclient import (CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, ERR_INVALID,
                       ERR_POLICY, ERR_TOO_BIG, ERR_UNKNOWN, ERR_UNSUP, NBD_EINVAL, NBD_ENOSPC,
                       OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_STARTTLS, REP_ACK,
                       NbdClient, go_payload)

pytestmark = pytest.mark.timeout(60)
SIZE = 16 * 1024 * 1024


@pytest.fixture
def server(tmp_path, qcownbd_server):
    image = tmp_path / "d.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", image, str(SIZE)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 1M", image])
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nhandshake_timeout = 2\nmax_connections = 8\n'
                      f'[exports.d]\npath = "{image}"\n')
    return qcownbd_server("--config", config)


def test_extended_headers_round_trip(server):
    client = NbdClient(server.port)
    size, _flags = client.go(extended=True,
                             contexts=(b"base:allocation", b"qemu:allocation-depth"))
    assert size == SIZE
    data = bytes(range(256)) * 40
    client.send(client.request(CMD_WRITE, 5000, len(data), 1, payload=data),
                client.request(CMD_READ, 5000, len(data), 2),
                client.request(CMD_BLOCK_STATUS, 0, SIZE, 3),
                client.request(CMD_FLUSH, 0, 0, 4))
    flags, rtype, cookie, offset, payload = client.chunk()
    assert (flags, rtype, cookie, offset, payload) == (1, 0, 1, 5000, b"")  # NONE, DONE
    flags, rtype, cookie, offset, payload = client.chunk()
    assert (flags, rtype, cookie, offset) == (1, 1, 2, 5000)
    assert payload == struct.pack(">Q", 5000) + data
    seen = {}
    for _ in range(2):
        flags, rtype, cookie, offset, payload = client.chunk()
        assert (rtype, cookie) == (6, 3)                      # BLOCK_STATUS_EXT
        ctx_id, count = struct.unpack(">II", payload[:8])
        seen[ctx_id] = list(struct.iter_unpack(">QQ", payload[8:]))
        assert len(seen[ctx_id]) == count
    assert flags == 1 and sum(length for length, _ in seen[1]) == SIZE
    assert client.chunk()[:3] == (1, 0, 4)
    # an error comes back as an ERROR chunk carrying the errno
    client.send(client.request(CMD_READ, SIZE, 512, 5))
    flags, rtype, cookie, _offset, payload = client.chunk()
    assert (flags, rtype, cookie) == (1, 0x8001, 5)
    assert struct.unpack(">I", payload[:4])[0] == NBD_EINVAL


def test_bad_magic_and_unknown_client_flags_close_only_that_connection(server):
    bad_option = NbdClient(server.port)
    bad_option.greet()
    bad_option.sock.sendall(b"IHAVEOPX" + bytes(8))
    assert bad_option.closed()
    bad_flags = NbdClient(server.port)
    bad_flags.greet(flags=0x10)
    assert bad_flags.closed()
    bad_request = NbdClient(server.port)
    bad_request.go()
    bad_request.send(b"\x12\x34\x56\x78" + bytes(24))
    assert bad_request.closed()
    good = NbdClient(server.port)
    good.go()
    good.send(good.request(CMD_READ, 1024 * 1024, 4, 9))
    assert good.simple_reply() == (0, 9) and good.recv(4) == b"BBBB"


def test_option_errors_keep_negotiating(server):
    client = NbdClient(server.port)
    client.greet()
    client.option(99)
    assert client.option_reply()[1] == ERR_UNSUP
    client.option(OPT_STARTTLS)
    assert client.option_reply()[1] in (ERR_UNSUP, ERR_POLICY)
    client.option(OPT_GO, b"\0\0\0\xff")
    assert client.option_reply()[1] == ERR_INVALID
    client.option(OPT_GO, go_payload(b"nope"))
    assert client.option_reply()[1] == ERR_UNKNOWN
    # a big option is read and thrown away, never buffered whole
    client.option(OPT_LIST, bytes(1024 * 1024))
    assert client.option_reply()[1] == ERR_TOO_BIG
    client.option(OPT_LIST)
    assert client.option_reply()[1:] == (2, b"\0\0\0\1d")
    assert client.option_reply()[1] == REP_ACK
    client.option(OPT_ABORT)
    assert client.option_reply()[1] == REP_ACK
    assert client.closed()


def test_export_name_unknown_closes_and_no_zeroes_is_honoured(server):
    unknown = NbdClient(server.port)
    unknown.greet()
    unknown.option(OPT_EXPORT_NAME, b"nope")
    assert unknown.closed()
    for flags, reply_len in ((1, 10 + 124), (3, 10)):
        client = NbdClient(server.port)
        client.greet(flags)
        client.option(OPT_EXPORT_NAME, b"d")
        size, _tflags = struct.unpack(">QH", client.recv(10))
        assert size == SIZE
        if reply_len > 10:
            assert client.recv(124) == bytes(124)
        client.send(client.request(CMD_READ, 0, 8, 1))
        assert client.simple_reply() == (0, 1) and client.recv(8) == bytes(8)


def test_oversized_write_skipped_or_closed(server):
    client = NbdClient(server.port)
    client.go()
    big = 33 * 1024 * 1024
    client.send(client.request(CMD_WRITE, 0, big, 1, payload=bytes(big)),
                client.request(CMD_READ, 1024 * 1024, 2, 2))
    assert client.simple_reply() == (NBD_EINVAL, 1)
    assert client.simple_reply() == (0, 2) and client.recv(2) == b"BB"
    # a payload too big to skip sensibly: refused, then the connection ends
    client.send(client.request(CMD_WRITE, 0, 1 << 31, 3))
    assert client.simple_reply() == (NBD_EINVAL, 3)
    assert client.closed()


def test_past_end_and_unknown_command_keep_the_connection(server):
    client = NbdClient(server.port)
    client.go()
    client.send(client.request(CMD_READ, SIZE - 4, 8, 1),
                client.request(CMD_WRITE, SIZE - 2, 4, 2, payload=b"zzzz"),
                client.request(42, 0, 0, 3),
                client.request(CMD_READ, 1024 * 1024, 2, 4))
    assert client.simple_reply() == (NBD_EINVAL, 1)
    assert client.simple_reply() == (NBD_ENOSPC, 2)
    assert client.simple_reply() == (NBD_EINVAL, 3)
    assert client.simple_reply() == (0, 4) and client.recv(2) == b"BB"


def test_disc_finishes_in_flight_requests_then_closes(server):
    client = NbdClient(server.port)
    client.go(structured=True)
    block = b"\x17" * 65536
    requests = [client.request(CMD_WRITE, i * 65536, 65536, i, flags=1, payload=block)
                for i in range(20)]
    requests.append(client.request(CMD_FLUSH, 0, 0, 100))
    requests.append(client.request(CMD_DISC, 0, 0, 101))
    client.send(*requests)
    cookies = {client.simple_reply()[1] for _ in range(21)}
    assert cookies == set(range(20)) | {100}
    assert client.closed()
    check = NbdClient(server.port)
    check.go()
    check.send(check.request(CMD_READ, 19 * 65536, 65536, 1))
    assert check.simple_reply() == (0, 1) and check.recv(65536) == block


def test_client_not_reading_replies_cannot_grow_server_memory(server):
    client = NbdClient(server.port, timeout=30)
    client.go()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    count, length = 400, 1024 * 1024
    client.send(*[client.request(CMD_READ, 0, length, i) for i in range(count)])
    time.sleep(1.5)
    assert server.rss_bytes() < 120 * 1024 * 1024
    for i in range(count):
        assert client.simple_reply() == (0, i)
        client.recv(length)


def test_handshake_timeout_and_connection_limit(server):
    idle = [NbdClient(server.port) for _ in range(8)]
    refused = NbdClient(server.port)
    assert refused.closed()
    started = time.monotonic()
    assert idle[0].closed()
    assert time.monotonic() - started < 5
    late = NbdClient(server.port)
    late.go()
    late.send(late.request(CMD_READ, 1024 * 1024, 1, 1))
    assert late.simple_reply() == (0, 1) and late.recv(1) == b"B"
