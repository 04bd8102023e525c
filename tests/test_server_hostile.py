"""A raw-socket NBD client: extended headers, and what polite clients never send."""

import socket
import struct
import time

import pytest

from conftest import run
from nbdraw import recv_exactly

pytestmark = pytest.mark.timeout(60)
SIZE = 16 * 1024 * 1024
IHAVEOPT = b"IHAVEOPT"
OPT_GO, OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 7, 1, 2, 3, 5
OPT_STRUCTURED, OPT_SET_META, OPT_EXTENDED = 8, 10, 11
REP_ACK, REP_INFO, REP_META = 1, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = (
    0x80000001, 0x80000002, 0x80000003, 0x80000006, 0x80000009)
READ, WRITE, DISC, FLUSH, BLOCK_STATUS = 0, 1, 2, 3, 7
EINVAL, ENOSPC = 22, 28


class RawClient:
    """Just enough of NBD over a plain socket to say anything at all."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.extended = False

    def recv(self, count: int) -> bytes:
        return recv_exactly(self.sock, count)

    def closed(self) -> bool:
        """True when the server closed the connection (reads EOF or a reset)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def greet(self, flags=1) -> None:
        magic, opt_magic, _hs_flags = struct.unpack(">8s8sH", self.recv(18))
        assert (magic, opt_magic) == (b"NBDMAGIC", IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == 0x3E889045565A9
        return opt, rep, self.recv(length)

    def go(self, name=b"d", extended=False, structured=False, contexts=()) -> tuple[int, int]:
        """Negotiate and enter transmission; returns (size, transmission flags)."""
        self.greet()
        if extended:
            self.option(OPT_EXTENDED)
            assert self.option_reply()[1] == REP_ACK
            self.extended = True
        if structured:
            self.option(OPT_STRUCTURED)
            assert self.option_reply()[1] == REP_ACK
        if contexts:
            queries = b"".join(struct.pack(">I", len(c)) + c for c in contexts)
            self.option(OPT_SET_META, struct.pack(">I", len(name)) + name
                        + struct.pack(">I", len(contexts)) + queries)
            while self.option_reply()[1] != REP_ACK:
                pass
        self.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        size = flags = None
        while True:
            _opt, rep, data = self.option_reply()
            if rep == REP_INFO and data[:2] == b"\0\0":
                size, flags = struct.unpack(">QH", data[2:])
            if rep == REP_ACK:
                return size, flags
            assert rep == REP_INFO, hex(rep)

    def request(self, cmd, offset, length, cookie, flags=0, payload=b"") -> bytes:
        """The bytes of one request (compact or extended by the negotiation)."""
        if self.extended:
            head = struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, offset, length)
        else:
            head = struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)
        return head + payload

    def send(self, *requests) -> None:
        self.sock.sendall(b"".join(requests))

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698
        return error, cookie

    def chunk(self) -> tuple[int, int, int, int, bytes]:
        """(flags, type, cookie, header offset, payload) of one structured/extended chunk."""
        if self.extended:
            magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", self.recv(32))
            assert magic == 0x6E8A278C
        else:
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", self.recv(20))
            assert magic == 0x668E33EF
            offset = None
        return flags, rtype, cookie, offset, self.recv(length)


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
    client = RawClient(server.port)
    size, _flags = client.go(extended=True,
                             contexts=(b"base:allocation", b"qemu:allocation-depth"))
    assert size == SIZE
    data = bytes(range(256)) * 40
    client.send(client.request(WRITE, 5000, len(data), 1, payload=data),
                client.request(READ, 5000, len(data), 2),
                client.request(BLOCK_STATUS, 0, SIZE, 3),
                client.request(FLUSH, 0, 0, 4))
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
    client.send(client.request(READ, SIZE, 512, 5))
    flags, rtype, cookie, _offset, payload = client.chunk()
    assert (flags, rtype, cookie) == (1, 0x8001, 5)
    assert struct.unpack(">I", payload[:4])[0] == EINVAL


def test_bad_magic_and_unknown_client_flags_close_only_that_connection(server):
    bad_option = RawClient(server.port)
    bad_option.greet()
    bad_option.sock.sendall(b"IHAVEOPX" + bytes(8))
    assert bad_option.closed()
    bad_flags = RawClient(server.port)
    bad_flags.greet(flags=0x10)
    assert bad_flags.closed()
    bad_request = RawClient(server.port)
    bad_request.go()
    bad_request.send(b"\x12\x34\x56\x78" + bytes(24))
    assert bad_request.closed()
    good = RawClient(server.port)
    good.go()
    good.send(good.request(READ, 1024 * 1024, 4, 9))
    assert good.simple_reply() == (0, 9) and good.recv(4) == b"BBBB"


