"""Transmission-phase commands: checks, the dispatch table, and the replies.

A `Dispatcher` runs one connection's requests against its export and
answers them through a narrow replies port (`ReplyWriter`: ``send``,
``lend``, ``send_file``, ``materialize_files``); it knows nothing of sockets.  A new NBD command
is one entry in ``_ALLOWED_FLAGS`` and one in ``_COMMANDS``.
"""

import errno as host_errno
import logging
import time
from time import perf_counter

from qcownbd.errors import ImageIOError, QcownbdError
from qcownbd.nbd import protocol
from qcownbd.nbd.constants import MAX_REQUEST_SIZE, Cmd, CmdFlag, Errno
from qcownbd.nbd.protocol import ReplyMode
from qcownbd.ratelimit import RateLimitedLog

log = logging.getLogger("qcownbd.nbd")

#: structured READs at least this long are split around zero ranges
READ_HOLE_SCAN_MIN = 64 * 1024
#: zero ranges shorter than this are sent as data (a chunk header costs more)
HOLE_CHUNK_MIN = 4096
#: backend extents gathered per BLOCK_STATUS at most (bounds time and reply size)
MAX_STATUS_EXTENTS = 16384
#: reads at least this long go out with sendfile when the backend maps them to one file run
SENDFILE_MIN = 64 * 1024
#: event-loop time one request may take before it yields to the other clients: a long
#: WRITE_ZEROES, TRIM or CACHE goes on in pieces later, a BLOCK_STATUS answers what it found
TIME_SLICE = 0.001
#: the clusters (preferred blocks) one backend call of a piecewise request covers:
#: its cost follows the clusters it touches, whatever their size
PIECE_BLOCKS = 256

# Plain ints on the per-request path: ``int & IntFlag`` runs enum code in Python
# (half a microsecond), ``int & int`` does not.
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)
_ALLOWED_FLAGS = {int(cmd): int(flags) for cmd, flags in {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA | CmdFlag.PAYLOAD_LEN,
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: 0,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}.items()}
_WRITING = frozenset(map(int, (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)))
_RANGELESS = frozenset(map(int, (Cmd.DISC, Cmd.FLUSH)))
_DATA_CARRYING = frozenset(map(int, (Cmd.READ, Cmd.WRITE)))
_GROWING = frozenset(map(int, (Cmd.WRITE, Cmd.WRITE_ZEROES)))
_BLOCK_STATUS, _DISC = int(Cmd.BLOCK_STATUS), int(Cmd.DISC)
_FAST_ZERO, _NO_HOLE, _REQ_ONE = int(CmdFlag.FAST_ZERO), int(CmdFlag.NO_HOLE), int(CmdFlag.REQ_ONE)
_SIMPLE = ReplyMode.SIMPLE
_COMMAND_NAMES = set(Cmd)
_ERRNO_NAMES = set(Errno)


class ConnectionStats:
    """Counters for the one log line written when a connection ends."""

    __slots__ = ("started", "requests", "bytes_read", "bytes_written", "errors")

    def __init__(self):
        self.started = time.monotonic()
        self.requests = self.bytes_read = self.bytes_written = self.errors = 0

    def add(self, other: "ConnectionStats") -> None:
        """Count ``other``'s requests, bytes and errors in these too."""
        self.requests += other.requests
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.errors += other.errors

    def __str__(self) -> str:
        return (f"duration={time.monotonic() - self.started:.1f}s requests={self.requests} "
                f"read={self.bytes_read} written={self.bytes_written} errors={self.errors}")


