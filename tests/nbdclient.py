"""The tests' one NBD client: the bytes of the protocol, written once (no tests here).

`NbdClient(port)` is a plain socket to 127.0.0.1 that says anything, in the
order a test chooses: greetings, raw options, compact or extended requests,
hostile bytes; it reads option replies, simple replies and structured or
extended chunks.  `NbdClient.connect(port, export)` also negotiates the export
(fixed newstyle, NBD_OPT_GO) and adds the calls of pipelined I/O with simple
replies: `submit` now and `reply` later, or `read`/`write`/`flush` one at a
time.  `AsyncNbdClient` is that negotiated client over asyncio streams, for
many clients in one process, built from the same encoders.  Only 127.0.0.1
is ever contacted.
"""

import asyncio
import socket
import struct

HOST = "127.0.0.1"

# -- the protocol's numbers (the NBD document's names without NBD_) -------------
NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC = 0x668E33EF, 0x6E8A278C

#: client flags of the handshake
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
ERR_TLS_REQD, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000005, 0x80000006, 0x80000009
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
FLAG_FUA = 1
#: errnos of error replies
NBD_EIO, NBD_EINVAL, NBD_ENOSPC = 5, 22, 28

OPTION_REPLY = struct.Struct(">QIII")
COMPACT_REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_CHUNK = struct.Struct(">IHHQI")
EXTENDED_CHUNK = struct.Struct(">IHHQQQ")


# -- encoders --------------------------------------------------------------------

def _name(name: str | bytes) -> bytes:
    """A length-prefixed export name."""
    name = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(name)) + name


def option(opt: int, data: bytes = b"") -> bytes:
    """One option request: IHAVEOPT, the option, the data's length, the data."""
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go_payload(name: str | bytes, *infos: int) -> bytes:
    """The data of NBD_OPT_GO or NBD_OPT_INFO: the export name and info requests."""
    return _name(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_payload(name: str | bytes, queries) -> bytes:
    """The data of NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT."""
    return (_name(name) + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(query)) + query for query in queries))


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 0, flags: int = 0,
            payload: bytes = b"", *, extended: bool = False) -> bytes:
    """One request: a compact or an extended header, then ``payload``."""
    if extended:
        head = EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    else:
        head = COMPACT_REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return head + payload


# -- decoders --------------------------------------------------------------------

def check_greeting(greeting: bytes) -> None:
    """ValueError unless ``greeting`` (18 bytes) opens a fixed-newstyle handshake."""
    if greeting[:16] != NBDMAGIC + IHAVEOPT:
        raise ValueError(f"bad greeting {greeting!r}")


def option_reply_header(header: bytes) -> tuple[int, int, int]:
    """(option, reply type, data length) of a 20-byte option reply header."""
    magic, opt, rep, length = OPTION_REPLY.unpack(header)
    if magic != OPTION_REPLY_MAGIC:
        raise ValueError(f"bad option reply magic {magic:#x}")
    return opt, rep, length


def go_reply(rep: int, data: bytes) -> tuple[bool, tuple[int, int] | None]:
    """One reply to NBD_OPT_GO: (negotiation done, (size, transmission flags) when it
    is the export's info); ValueError when the server refuses."""
    if rep & 0x80000000:
        raise ValueError(f"GO refused ({rep:#x}): {data!r}")
    if rep == REP_ACK:
        return True, None
    if rep != REP_INFO:
        raise ValueError(f"unexpected reply {rep:#x} to GO")
    if data[:2] == b"\0\0":
        return False, struct.unpack(">QH", data[2:])
    return False, None


def simple_reply_header(header: bytes) -> tuple[int, int]:
    """(NBD errno, cookie) of a 16-byte simple reply."""
    magic, error, cookie = SIMPLE_REPLY.unpack(header)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ValueError(f"bad reply magic {magic:#x}")
    return error, cookie


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """``count`` bytes from ``sock``; EOFError when the peer closes first."""
    data = bytearray()
    while len(data) < count:
        got = sock.recv(count - len(data))
        if not got:
            raise EOFError(f"server closed after {len(data)} of {count} bytes")
        data += got
    return bytes(data)


# -- the blocking client ---------------------------------------------------------