def test_option_errors_keep_negotiating(server):
    client = RawClient(server.port)
    client.greet()
    client.option(99)
    assert client.option_reply()[1] == ERR_UNSUP
    client.option(OPT_STARTTLS)
    assert client.option_reply()[1] in (ERR_UNSUP, ERR_POLICY)
    client.option(OPT_GO, b"\0\0\0\xff")
    assert client.option_reply()[1] == ERR_INVALID
    client.option(OPT_GO, struct.pack(">I", 4) + b"nope\0\0")
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
    unknown = RawClient(server.port)
    unknown.greet()
    unknown.option(OPT_EXPORT_NAME, b"nope")
    assert unknown.closed()
    for flags, reply_len in ((1, 10 + 124), (3, 10)):
        client = RawClient(server.port)
        client.greet(flags)
        client.option(OPT_EXPORT_NAME, b"d")
        size, _tflags = struct.unpack(">QH", client.recv(10))
        assert size == SIZE
        if reply_len > 10:
            assert client.recv(124) == bytes(124)
        client.send(client.request(READ, 0, 8, 1))
        assert client.simple_reply() == (0, 1) and client.recv(8) == bytes(8)


def test_oversized_write_skipped_or_closed(server):
    client = RawClient(server.port)
    client.go()
    big = 33 * 1024 * 1024
    client.send(client.request(WRITE, 0, big, 1, payload=bytes(big)),
                client.request(READ, 1024 * 1024, 2, 2))
    assert client.simple_reply() == (EINVAL, 1)
    assert client.simple_reply() == (0, 2) and client.recv(2) == b"BB"
    # a payload too big to skip sensibly: refused, then the connection ends
    client.send(client.request(WRITE, 0, 1 << 31, 3))
    assert client.simple_reply() == (EINVAL, 3)
    assert client.closed()


def test_past_end_and_unknown_command_keep_the_connection(server):
    client = RawClient(server.port)
    client.go()
    client.send(client.request(READ, SIZE - 4, 8, 1),
                client.request(WRITE, SIZE - 2, 4, 2, payload=b"zzzz"),
                client.request(42, 0, 0, 3),
                client.request(READ, 1024 * 1024, 2, 4))
    assert client.simple_reply() == (EINVAL, 1)
    assert client.simple_reply() == (ENOSPC, 2)
    assert client.simple_reply() == (EINVAL, 3)
    assert client.simple_reply() == (0, 4) and client.recv(2) == b"BB"


def test_disc_finishes_in_flight_requests_then_closes(server):
    client = RawClient(server.port)
    client.go(structured=True)
    block = b"\x17" * 65536
    requests = [client.request(WRITE, i * 65536, 65536, i, flags=1, payload=block)
                for i in range(20)]
    requests.append(client.request(FLUSH, 0, 0, 100))
    requests.append(client.request(DISC, 0, 0, 101))
    client.send(*requests)
    cookies = {client.simple_reply()[1] for _ in range(21)}
    assert cookies == set(range(20)) | {100}
    assert client.closed()
    check = RawClient(server.port)
    check.go()
    check.send(check.request(READ, 19 * 65536, 65536, 1))
    assert check.simple_reply() == (0, 1) and check.recv(65536) == block


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_not_reading_replies_cannot_grow_server_memory(server):
    client = RawClient(server.port, timeout=30)
    client.go()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    count, length = 400, 1024 * 1024
    client.send(*[client.request(READ, 0, length, i) for i in range(count)])
    time.sleep(1.5)
    assert _rss_kib(server.proc.pid) < 120 * 1024
    for i in range(count):
        assert client.simple_reply() == (0, i)
        client.recv(length)


def test_handshake_timeout_and_connection_limit(server):
    idle = [RawClient(server.port) for _ in range(8)]
    refused = RawClient(server.port)
    assert refused.closed()
    started = time.monotonic()
    assert idle[0].closed()
    assert time.monotonic() - started < 5
    late = RawClient(server.port)
    late.go()
    late.send(late.request(READ, 1024 * 1024, 1, 1))
    assert late.simple_reply() == (0, 1) and late.recv(1) == b"B"
