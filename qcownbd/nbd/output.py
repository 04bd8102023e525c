"""Reply bytes to the socket with as few system calls and copies as possible.

The asyncio transport sends each ``write`` with its own ``send`` and copies
whatever the socket does not take at once into one growing bytearray.  At
tens of thousands of small replies a second those calls, and the copies of
large READ data, are most of the server's time.  `ReplyWriter` instead
gathers the replies of a whole batch of requests and hands them to
``writev`` on the socket, straight from the buffers they were read into.

Direct writes are only done on a plain socket whose transport holds no
unsent bytes (so the byte order on the wire is kept), never after TLS
started (the transport encrypts), never once the transport is closing (its
fd may be gone).  When the socket is full, one reply part is handed to the
transport (which copies it, watches the socket and calls ``pause_writing``
at once because its limits are set to zero) and the rest waits here,
uncopied, until ``resume_writing`` says the transport drained.

Large READ buffers come from `BufferPool`: reused bytearrays, so a 1 MiB
reply costs neither a zeroed allocation nor fresh pages.
"""

import collections
import os

#: most iovecs one writev takes (Linux IOV_MAX)
IOV_MAX = 1024
#: buffers at least this big are pooled (smaller ones are cheap to allocate)
POOL_MIN = 64 * 1024
#: bytes of free buffers the pool keeps at most (shared by all connections)
POOL_MAX_BYTES = 8 * 1024 * 1024
#: pooled buffers one writer remembers for recycling; beyond it they are just freed
MAX_LENT = 64
#: bytes handed to the transport when the socket is full: it copies them, so few
HANDOVER = 16 * 1024


class BufferPool:
    """Free bytearrays by power-of-two size, bounded in total bytes; loop thread only."""

    def __init__(self, max_bytes: int = POOL_MAX_BYTES):
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    def take(self, length: int) -> bytearray:
        """A bytearray of at least ``length`` bytes with arbitrary contents."""
        size = max(POOL_MIN, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._bytes -= size
            return free.pop()
        return bytearray(size)

    def give_back(self, buffers) -> None:
        """Keep the buffers for reuse, as far as the byte bound allows."""
        for buf in buffers:
            if self._bytes + len(buf) <= self.max_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._bytes += len(buf)


POOL = BufferPool()


class ReplyWriter:
    """The reply path of one connection (see the module docstring).

    ``plain``: ``transport`` is the socket's own transport (no TLS layer), so
    direct writes may be used.
    ``on_backlog(high: bool)`` is called when the bytes waiting here cross
    ``high_water`` (stop reading requests) or fall to ``low_water`` again.
    """

    def __init__(self, transport, on_backlog, high_water: int, low_water: int, *,
                 plain: bool):
        self.transport = transport
        self.corked = False
        self._on_backlog = on_backlog
        self._high, self._low = high_water, low_water
        sock = transport.get_extra_info("socket") if plain else None
        self._fd = sock.fileno() if sock is not None else -1
        self._direct = self._fd >= 0 and not transport.is_closing()
        if self._direct:
            # zero limits: the transport pauses us as soon as it buffers anything
            # and resumes us when it is empty, which is exactly when we may writev
            transport.set_write_buffer_limits(high=0, low=0)
        self._batch: list = []
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        self._transport_busy = False
        self._backlog_high = False
        self._lent: list[bytearray] = []

    @property
    def direct(self) -> bool:
        """True when replies bypass the transport's buffer."""
        return self._direct

    def lend(self, length: int) -> memoryview:
        """A writable view of ``length`` bytes for reply data, recycled once sent."""
        if length < POOL_MIN:
            return memoryview(bytearray(length))
        buf = POOL.take(length)
        if self._direct and len(self._lent) < MAX_LENT:
            self._lent.append(buf)
        return memoryview(buf)[:length]

    def send(self, parts) -> None:
        """Queue reply parts; they leave now unless a batch is being gathered."""
        self._batch.extend(parts)
        if not self.corked:
            self.flush()

    def flush(self) -> None:
        """Send what the batch gathered."""
        parts, self._batch = self._batch, []
        if not parts:
            return
        if not self._direct:
            _to_transport(self.transport, parts)
            return
        # an empty part could never be consumed from the front of the queue
        self._queue.extend(part for part in parts if len(part))
        self._queued += sum(map(len, parts))
        self._drain()

    def try_sendfile(self, header, fd: int, offset: int, length: int) -> int:
        """Send ``header``, then file bytes with sendfile if the socket is ours now.

        Returns how many of the ``length`` bytes went out (0 when sendfile could
        not be used); the caller sends the rest.  The header is always queued.
        """
        self._batch.append(header)
        if not self._direct:
            return 0
        self.flush()
        if self._queue or self._transport_busy or self.transport.is_closing():
            return 0
        sent = 0
        try:
            while sent < length:
                count = os.sendfile(self._fd, fd, offset + sent, length - sent)
                if not count:
                    break       # end of the file: the caller reads the rest (zeros)
                sent += count
        except OSError:
            pass    # a full socket, or a file sendfile cannot read: the caller goes on
        return sent

    def transport_paused(self) -> None:
        """The transport buffers bytes: direct writes must wait."""
        self._transport_busy = True

    def transport_resumed(self) -> None:
        """The transport sent everything: continue from our queue."""
        self._transport_busy = False
        self._drain()

    def hand_over(self) -> None:
        """Give every queued byte to the transport (before it is closed)."""
        parts = list(self._queue) + self._batch
        self.discard()
        if parts:
            _to_transport(self.transport, parts)

    def discard(self) -> None:
        """The connection is gone: drop what is queued."""
        self._batch, self._lent = [], []
        self._queue.clear()
        self._queued = 0

    def _drain(self) -> None:
        queue = self._queue
        while queue and not self._transport_busy:
            if self.transport.is_closing():
                # a closing transport still sends what it is given, and may not be
                # bypassed: its fd may be closed already
                self.hand_over()
                return
            try:
                sent = os.writev(self._fd, list(_head(queue, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # a dead socket: the transport finds out and closes the connection
                self.hand_over()
                return
            self._consume(sent)
            if queue and not self._transport_busy:
                # the socket is full: the transport watches it for us from now on
                piece = memoryview(queue[0])[:HANDOVER]
                self._consume(len(piece))
                self.transport.write(piece)
        if not queue and not self._transport_busy and self._lent:
            POOL.give_back(self._lent)
            self._lent = []
        self._note_backlog()

    def _consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the queue."""
        queue = self._queue
        self._queued -= sent
        while sent:
            part = queue[0]
            if sent < len(part):
                queue[0] = memoryview(part)[sent:]
                return
            sent -= len(part)
            queue.popleft()

    def _note_backlog(self) -> None:
        high = self._queued > self._high or (self._backlog_high and self._queued > self._low)
        if high != self._backlog_high:
            self._backlog_high = high
            self._on_backlog(high)


def _head(queue, count: int):
    """The first ``count`` items of a deque."""
    for index, item in enumerate(queue):
        if index == count:
            return
        yield item


def _to_transport(transport, parts) -> None:
    """Queue parts on the transport; large ones separately so they are not joined first."""
    if len(parts) > 1 and max(map(len, parts)) > 65536:
        for part in parts:
            transport.write(part)
    else:
        transport.writelines(parts)
