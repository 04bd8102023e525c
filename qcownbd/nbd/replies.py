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

Large READ buffers come from `BufferPool` (one per server): reused
buffers, so a 1 MiB reply costs neither a zeroed allocation nor fresh
pages.  Large READs whose bytes lie as-is in one run of the image file are
not read at all: a `FileRange` waits in the queue like any other part and
goes out with sendfile when its turn comes, however full the socket was
when it was queued, so that data is never copied through this process and
a deep pipeline of large READs (nbdcopy keeps 64 per connection) holds no
buffers.  Before a write to the image, `materialize_files` reads the ranges
still queued, so a WRITE does not change the reply of a READ executed before
it; only bytes sendfile already gave the socket are the file's own pages
until the client reads them (any sendfile server has that window: NBD leaves
overlapping requests that are in flight together unordered, and the kernel's
and QEMU's clients never send them).  The transport, when it takes over,
gets the queued ranges materialized too (it cannot sendfile).
"""

import collections
import errno
import mmap
import os

from qcownbd.errors import ImageIOError
from qcownbd.image.backend import pread_filling

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
#: reply bytes one corked batch gathers before they are sent (and counted in the
#: backlog, which pauses reading): a long pipeline cannot pile replies up
BATCH_LIMIT = 1024 * 1024


class FileRange:
    """Reply bytes still in a file: ``length`` bytes at ``offset`` of ``fd``."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length


class FileReadError(ImageIOError):
    """A queued `FileRange` could not be read: its reply cannot be completed."""


def lazy_buffer(size: int):
    """A zeroed writable buffer whose memory is only taken as it is written: an
    anonymous mapping (a bytearray is zero-filled, so all of it is resident at once,
    and a client announcing a 32 MiB WRITE would cost 32 MiB before sending a byte)."""
    return mmap.mmap(-1, size)


class BufferPool:
    """Free buffers by power-of-two size, bounded in total bytes; loop thread only.

    Buffers are `lazy_buffer`s: one lent to a payload that trickles in holds
    only the pages the payload has reached.
    """

    def __init__(self, max_bytes: int = POOL_MAX_BYTES):
        self.max_bytes = max_bytes
        self._free: dict[int, list] = {}
        self._bytes = 0

    def take(self, length: int):
        """A writable buffer of at least ``length`` bytes with arbitrary contents."""
        size = max(POOL_MIN, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._bytes -= size
            return free.pop()
        return lazy_buffer(size)

    def give_back(self, buffers) -> None:
        """Keep the buffers for reuse, as far as the byte bound allows."""
        for buf in buffers:
            if self._bytes + len(buf) <= self.max_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._bytes += len(buf)



class ReplyWriter:
    """The reply path of one connection (see the module docstring).

    ``plain``: ``transport`` is the socket's own transport (no TLS layer), so
    direct writes may be used.
    ``on_backlog(high: bool)`` is called when the bytes waiting here cross
    ``high_water`` (stop reading requests) or fall to ``low_water`` again.
    ``on_broken(reason)`` is called when a queued `FileRange` cannot be read:
    its header is on the wire already, so only closing the connection is left.
    ``pool``: the server's `BufferPool`.  While ``corked`` (a batch of
    requests is being run) replies gather, and go out once the batch holds
    ``batch_limit`` bytes, so that the backlog sees them and a long pipeline
    cannot pile replies up in memory.
    """

    def __init__(self, transport, on_backlog, high_water: int, low_water: int, *,
                 plain: bool, pool: BufferPool, on_broken=None,
                 batch_limit: int = BATCH_LIMIT):
        self.transport = transport
        self.pool = pool
        self.corked = False
        self._batch_limit = batch_limit
        self._batch_bytes = 0
        self._on_backlog = on_backlog
        self._on_broken = on_broken
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
        self._lent: list = []
        self._files = 0     # FileRange parts in _batch and _queue

    @property
    def direct(self) -> bool:
        """True when replies bypass the transport's buffer."""
        return self._direct

    @property
    def idle(self) -> bool:
        """Nothing waits here to be sent."""
        return not (self._batch or self._queue)

    def lend(self, length: int) -> memoryview:
        """A writable view of ``length`` bytes for reply data, recycled once sent."""
        if length < POOL_MIN:
            return memoryview(bytearray(length))
        buf = self.pool.take(length)
        if self._direct and len(self._lent) < MAX_LENT:
            self._lent.append(buf)
        return memoryview(buf)[:length]

    def send(self, parts) -> None:
        """Queue reply parts; they leave now unless a batch is being gathered."""
        self._batch.extend(parts)
        if not self.corked:
            self.flush()
            return
        self._batch_bytes += sum(map(len, parts))
        if self._batch_bytes >= self._batch_limit:
            self.flush()

    def flush(self) -> None:
        """Send what the batch gathered."""
        parts, self._batch = self._batch, []
        self._batch_bytes = 0
        if not parts:
            return
        if not self._direct:
            _to_transport(self.transport, parts)
            return
        # an empty part could never be consumed from the front of the queue
        self._queue.extend(part for part in parts if len(part))
        self._queued += sum(map(len, parts))
        self._drain()

    def send_file(self, header, fd: int, offset: int, length: int) -> None:
        """Queue ``header``, then ``length`` bytes of ``fd`` from ``offset``, sent with
        sendfile in their turn (direct writes only; bytes past the file's end are zeros)."""
        assert self._direct
        self._files += 1
        self.send((header, FileRange(fd, offset, length)))

    def materialize_files(self) -> None:
        """Read every queued `FileRange` into memory now (before the image is written)."""
        if not self._files:
            return
        try:
            self._batch = [self._read_range(p) if type(p) is FileRange else p for p in self._batch]
            queue = self._queue
            for index, part in enumerate(queue):
                if type(part) is FileRange:
                    queue[index] = self._read_range(part)
        except FileReadError as exc:
            self._broken(str(exc))
        self._files = 0

    def transport_paused(self) -> None:
        """The transport buffers bytes: direct writes must wait."""
        self._transport_busy = True

    def transport_resumed(self) -> None:
        """The transport sent everything: continue from our queue."""
        self._transport_busy = False
        self._drain()

    def hand_over(self) -> None:
        """Give every queued byte to the transport (before it is closed)."""
        self.materialize_files()
        parts = list(self._queue) + self._batch
        self.discard()
        if parts:
            _to_transport(self.transport, parts)

    def discard(self) -> None:
        """The connection is gone: drop what is queued."""
        self._batch, self._lent = [], []
        self._batch_bytes = 0
        self._queue.clear()
        self._queued = self._files = 0

    def _broken(self, reason: str) -> None:
        self.discard()
        if self._on_broken is not None:
            self._on_broken(reason)
        else:
            self.transport.abort()

    def _read_range(self, part: FileRange, limit: int | None = None) -> memoryview:
        """The bytes of ``part`` (its first ``limit`` only, if given), zeros past EOF."""
        view = self.lend(part.length if limit is None else min(limit, part.length))
        try:
            pread_filling(part.fd, view, part.offset)
        except OSError as exc:
            raise FileReadError(exc.errno or errno.EIO,
                                f"reading reply data failed after its header was sent: "
                                f"{exc.strerror or exc}") from None
        return view

    def _drain(self) -> None:
        queue = self._queue
        try:
            while queue and not self._transport_busy:
                if self.transport.is_closing():
                    # a closing transport still sends what it is given, and may not be
                    # bypassed: its fd may be closed already
                    self.hand_over()
                    return
                head = queue[0]
                if type(head) is FileRange:
                    sent, wanted = self._sendfile(head), len(head)
                else:
                    parts = list(_head(queue, IOV_MAX))
                    wanted = sum(map(len, parts))
                    try:
                        sent = os.writev(self._fd, parts)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        # a dead socket: the transport finds out and closes the connection
                        self.hand_over()
                        return
                self._consume(sent)
                if sent < wanted and queue and not self._transport_busy:
                    # the socket is full: the transport watches it for us from now on
                    self._hand_piece_over(queue[0])
        except FileReadError as exc:
            self._broken(str(exc))
            return
        if not queue and not self._transport_busy and self._lent:
            self.pool.give_back(self._lent)
            self._lent = []
        self._note_backlog()

    def _sendfile(self, part: FileRange) -> int:
        """sendfile as much of ``part`` as the socket takes (0 when it is full)."""
        try:
            sent = os.sendfile(self._fd, part.fd, part.offset, part.length)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # the file or the socket failed: the file's bytes tell which (a read
            # error raises FileReadError; a dead socket fails the next writev)
            sent = 0
        if not sent:
            # the file's end (or an error above): what sendfile cannot send, pread
            self._queue[0] = self._read_range(part)
            self._files -= 1
        return sent

    def _hand_piece_over(self, head) -> None:
        """Give the transport the first few bytes of the queue (it copies them)."""
        if type(head) is FileRange:
            piece = self._read_range(head, HANDOVER)
        else:
            piece = memoryview(head)[:HANDOVER]
        self._consume(len(piece))
        self.transport.write(piece)

    def _consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the queue."""
        queue = self._queue
        self._queued -= sent
        while sent:
            part = queue[0]
            if sent < len(part):
                if type(part) is FileRange:
                    part.offset += sent
                    part.length -= sent
                else:
                    queue[0] = memoryview(part)[sent:]
                return
            sent -= len(part)
            if type(queue.popleft()) is FileRange:
                self._files -= 1

    def _note_backlog(self) -> None:
        high = self._queued > self._high or (self._backlog_high and self._queued > self._low)
        if high != self._backlog_high:
            self._backlog_high = high
            self._on_backlog(high)


def _head(queue, count: int):
    """The first ``count`` items of a deque, up to the first `FileRange`."""
    for index, item in enumerate(queue):
        if index == count or type(item) is FileRange:
            return
        yield item


def _to_transport(transport, parts) -> None:
    """Queue parts on the transport; large ones separately so they are not joined first."""
    if len(parts) > 1 and max(map(len, parts)) > 65536:
        for part in parts:
            transport.write(part)
    else:
        transport.writelines(parts)
