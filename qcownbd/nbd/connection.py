"""One NBD client connection: bytes from the socket to backend calls and back.

A `BufferedProtocol`: the transport receives straight into our buffers (a
fixed receive buffer for headers and small payloads, a pooled buffer for a
large WRITE payload), each `buffer_updated` parses every complete request it
holds, and the replies of that whole batch leave together through the
`ReplyWriter` (one writev, or sendfile for large reads; see `output`).
Backend calls run in the loop thread (the `Backend` contract) except
flushes, which go to a worker thread; so requests are executed in arrival
order and overlapping writes land in that order, while replies to flushes
come back whenever they finish.

Memory is bounded: when more than the high-water mark of reply bytes is
unsent, or too many flushes are in flight, reading stops until the client
catches up.  Large WRITE payloads still being received share one
server-wide budget (`PayloadBudget`): past it, a connection stops reading
until another payload completes, and a payload that makes no progress for
the server's ``payload_timeout`` seconds ends its connection.

TLS slots in at negotiation: after the ACK to NBD_OPT_STARTTLS,
``loop.start_tls(self.transport, self, context, server_side=True)`` gives a
new transport for this same protocol object (the receive buffer is empty at
that point, since the client waits for the ACK) and options start again.
"""

import asyncio
import logging
import ssl
import time

from qcownbd.access import PeerExports, peer_address
from qcownbd.errors import ProtocolError
from qcownbd.nbd import protocol
from qcownbd.nbd.commands import CommandRunner
from qcownbd.nbd.constants import MAX_REQUEST_SIZE, Cmd, CmdFlag, Errno
from qcownbd.nbd.negotiation import MAX_OPTION_PAYLOAD, Action, Negotiation
from qcownbd.nbd.output import POOL, ReplyWriter
from qcownbd.nbd.protocol import ReplyMode
from qcownbd.nbd.tls import peer_subject

log = logging.getLogger("qcownbd.nbd")

RECV_BUFFER = 512 * 1024
#: after a WRITE payload this long the next receive takes just one request header,
#: so that the next large payload lands in its own buffer instead of half in the
#: receive buffer (from where it would have to be copied)
LARGE_PAYLOAD = RECV_BUFFER // 2
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024
#: READ bytes one batch answers before its replies are sent (and counted in the
#: backlog, which pauses reading): a long pipeline of reads cannot pile up
#: replies.  A BLOCK_STATUS reply (up to 16384 descriptors a context) is sent at once.
BATCH_REPLY_BYTES = 1024 * 1024
#: an oversized WRITE payload up to this size is read and thrown away; above it we close
MAX_DISCARD = 2 * MAX_REQUEST_SIZE
#: bytes of partly received WRITE payloads all connections may hold at once
PAYLOAD_BUDGET = 128 * 1024 * 1024
_CLIENT_FLAGS_SIZE = 4
_OPTION_HEADER_SIZE = protocol.OPTION_HEADER.size
_COMMAND_NAMES = set(Cmd)
_READ, _WRITE, _BLOCK_STATUS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.BLOCK_STATUS)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_EXTENDED = ReplyMode.EXTENDED
_ERRNO_NAMES = set(Errno)


class ConnectionStats:
    """Counters for the one log line written when a connection ends."""

    __slots__ = ("started", "requests", "bytes_read", "bytes_written", "errors")

    def __init__(self):
        self.started = time.monotonic()
        self.requests = self.bytes_read = self.bytes_written = self.errors = 0


class PayloadBudget:
    """Server-wide bound on the memory of WRITE payloads still being received.

    A payload too large for the receive buffer needs a reservation; one
    payload is always granted when nothing is reserved, so any single request
    can proceed.  Refused connections wait (not reading) and are woken in
    turn when bytes are released.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiting: list = []

    def reserve(self, nbytes: int, conn) -> bool:
        """Take ``nbytes`` for ``conn``, or queue it to be woken later and say no."""
        if self.used and self.used + nbytes > self.limit:
            if conn not in self._waiting:
                self._waiting.append(conn)
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Give back a reservation and let the waiting connections try again."""
        self.used -= nbytes
        waiting, self._waiting = self._waiting, []
        for conn in waiting:
            conn.budget_available()

    def forget(self, conn) -> None:
        """A waiting connection went away."""
        if conn in self._waiting:
            self._waiting.remove(conn)


PAYLOADS = PayloadBudget(PAYLOAD_BUDGET)


