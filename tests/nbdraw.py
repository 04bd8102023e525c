"""A minimal NBD client for the robustness tests (no tests here).

Fixed-newstyle handshake with NBD_OPT_GO and simple replies, so every reply
is a 16-byte header (plus the data of a successful READ).  `NbdClient` is a
blocking socket client that can pipeline (send now, collect replies later);
`AsyncNbdClient` is the same over asyncio streams for many clients in one
process.  Only 127.0.0.1 is ever contacted.
"""

import asyncio
import socket
import struct

HOST = "127.0.0.1"
NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FUA = 1
CLIENT_FIXED_NEWSTYLE_NO_ZEROES = 3
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
OPTION_REPLY = struct.Struct(">QIII")


def go_option(export: str) -> bytes:
    """The bytes of an NBD_OPT_GO for ``export`` with no info requests."""
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + b"\0\0"
    return IHAVEOPT + struct.pack(">II", OPT_GO, len(payload)) + payload


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """One compact request header."""
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def option_reply_header(header: bytes) -> tuple[int, int]:
    """(reply type, payload length) of a 20-byte option reply header."""
    magic, _opt, rep, length = OPTION_REPLY.unpack(header)
    if magic != OPTION_REPLY_MAGIC:
        raise ValueError(f"bad option reply magic {magic:#x}")
    return rep, length


def go_step(rep: int, payload: bytes, size: int | None) -> tuple[bool, int | None]:
    """Take one GO reply: (negotiation done, export size so far); ValueError on refusal."""
    if rep & 0x80000000:
        raise ValueError(f"GO refused ({rep:#x}): {payload!r}")
    if rep == REP_INFO and payload[:2] == b"\0\0":
        size = struct.unpack(">Q", payload[2:10])[0]
    return rep == REP_ACK, size


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """``count`` bytes from ``sock``; EOFError when the peer closes first."""
    data = bytearray()
    while len(data) < count:
        got = sock.recv(count - len(data))
        if not got:
            raise EOFError(f"server closed after {len(data)} of {count} bytes")
        data += got
    return bytes(data)


class NbdClient:
    """Blocking NBD client on 127.0.0.1:``port``; ``timeout`` bounds every socket call."""

    def __init__(self, port: int, export: str = "", timeout: float = 30.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = self.recv_exactly(18)
        if greeting[:16] != NBDMAGIC + IHAVEOPT:
            raise ValueError(f"bad greeting {greeting!r}")
        self.sock.sendall(struct.pack(">I", CLIENT_FIXED_NEWSTYLE_NO_ZEROES) + go_option(export))
        done = self.size = None
        while not done:
            rep, length = option_reply_header(self.recv_exactly(OPTION_REPLY.size))
            done, self.size = go_step(rep, self.recv_exactly(length), self.size)
        self._reads: dict[int, int] = {}
        self._cookie = 0

    def recv_exactly(self, count: int) -> bytes:
        """``count`` bytes from the server; EOFError when it closes first."""
        return recv_exactly(self.sock, count)

    def next_cookie(self) -> int:
        """A fresh request cookie."""
        self._cookie += 1
        return self._cookie

    def send(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> int:
        """Send one request without waiting; returns its cookie."""
        cookie, data = self.encode(cmd, offset, length, flags, payload)
        self.sock.sendall(data)
        return cookie

    def encode(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes = b"") -> tuple[int, bytes]:
        """(cookie, bytes) of one request for the caller to send, in any pieces."""
        cookie = self.next_cookie()
        if cmd == CMD_READ:
            self._reads[cookie] = length
        return cookie, request(cmd, cookie, offset, length, flags) + payload

    def reply(self) -> tuple[int, int, bytes | None]:
        """The next reply: (cookie, NBD errno, data of a successful READ or None)."""
        magic, error, cookie = REPLY.unpack(self.recv_exactly(REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ValueError(f"bad reply magic {magic:#x}")
        length = self._reads.pop(cookie, None)
        data = self.recv_exactly(length) if length is not None and not error else None
        return cookie, error, data

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> tuple[int, bytes | None]:
        """Send one request and wait for its reply: (NBD errno, data)."""
        cookie = self.send(cmd, offset, length, flags, payload)
        got, error, data = self.reply()
        assert got == cookie, (got, cookie)
        return error, data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        """WRITE; returns the NBD errno (0 = success)."""
        return self.call(CMD_WRITE, offset, len(data), flags, data)[0]

    def read(self, offset: int, length: int) -> bytes:
        """READ; AssertionError on an error reply."""
        error, data = self.call(CMD_READ, offset, length)
        assert error == 0, f"read {offset}+{length} failed with errno {error}"
        return data

    def flush(self) -> int:
        """FLUSH; returns the NBD errno."""
        return self.call(CMD_FLUSH)[0]

    def close(self) -> None:
        """Say goodbye (DISC) and close the socket."""
        try:
            self.sock.sendall(request(CMD_DISC, self.next_cookie()))
        except OSError:
            pass
        self.sock.close()


class AsyncNbdClient:
    """NBD client over asyncio streams, one request at a time."""

    @classmethod
    async def connect(cls, port: int, export: str = "") -> "AsyncNbdClient":
        """Connect and negotiate ``export``."""
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(HOST, port)
        greeting = await self.reader.readexactly(18)
        if greeting[:16] != NBDMAGIC + IHAVEOPT:
            raise ValueError(f"bad greeting {greeting!r}")
        self.writer.write(struct.pack(">I", CLIENT_FIXED_NEWSTYLE_NO_ZEROES) + go_option(export))
        done = self.size = None
        while not done:
            rep, length = option_reply_header(await self.reader.readexactly(OPTION_REPLY.size))
            done, self.size = go_step(rep, await self.reader.readexactly(length), self.size)
        self.cookie = 0
        return self

    async def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload: bytes = b"") -> tuple[int, bytes | None]:
        """One request and its reply: (NBD errno, data of a successful READ)."""
        self.cookie += 1
        self.writer.write(request(cmd, self.cookie, offset, length, flags))
        if payload:
            self.writer.write(payload)
        await self.writer.drain()
        magic, error, cookie = REPLY.unpack(await self.reader.readexactly(REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise ValueError(f"bad reply {magic:#x} cookie {cookie}")
        data = None
        if cmd == CMD_READ and not error:
            data = await self.reader.readexactly(length)
        return error, data

    async def close(self) -> None:
        """DISC and close."""
        self.writer.write(request(CMD_DISC, self.cookie + 1))
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