class NbdClient:
    """A blocking socket to 127.0.0.1:``port``; ``timeout`` bounds every socket call.

    ``source``: the loopback address to connect from (another client machine, as the
    server sees it: 127.0.0.2, say).
    """

    def __init__(self, port: int, timeout: float = 10.0, source: str | None = None):
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.extended = False
        self.size = self.transmission_flags = None
        self._reads: dict[int, int] = {}
        self._cookie = 0

    @classmethod
    def connect(cls, port: int, export: str | bytes = "d", timeout: float = 30.0,
                source: str | None = None) -> "NbdClient":
        """A client in transmission on ``export``; ValueError when the server refuses it."""
        client = cls(port, timeout, source)
        client.go(export, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        return client

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    # bytes in and out

    def recv(self, count: int) -> bytes:
        """``count`` bytes from the server; EOFError when it closes first."""
        return recv_exactly(self.sock, count)

    def send(self, *data: bytes) -> None:
        """Send requests (or any bytes at all) in one go."""
        self.sock.sendall(b"".join(data))

    def closed(self) -> bool:
        """True when the server closed the connection (reads EOF or a reset)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    # the handshake

    def greet(self, flags: int = FLAG_FIXED_NEWSTYLE) -> None:
        """Read the server's greeting and answer with the client ``flags``."""
        check_greeting(self.recv(18))
        self.send(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        """Send one option request."""
        self.send(option(opt, data))

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, data) of the next option reply."""
        opt, rep, length = option_reply_header(self.recv(OPTION_REPLY.size))
        return opt, rep, self.recv(length)

    def go(self, name: str | bytes = "d", *, extended=False, structured=False, contexts=(),
           flags: int = FLAG_FIXED_NEWSTYLE) -> tuple[int, int]:
        """Greet, negotiate and enter transmission; returns (size, transmission flags)."""
        self.greet(flags)
        if extended:
            self.option(OPT_EXTENDED)
            assert self.option_reply()[1] == REP_ACK
            self.extended = True
        if structured:
            self.option(OPT_STRUCTURED)
            assert self.option_reply()[1] == REP_ACK
        if contexts:
            self.option(OPT_SET_META, meta_payload(name, contexts))
            while self.option_reply()[1] != REP_ACK:
                pass
        self.option(OPT_GO, go_payload(name))
        done = False
        while not done:
            _opt, rep, data = self.option_reply()
            done, info = go_reply(rep, data)
            if info:
                self.size, self.transmission_flags = info
        return self.size, self.transmission_flags

    # transmission: requests with the caller's cookies, any reply kind

    def request(self, cmd: int, offset: int, length: int, cookie: int, flags: int = 0,
                payload: bytes = b"") -> bytes:
        """The bytes of one request (compact or extended by the negotiation)."""
        return request(cmd, offset, length, cookie, flags, payload, extended=self.extended)

    def simple_reply(self) -> tuple[int, int]:
        """(NBD errno, cookie) of the next simple reply; a READ's data is left unread."""
        return simple_reply_header(self.recv(SIMPLE_REPLY.size))

    def chunk(self) -> tuple[int, int, int, int | None, bytes]:
        """(flags, type, cookie, header offset, payload) of one structured/extended chunk."""
        if self.extended:
            magic, flags, rtype, cookie, offset, length = EXTENDED_CHUNK.unpack(
                self.recv(EXTENDED_CHUNK.size))
            assert magic == EXTENDED_REPLY_MAGIC
        else:
            magic, flags, rtype, cookie, length = STRUCTURED_CHUNK.unpack(
                self.recv(STRUCTURED_CHUNK.size))
            assert magic == STRUCTURED_REPLY_MAGIC
            offset = None
        return flags, rtype, cookie, offset, self.recv(length)

    # transmission: pipelined requests with cookies of the client's own, simple replies

    def next_cookie(self) -> int:
        """A fresh request cookie."""
        self._cookie += 1
        return self._cookie

    def encode(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes = b"") -> tuple[int, bytes]:
        """(cookie, bytes) of one request for the caller to send, in any pieces;
        `reply` then knows how much data its READ reply carries."""
        cookie = self.next_cookie()
        if cmd == CMD_READ:
            self._reads[cookie] = length
        return cookie, self.request(cmd, offset, length, cookie, flags, payload)

    def submit(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes = b"") -> int:
        """Send one request without waiting; returns its cookie."""
        cookie, data = self.encode(cmd, offset, length, flags, payload)
        self.send(data)
        return cookie

    def reply(self) -> tuple[int, int, bytes | None]:
        """The next reply: (cookie, NBD errno, data of a successful READ or None)."""
        error, cookie = self.simple_reply()
        length = self._reads.pop(cookie, None)
        data = self.recv(length) if length is not None and not error else None
        return cookie, error, data

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> tuple[int, bytes | None]:
        """Send one request and wait for its reply: (NBD errno, data)."""
        cookie = self.submit(cmd, offset, length, flags, payload)
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
            self.send(self.request(CMD_DISC, 0, 0, self.next_cookie()))
        except OSError:
            pass
        self.sock.close()


# -- the asyncio client ----------------------------------------------------------

class AsyncNbdClient:
    """A negotiated NBD client over asyncio streams, one request at a time."""

    @classmethod
    async def connect(cls, port: int, export: str | bytes = "d") -> "AsyncNbdClient":
        """Connect and negotiate ``export``."""
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(HOST, port)
        check_greeting(await self.reader.readexactly(18))
        self.writer.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                          + option(OPT_GO, go_payload(export)))
        done, self.size = False, None
        while not done:
            _opt, rep, length = option_reply_header(
                await self.reader.readexactly(OPTION_REPLY.size))
            done, info = go_reply(rep, await self.reader.readexactly(length))
            if info:
                self.size, _flags = info
        self.cookie = 0
        return self

    async def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload: bytes = b"") -> tuple[int, bytes | None]:
        """One request and its reply: (NBD errno, data of a successful READ)."""
        self.cookie += 1
        self.writer.write(request(cmd, offset, length, self.cookie, flags))
        if payload:
            self.writer.write(payload)
        await self.writer.drain()
        error, cookie = simple_reply_header(await self.reader.readexactly(SIMPLE_REPLY.size))
        if cookie != self.cookie:
            raise ValueError(f"reply for cookie {cookie}, expected {self.cookie}")
        data = None
        if cmd == CMD_READ and not error:
            data = await self.reader.readexactly(length)
        return error, data

    async def close(self) -> None:
        """DISC and close."""
        self.writer.write(request(CMD_DISC, cookie=self.cookie + 1))
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