class NbdConnection(CommandRunner, asyncio.BufferedProtocol):
    """The protocol object of one client (handshake, then transmission).

    ``hub`` is the server: ``exports`` (lookup/listing), ``handshake_timeout``,
    ``payload_timeout``,
    ``tls`` (off/on/require), ``tls_context``, ``register(conn) -> bool``,
    ``negotiated(conn)`` and ``unregister(conn)``.
    """

    def __init__(self, hub):
        super().__init__()
        self.hub = hub
        self.stats = ConnectionStats()
        self.peer = "?"
        self.address = None             # client IP address (None: Unix socket)
        self.export = None
        self.transport = None
        self._plain_transport = None    # the socket's own transport (replaced by TLS)
        self.replies = None             # ReplyWriter, from the start of transmission
        self.mode = ReplyMode.SIMPLE
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._payload = None            # memoryview receiving a large WRITE payload
        self._payload_got = 0
        self._payload_req = None
        self._payload_timer = None      # closes the connection if the payload stalls
        self._payload_seen = 0          # _payload_got when the stall timer last looked
        self._budget_wait = False       # waiting for PAYLOADS to admit a large payload
        self._discard_left = 0          # bytes of a refused payload still to skip
        self._header_only = False       # receive one request header next (LARGE_PAYLOAD)
        self._waiter = None             # handshake coroutine waiting for bytes
        self._handshake_task = None
        self._transmitting = False
        self._closed = False
        self._write_paused = False
        self._reading_paused = False
        self._parsing = False
        self._export_released = False

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport):
        """Greet the client and start the negotiation (under a timeout)."""
        self.transport = self._plain_transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        elif peer:
            self.peer = str(peer)
        else:
            self.peer = "unix"
        self.address = peer_address(peer)
        if not self.hub.register(self):
            log.warning("%s: refused: too many connections", self.peer)
            transport.abort()
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def connection_lost(self, exc):
        """Release the export and write the connection's log line."""
        if self._closed:
            return
        self._closed = True
        if self._handshake_task and not self._handshake_task.done():
            self._handshake_task.cancel()
        self._wake()
        self._drop_payload()
        PAYLOADS.forget(self)
        if self.replies is not None:
            self.replies.discard()
        if not self.hub.unregister(self):
            return
        if not self.inflight:
            self._release_export()
        stats = self.stats
        log.info("%s: closed export=%s duration=%.1fs requests=%d read=%d written=%d errors=%d",
                 self.peer, self.export.name if self.export else "-",
                 time.monotonic() - stats.started, stats.requests, stats.bytes_read,
                 stats.bytes_written, stats.errors)

    def _release_export(self):
        # a flush still running in a worker keeps the export (and its backend) open
        if self.export is not None and not self._export_released:
            self._export_released = True
            self.export.detach()

    def eof_received(self):
        """The client stopped sending: close once pending replies are written."""
        # the transport closes now: it must hold every reply still queued
        self._hand_over_replies()
        return False

    def pause_writing(self):
        """Too many reply bytes queued: stop reading requests."""
        if self.replies is not None and self.replies.direct:
            self.replies.transport_paused()
            return
        self._write_paused = True
        self._update_reading()

    def resume_writing(self):
        """The client caught up: read requests again."""
        if self.replies is not None and self.replies.direct:
            self.replies.transport_resumed()
            return
        self._write_paused = False
        self._update_reading()

    def _reply_backlog(self, high: bool):
        """The reply writer's backlog crossed a water mark (direct writes)."""
        self._write_paused = high
        self._update_reading()

    def shutdown(self):
        """Server stop: take no new requests, close once in-flight ones are answered."""
        if not self._transmitting:
            self.transport.close()
            return
        self.disconnecting = True
        self._drop_payload()
        self._maybe_close()

    def evict(self, reason: str):
        """Drop a connection still negotiating to make room for a newer one."""
        self._abort(reason)

    def _abort(self, reason: str, send_queued: bool = False):
        log.warning("%s: %s; closing", self.peer, reason)
        self.disconnecting = True
        if send_queued:
            self._hand_over_replies()
            self.transport.close()
        else:
            self.transport.abort()

    def _hand_over_replies(self):
        if self.replies is not None:
            self.replies.hand_over()

    def _maybe_close(self):
        if self.disconnecting and not self.inflight and not self._closed:
            # close() still sends what is queued, then ends the connection
            self._hand_over_replies()
            self.transport.close()

    # -------------------------------------------------------------- reading

    def get_buffer(self, sizehint):
        """Where the next received bytes go: payload, discard area or receive buffer."""
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_got:]
        if self._discard_left:
            return self._rview[:min(self._discard_left, RECV_BUFFER)]
        if self._header_only:
            # the receive buffer was empty when this began: _rend < one header
            return self._rview[self._rend:protocol.request_size(self.mode)]
        if self._rend == RECV_BUFFER:
            kept = self._rend - self._rstart
            self._rbuf[:kept] = self._rview[self._rstart:self._rend]
            self._rstart, self._rend = 0, kept
        return self._rview[self._rend:]

    def buffer_updated(self, nbytes):
        """Account for received bytes and act on them."""
        if self._payload is not None:
            self._payload_got += nbytes
            if self._payload_got < len(self._payload):
                return
            req, payload = self._payload_req, self._payload
            self._drop_payload()
            self._header_only = len(payload) >= LARGE_PAYLOAD
            self.execute(req, payload)
        elif self._discard_left:
            self._discard_left -= nbytes
            if self._discard_left:
                return
        else:
            self._rend += nbytes
            if self._header_only and self._rend >= protocol.request_size(self.mode):
                self._header_only = False
            if self.disconnecting:
                # after DISC or during shutdown nothing more is read: drop it
                self._rstart = self._rend = 0
                return
            if not self._transmitting:
                self._handshake_received()
                return
        self._process()

    def _update_reading(self):
        if not self._transmitting or self._closed:
            return
        pause = (self._write_paused or self._budget_wait
                 or self.inflight >= self.MAX_INFLIGHT)
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self._process()
            if not self._reading_paused and not self.disconnecting:
                self.transport.resume_reading()

    def _process(self):
        if self._parsing or self._closed:
            return
        self._parsing = True
        replies = self.replies
        if replies is not None:
            # the replies of every request parsed now leave in one writev
            replies.corked = True
        try:
            self._parse_requests()
        except ProtocolError as exc:
            self._abort(str(exc))
        finally:
            self._parsing = False
            if replies is not None:
                replies.corked = False
                replies.flush()

    def _parse_requests(self):
        """Execute every complete request in the receive buffer."""
        view, mode = self._rview, self.mode
        hsize = protocol.request_size(mode)
        pos, end = self._rstart, self._rend
        promised = 0
        while end - pos >= hsize and not (self._reading_paused or self.disconnecting):
            req = protocol.parse_request(view, pos, mode)
            pos += hsize
            self.stats.requests += 1
            if not self._carries_payload(req):
                self.execute_checked(req, None)
                if req.type == _READ:
                    promised += req.length
                elif req.type == _BLOCK_STATUS:
                    promised = BATCH_REPLY_BYTES    # up to 16384 descriptors per context
                if promised >= BATCH_REPLY_BYTES:
                    promised = 0
                    self.replies.flush()    # may pause reading: the loop then stops
                continue
            have = end - pos
            error, reason = self.check(req)
            if error:
                self.reply_error(req, error, reason)
                if req.length > MAX_DISCARD:
                    self._abort(f"payload of {req.length} bytes is too big to skip",
                                send_queued=True)
                    return
                skip = min(req.length, have)
                pos += skip
                self._discard_left = req.length - skip
            elif have >= req.length:
                self.execute(req, view[pos:pos + req.length])
                pos += req.length
            elif not PAYLOADS.reserve(req.length, self):
                # parse this request again once other payloads are in
                pos -= hsize
                self.stats.requests -= 1
                self._budget_wait = True
                self._update_reading()
                break
            else:
                # the rest of the payload is received straight into its own buffer
                self._payload = memoryview(POOL.take(req.length))[:req.length]
                self._payload[:have] = view[pos:end]
                self._payload_got, self._payload_req = have, req
                self._payload_seen = have
                self._payload_timer = asyncio.get_running_loop().call_later(
                    self.hub.payload_timeout, self._check_payload_progress)
                pos = end
            if self._discard_left or self._payload is not None:
                break
        self._rstart, self._rend = (0, 0) if pos == end else (pos, end)
        self._maybe_close()

    def _drop_payload(self):
        """Forget the payload being received (complete or abandoned) and its reservation."""
        if self._payload is None:
            return
        PAYLOADS.release(len(self._payload))
        self._payload = self._payload_req = None
        self._payload_timer.cancel()
        self._payload_timer = None

    def _check_payload_progress(self):
        if self._payload is None:
            return
        if self._payload_got == self._payload_seen:
            self._abort(f"no byte of a WRITE payload for {self.hub.payload_timeout:g}s")
            return
        self._payload_seen = self._payload_got
        self._payload_timer = asyncio.get_running_loop().call_later(
            self.hub.payload_timeout, self._check_payload_progress)

    def budget_available(self):
        """PayloadBudget: bytes were released; try the waiting request again."""
        if self._budget_wait and not self._closed:
            self._budget_wait = False
            asyncio.get_running_loop().call_soon(self._update_reading)

    def recycle_payload(self, payload) -> None:
        """A WRITE payload has been written: its buffer may take the next one."""
        if payload.obj is not self._rbuf:
            POOL.give_back([payload.obj])

    def _carries_payload(self, req) -> bool:
        if req.type == _WRITE:
            return True
        return self.mode == _EXTENDED and bool(req.flags & _PAYLOAD_LEN)

    # ------------------------------------------------------------ handshake

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _handshake_received(self):
        self._wake()
        if self._rend - self._rstart >= RECV_BUFFER // 2:
            # a client racing ahead of our replies: stop until we consumed it
            self.transport.pause_reading()

    async def _recv_exactly(self, count: int) -> bytes:
        while self._rend - self._rstart < count:
            if self._closed:
                raise ConnectionResetError("client went away")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self._rview[self._rstart:self._rstart + count])
        self._rstart += count
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        if not self._closed:
            self.transport.resume_reading()
        return data

    async def _skip(self, count: int) -> None:
        while count:
            if self._rend == self._rstart:
                await self._recv_exactly(1)
                count -= 1
                continue
            step = min(count, self._rend - self._rstart)
            await self._recv_exactly(step)
            count -= step

    async def _handshake(self):
        try:
            await asyncio.wait_for(self._negotiate(), self.hub.handshake_timeout)
        except asyncio.TimeoutError:
            self._abort("handshake timed out")
        except ProtocolError as exc:
            self._abort(str(exc))
        except ConnectionError:
            pass
        except ssl.SSLError as exc:
            self._abort(f"TLS handshake failed: {exc.reason or exc}")

    async def _negotiate(self):
        exports = PeerExports(self.hub.exports, self.address, self.peer)
        negotiation = Negotiation(exports, self.hub.tls)
        self.transport.write(protocol.greeting())
        negotiation.client_flags(await self._recv_exactly(_CLIENT_FLAGS_SIZE))
        while True:
            header = await self._recv_exactly(_OPTION_HEADER_SIZE)
            option, length = protocol.parse_option_header(header)
            if length > MAX_OPTION_PAYLOAD:
                result = negotiation.oversized(option, length)
                if result.action is Action.CONTINUE:
                    await self._skip(length)
            else:
                result = negotiation.option(option, await self._recv_exactly(length))
            if self._closed:
                return
            self.transport.writelines(result.replies)
            if result.action is Action.CLOSE:
                self.transport.close()
                return
            if result.action is Action.TRANSMIT:
                self._start_transmission(negotiation, result.export)
                return
            if result.action is Action.STARTTLS:
                await self._start_tls()
                # the spec: option haggling starts over, nothing agreed before TLS holds
                negotiation = Negotiation(exports, self.hub.tls, tls_active=True,
                                          no_zeroes=negotiation.no_zeroes)

    async def _start_tls(self):
        if self._rend != self._rstart:
            # bytes sent before the TLS handshake must never pass as sent through it
            raise ProtocolError("data after STARTTLS before the TLS handshake")
        loop = asyncio.get_running_loop()
        raw = self.transport
        try:
            tls = await loop.start_tls(raw, self, self.hub.tls_context, server_side=True)
        except BaseException:
            raw.abort()
            # asyncio does not report a connection lost during the TLS handshake
            self.connection_lost(None)
            raise
        if tls is None or tls.is_closing():
            self.connection_lost(None)
            raise ConnectionResetError("client went away during the TLS handshake")
        self.transport = tls
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        subject = peer_subject(self.transport)
        log.info("%s: TLS %s%s", self.peer, self.transport.get_extra_info("cipher")[0],
                 f", client {subject}" if subject else "")

    def _start_transmission(self, negotiation, export):
        self.hub.negotiated(self)
        export.attach()
        self.export = export
        self.mode = negotiation.mode
        self.replies = ReplyWriter(self.transport, self._reply_backlog, WRITE_HIGH_WATER,
                                   WRITE_LOW_WATER, plain=self.transport is self._plain_transport,
                                   on_broken=self._abort)
        self.start_commands(export, negotiation.contexts)
        self._transmitting = True
        log.debug("%s: export %r, %s replies", self.peer, export.name, self.mode.name.lower())
        self._process()

    # -------------------------------------------------------------- replies

    def send(self, *parts):
        """Queue reply bytes; big data buffers go out without being joined."""
        if self._closed:
            return
        if self.replies is None:
            self.transport.writelines(parts)
        else:
            self.replies.send(parts)

    def reply_error(self, req, error: int, message: str = ""):
        """Answer ``req`` with an NBD errno (and say so in the log)."""
        self.stats.errors += 1
        name = Cmd(req.type).name if req.type in _COMMAND_NAMES else f"command {req.type}"
        log.info("%s: %s at %d+%d: %s (%s)", self.peer, name, req.offset, req.length,
                 Errno(error).name if error in _ERRNO_NAMES else error, message)
        self.send(protocol.error_reply(self.mode, req.cookie, req.offset, error, message))

    def request_done(self):
        """An asynchronous request finished: maybe resume reading or close."""
        if self._closed and not self.inflight:
            self._release_export()
        self._update_reading()
        self._maybe_close()