class Dispatcher:
    """Runs the requests of one connection against its export, in arrival order.

    ``session`` is what negotiation agreed (reply mode, metadata contexts);
    ``replies`` the connection's `ReplyWriter`.  Backend calls run in the
    caller's thread except flushes, which ``offload(fn, done)`` runs in a
    worker thread, calling ``done(future)`` back in the caller's thread;
    a long request yields between pieces through ``defer(callback)``
    (``busy`` is True until it finished: nothing after it may start);
    ``on_async_done()`` says a request that was in flight or busy finished.
    ``zero_copy``: large reads may be sent with sendfile from the image file
    (off while faults are injected: every read must meet them).  ``log`` is
    the server's `RateLimitedLog`: one client's errors cannot flood the log.
    """

    #: flushes (FLUSH, FUA) in flight per connection before reading pauses
    MAX_INFLIGHT = 64

    def __init__(self, export, session, replies, stats: ConnectionStats, peer: str, *,
                 offload, defer, on_async_done, log: RateLimitedLog,
                 zero_copy: bool = True):
        self.backend = export.backend
        self.read_only = export.read_only
        self.mode = session.mode
        self.contexts = dict(session.contexts)
        self.replies = replies
        self.stats = stats
        self.peer = peer
        self.inflight = 0
        self.busy = False
        #: the client is gone: a request running in pieces stops at the next one
        self.stopped = False
        self.log = log
        self._offload = offload
        self._defer = defer
        self._on_async_done = on_async_done
        self._zero_copy = zero_copy
        self._scan_skip = self._scan_backoff = 0

    def check(self, req) -> tuple[int, str]:
        """(errno, reason) refusing ``req`` before it runs, or (0, "")."""
        allowed = _ALLOWED_FLAGS.get(req.type)
        if allowed is None:
            return Errno.EINVAL, "unknown command"
        if req.flags & ~allowed:
            return Errno.EINVAL, f"flags {req.flags:#x} are not valid for this command"
        if req.type in _RANGELESS:
            return 0, ""
        if req.type in _WRITING and self.read_only:
            return Errno.EPERM, "the export is read-only"
        if req.type == _BLOCK_STATUS and not self.contexts:
            return Errno.EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return Errno.EINVAL, "zero length"
        if req.type in _DATA_CARRYING and req.length > MAX_REQUEST_SIZE:
            return Errno.EINVAL, f"longer than the {MAX_REQUEST_SIZE} byte maximum"
        if req.offset + req.length > self.backend.size:
            past_end = Errno.ENOSPC if req.type in _GROWING else Errno.EINVAL
            return past_end, "beyond the end of the export"
        return 0, ""

    def run_checked(self, req) -> bool:
        """Check a request without payload, then run it or refuse it.

        False when the client said goodbye (DISC): nothing more is to be read.
        """
        error, reason = self.check(req)
        if error:
            self.refuse(req, error, reason)
            return True
        if req.type == _DISC:
            self.stats.requests += 1
            return False
        self.run(req, None)
        return True

    def run(self, req, payload) -> None:
        """Run a checked request; a failure becomes an error reply, never a close."""
        self.stats.requests += 1
        if req.type in _WRITING:
            # READ replies still waiting in the file must not see this write
            self.replies.materialize_files()
        try:
            self._COMMANDS[req.type](self, req, payload)
        except (QcownbdError, OSError) as exc:
            self._failed(req, exc)
        except Exception as exc:  # a backend bug must not take the server down
            self.log.log(logging.ERROR, "internal error", "%s: %s failed", self.peer,
                         Cmd(req.type).name, exc_info=True)
            self._failed(req, exc)

    def refuse(self, req, error: int, reason: str) -> None:
        """Answer a request that will not run (its checks failed) with ``error``."""
        self.stats.requests += 1
        self._reply_error(req, error, reason, reason)

    def _failed(self, req, exc: BaseException) -> None:
        self._reply_error(req, protocol.nbd_error_code(exc, req.flags),
                          protocol.client_message(exc), str(exc))

    def _reply_error(self, req, error: int, public: str, detail: str) -> None:
        """Answer ``req`` with an NBD errno; the client reads ``public``, the log ``detail``."""
        self.stats.errors += 1
        name = Cmd(req.type).name if req.type in _COMMAND_NAMES else "unknown command"
        reason = Errno(error).name if error in _ERRNO_NAMES else str(error)
        self.log.log(logging.INFO, f"{name} {reason}", "%s: %s at %d+%d: %s (%s)", self.peer,
                     name if req.type in _COMMAND_NAMES else f"command {req.type}",
                     req.offset, req.length, reason, detail)
        self.replies.send((protocol.error_reply(self.mode, req.cookie, req.offset, error,
                                                public),))

    def stop(self) -> None:
        """The client is gone: nothing waits for answers any more."""
        self.stopped = True

    def send(self, *parts) -> None:
        """Queue reply bytes; big data buffers go out without being joined."""
        self.replies.send(parts)

    def _done(self, req) -> None:
        self.send(protocol.done_reply(self.mode, req.cookie, req.offset))

    def _done_durably(self, req) -> None:
        if req.flags & _FUA:
            self._flush_then_reply(req)
        else:
            self._done(req)

    def _flush_then_reply(self, req) -> None:
        # the flush blocks on fdatasync: a worker thread keeps the loop serving
        self.inflight += 1
        self._offload(self.backend.flush, lambda fut: self._flushed(req, fut))

    def _flushed(self, req, future) -> None:
        self.inflight -= 1
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self.log.log(logging.WARNING, "flush failed", "%s: flush failed: %s", self.peer, exc)
            self._failed(req, exc)
        else:
            self._done(req)
        self._on_async_done()

    def _in_pieces(self, req, piece) -> None:
        """Run ``piece(offset, length)`` over the request's range, `PIECE_BLOCKS` blocks
        at a time, yielding the event loop every `TIME_SLICE`; then answer the request.

        Until it is answered the dispatcher is ``busy``: the connection starts
        nothing after it, so requests still take effect in arrival order.
        """
        position, end = req.offset, req.offset + req.length
        piece_length = PIECE_BLOCKS * self.backend.preferred_block_size

        def run_slice() -> None:
            nonlocal position
            deadline = perf_counter() + TIME_SLICE
            try:
                while position < end and not self.stopped:
                    step = min(piece_length, end - position)
                    piece(position, step)
                    position += step
                    if position < end and perf_counter() > deadline:
                        self.busy = True
                        self._defer(run_slice)
                        return
            except (QcownbdError, OSError) as exc:
                self._failed(req, exc)
            else:
                self._done_durably(req)
            if self.busy:
                self.busy = False
                self._on_async_done()

        run_slice()

    # ------------------------------------------------------------- commands

    def _cmd_read(self, req, _payload) -> None:
        offset, length = req.offset, req.length
        if self.mode == _SIMPLE:
            self._read_one_run(protocol.simple_reply(req.cookie), offset, length)
            return
        runs = [(offset, length, False)]
        if length >= READ_HOLE_SCAN_MIN and not req.flags & _DF:
            if self._scan_skip:
                self._scan_skip -= 1
            else:
                runs = self._read_runs(offset, length)
                # block status can cost more than it saves (SEEK_DATA on tmpfs):
                # after fruitless scans, scan exponentially more rarely
                self._scan_backoff = 0 if len(runs) > 1 else min(2 * self._scan_backoff + 1, 64)
                self._scan_skip = self._scan_backoff
        if len(runs) == 1 and not runs[0][2]:
            self._read_one_run(protocol.offset_data_header(self.mode, req.cookie, offset, offset,
                                                           length, True), offset, length)
            return
        # read everything first: an error then means one error chunk, no partial data
        # (runs stored as-is in a file are sent from it, by sendfile, in their turn)
        chunks = []
        for run_offset, run_length, zero in runs:
            data = None
            if not zero:
                data = self._file_range(run_offset, run_length)
                if data is None:
                    data = self.replies.lend(run_length)
                    self.backend.read_into(run_offset, data)
            chunks.append((run_offset, run_length, data))
        self.stats.bytes_read += length
        last = len(chunks) - 1
        for index, (run_offset, run_length, data) in enumerate(chunks):
            if data is None:
                self.send(protocol.offset_hole_chunk(self.mode, req.cookie, offset,
                                                     run_offset, run_length, index == last))
                continue
            header = protocol.offset_data_header(self.mode, req.cookie, offset, run_offset,
                                                 run_length, index == last)
            if type(data) is tuple:
                self.replies.send_file(header, data[0], data[1], run_length)
            else:
                self.send(header, data)

    def _read_one_run(self, header, offset: int, length: int) -> None:
        """Answer a READ of one data run: ``header``, then the bytes (sendfile if it can)."""
        if self._send_file_range(header, offset, length):
            return
        data = self.replies.lend(length)
        self.backend.read_into(offset, data)
        self.stats.bytes_read += length
        self.send(header, data)

    def _send_file_range(self, header, offset: int, length: int) -> bool:
        """Answer a one-run READ with ``header`` and the image file's own bytes, sent by
        sendfile in their turn; False when that cannot be done (a copy is then sent)."""
        where = self._file_range(offset, length)
        if where is None:
            return False
        self.replies.send_file(header, where[0], where[1], length)
        self.stats.bytes_read += length
        return True

    def _file_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) of a range worth sending by sendfile, else None."""
        if length < SENDFILE_MIN or not self._zero_copy or not self.replies.direct:
            return None
        return self.backend.host_range(offset, length)

    def _read_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Split a read into (offset, length, zero) runs worth sending as holes or data;
        what the time slice left unexamined is data."""
        runs: list[list] = []
        end = offset + length
        for extent in self._extents(offset, length, MAX_STATUS_EXTENTS):
            zero = extent.zero and extent.length >= HOLE_CHUNK_MIN
            if runs and runs[-1][2] == zero:
                runs[-1][1] += extent.length
            else:
                runs.append([offset, extent.length, zero])
            offset += extent.length
        if offset < end:
            if runs[-1][2]:
                runs.append([offset, end - offset, False])
            else:
                runs[-1][1] += end - offset
        return [(start, size, zero) for start, size, zero in runs]

    def _extents(self, offset: int, length: int, limit: int):
        """Backend extents from ``offset``: up to ``limit`` of them, covering at most
        ``length``; fewer when the time slice is over (at least one)."""
        extents = []
        end = offset + length
        deadline = perf_counter() + TIME_SLICE
        while offset < end and len(extents) < limit:
            got = self.backend.block_status(offset, end - offset)
            if not got or any(extent.length <= 0 for extent in got):
                raise ImageIOError(host_errno.EIO, "backend returned no extent")
            for extent in got:
                extents.append(extent)
                offset += extent.length
            if perf_counter() > deadline:
                break   # the spec lets a reply cover less than was asked
        return extents

    def _cmd_write(self, req, payload) -> None:
        self.backend.write(req.offset, payload)
        self.stats.bytes_written += req.length
        self._done_durably(req)

    def _cmd_flush(self, req, _payload) -> None:
        self._flush_then_reply(req)

    def _cmd_trim(self, req, _payload) -> None:
        self._in_pieces(req, self.backend.trim)

    def _cmd_cache(self, req, _payload) -> None:
        # answered with _done_durably like the others: CACHE has no FUA flag to honour
        self._in_pieces(req, self.backend.cache)

    def _cmd_write_zeroes(self, req, _payload) -> None:
        fast = bool(req.flags & _FAST_ZERO)
        if fast and not self.backend.can_fast_zero:
            raise ImageIOError(host_errno.ENOTSUP, "fast zeroing is not possible here")
        may_trim = not req.flags & _NO_HOLE
        self._in_pieces(req, lambda offset, length: self.backend.write_zeroes(
            offset, length, may_trim=may_trim, fast=fast))

    def _cmd_block_status(self, req, _payload) -> None:
        one = bool(req.flags & _REQ_ONE)
        extents = self._extents(req.offset, req.length, 1 if one else MAX_STATUS_EXTENTS)
        ids = sorted(self.contexts)
        for index, ctx_id in enumerate(ids):
            descriptors = protocol.status_descriptors(extents, self.contexts[ctx_id])
            if one:
                descriptors = descriptors[:1]
            self.send(protocol.block_status_chunk(self.mode, req.cookie, req.offset, ctx_id,
                                                  descriptors, index == len(ids) - 1))

    _COMMANDS = {
        Cmd.READ: _cmd_read,
        Cmd.WRITE: _cmd_write,
        Cmd.FLUSH: _cmd_flush,
        Cmd.TRIM: _cmd_trim,
        Cmd.CACHE: _cmd_cache,
        Cmd.WRITE_ZEROES: _cmd_write_zeroes,
        Cmd.BLOCK_STATUS: _cmd_block_status,
    }
