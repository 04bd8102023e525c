"""One NBD client connection: asyncio callbacks, flow control, timers and TLS.

The `RequestReader` frames the bytes the transport receives (straight into
its buffers: a `BufferedProtocol`), `Negotiation` answers options, the
`Dispatcher` runs requests and the `ReplyWriter` sends the replies of a
batch at once: bytes, events, backend calls, replies.  The connection
decides when to read: it stops pulling events, and pauses the transport,
for the reasons in ``paused`` (PAUSE_*), and ends a payload that makes no
progress for ``payload_timeout``.  After the ACK to NBD_OPT_STARTTLS, TLS
wraps this same protocol object (nothing is buffered: the client waits).
"""

import asyncio
import enum
import logging
from time import perf_counter

from qcownbd.access import PeerExports, client_from_peername
from qcownbd.errors import ProtocolError, QcownbdError
from qcownbd.nbd import protocol
from qcownbd.nbd.dispatch import TIME_SLICE, ConnectionStats, Dispatcher
from qcownbd.nbd.flow import (PAUSE_BACKLOG, PAUSE_BUDGET, PAUSE_BUSY, PAUSE_FROZEN,
                              PAUSE_INFLIGHT, PayloadReception)
from qcownbd.nbd.negotiation import MAX_OPTION_PAYLOAD, Action, Negotiation
from qcownbd.nbd.reader import (
    ClientFlags, Option, OversizedOption, Payload, PayloadNeeded, RequestReader, Violation,
)
from qcownbd.nbd.replies import ReplyWriter
from qcownbd.nbd.tls import peer_subject, start_server_tls

log = logging.getLogger("qcownbd.nbd")

#: reply bytes unsent before reading stops (and resumes below the low mark)
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024
#: the same while negotiating: option replies are small, and many connections
#: may be negotiating at once
HANDSHAKE_HIGH_WATER = 64 * 1024
HANDSHAKE_LOW_WATER = 16 * 1024


class Phase(enum.Enum):
    """The life of a connection: down this list (TLS returns to NEGOTIATING)."""

    NEGOTIATING = "negotiating"
    STARTING_TLS = "starting TLS"
    TRANSMITTING = "transmitting"
    CLOSING = "closing"         # no more requests: answer what is in flight, then close
    CLOSED = "closed"




class NbdConnection(PayloadReception, asyncio.BufferedProtocol):
    """The protocol object of one client (handshake, then transmission).

    ``server`` is the `NbdServer`: ``exports``, the timeouts, ``tls`` and
    ``tls_context``, the server-wide ``payloads`` budget and ``buffers`` pool,
    ``zero_copy``, ``offload``, and ``register``/``negotiated``/``unregister``.
    """

    def __init__(self, server, resume=None, tag=None):
        self.server = server
        #: a `handover.ConnectionState` to go on from, in transmission (no greeting),
        #: or a `handover.NegotiatingState`, negotiating
        self._resume = resume
        #: what the parent of a worker calls this connection (it counts it until it ends)
        self.tag = tag
        #: a live handover waits for this connection's next request boundary
        self.holding = False
        self.phase = Phase.NEGOTIATING
        self.paused = 0
        self.stats = ConnectionStats()
        self.client = None              # who it is (access.Client)
        self.export = None
        self.session = None             # what negotiation agreed, from transmission on
        self.transport = None
        self.reader = RequestReader(MAX_OPTION_PAYLOAD)
        self.negotiation = None
        self.dispatcher = None
        self.replies = None             # ReplyWriter, from the start of transmission
        self._plain_transport = None    # the socket's own transport (replaced by TLS)
        self._reading = True            # whether the transport reads
        self._processing = False        # guards against re-entering _process
        self._eof = False               # the client sent everything it will send
        self._continue_pending = False  # a later turn of _process is scheduled
        self._timer = None              # handshake deadline, or a stalled payload's check
        self._tls_task = None           # the TLS handshake (referenced while it runs)
        self._export_released = False

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport):
        """Greet the client and start the handshake's clock."""
        self.transport = self._plain_transport = transport
        self.client = client_from_peername(transport.get_extra_info("peername"))
        if not self.server.register(self):
            self.server.log.log(logging.WARNING, "connection limit",
                                "%s: not attached: too many connections", self.client.label)
            self.phase = Phase.CLOSED
            self.server.not_admitted(self)
            transport.abort()
            return
        if self._resume is not None:
            if self._resume.negotiating:
                self._resume_negotiation(self._resume)
            else:
                self._resume_transmission(self._resume)
            return
        self._start_handshake_clock()
        self.negotiation = Negotiation(PeerExports(self.server.exports, self.client),
                                       self.server.tls)
        transport.write(protocol.greeting())

    def _start_handshake_clock(self):
        self.transport.set_write_buffer_limits(HANDSHAKE_HIGH_WATER, HANDSHAKE_LOW_WATER)
        self._timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self.abort, "handshake timed out")

    def _resume_negotiation(self, state):
        """Go on negotiating where the server that handed us the connection stopped:
        at the option naming the export (`handover.NegotiatingState`)."""
        self._resume = None
        self._start_handshake_clock()
        self.negotiation = state.negotiation(PeerExports(self.server.exports, self.client),
                                             self.server.tls)
        self.reader.start_options()
        self.reader.preload(state.leftover)
        self._process()

    def hand_off(self):
        """The server passed the socket on (to a worker): forget it here without a
        word to the client (closing our descriptor leaves the connection open)."""
        self.phase = Phase.CLOSED
        self.reader.stop()
        self._cancel_timer()
        self.server.handed_off(self)
        self.transport.abort()

    def connection_lost(self, exc):
        """Release the export and write the connection's last log line."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.reader.stop()
        self._cancel_timer()
        self._drop_payload()
        self.server.payloads.forget(self)
        if self.replies is not None:
            self.replies.discard()
            self.dispatcher.stop()
        if not self.server.unregister(self):
            return
        self._release_export()
        if self.export is not None:
            log.info("%s: closed export=%s %s", self.client.label, self.export.name, self.stats)
        else:
            level, kind, why = self.negotiation.unattached()
            self.server.log.log(level, kind, "%s: not attached: %s", self.client.label, why)

    def _release_export(self):
        # a flush in a worker, or a request in pieces, keeps the export (and its backend) open
        dispatcher = self.dispatcher
        if dispatcher is not None and (dispatcher.inflight or dispatcher.busy):
            return
        if self.export is not None and not self._export_released:
            self._export_released = True
            self.export.detach()

    def eof_received(self):
        """The client stopped sending: answer what it sent, then close."""
        self._eof = True
        if self.phase is not Phase.TRANSMITTING and self.phase is not Phase.CLOSING:
            return False
        # keep the transport open: requests still buffered, and flushes in
        # flight, are answered before the connection closes (a TLS transport
        # closes regardless: asyncio's SSL layer has no half-close)
        self._process()
        return self.transport is self._plain_transport

    def shutdown(self):
        """Server stop: take no new requests, close once in-flight ones are answered."""
        if self.phase is Phase.TRANSMITTING:
            self._closing()
        elif self.phase is not Phase.CLOSED and self.phase is not Phase.CLOSING:
            self.transport.close()

    def abort(self, reason: str, send_queued: bool = False, kind: str = ""):
        """Close at once (``send_queued``: after the replies already queued); the log
        line's ``kind`` (default: the reason itself) is what its rate limit counts."""
        if self.phase is Phase.CLOSED:
            return
        if self.export is None:     # said in the one line of a connection that never attached
            self.negotiation.refuse(kind or reason, reason)
        else:
            self.server.log.log(logging.WARNING, kind or reason, "%s: %s; closing",
                                self.client.label, reason)
        self.reader.stop()
        self._cancel_timer()
        if self.phase is Phase.TRANSMITTING:
            self.phase = Phase.CLOSING
        if send_queued:
            self._hand_over_replies()
            self.transport.close()
        else:
            self.transport.abort()

    def _closing(self):
        """Read no more requests; close once those in flight are answered."""
        self.phase = Phase.CLOSING
        self.reader.stop()
        self._drop_payload()
        self._maybe_close()

    def _maybe_close(self):
        dispatcher = self.dispatcher
        if self.phase is Phase.CLOSING and not dispatcher.inflight and not dispatcher.busy:
            # close() still sends what is queued, then ends the connection
            self._hand_over_replies()
            self.transport.close()

    def _hand_over_replies(self):
        if self.replies is not None:
            self.replies.hand_over()

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---------------------------------------------------------- flow control

    def pause_writing(self):
        """The transport holds too many reply bytes: stop reading requests."""
        if self.replies is not None and self.replies.direct:
            self.replies.transport_paused()
        else:
            self._pause(PAUSE_BACKLOG)

    def resume_writing(self):
        """The client caught up: read requests again."""
        if self.replies is not None and self.replies.direct:
            self.replies.transport_resumed()
        else:
            self._unpause(PAUSE_BACKLOG)

    def _reply_broken(self, reason: str):
        """A queued reply cannot be completed (its data could not be read)."""
        self.abort(reason, kind="reply data unreadable")

    def _reply_backlog(self, high: bool):
        """The reply writer's backlog crossed a water mark (direct writes)."""
        (self._pause if high else self._unpause)(PAUSE_BACKLOG)

    def _pause(self, reason: int):
        self.paused |= reason
        self._update_reading()

    def _unpause(self, reason: int):
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused:
            self._process()     # what waited in the buffer (it updates reading)

    def _update_reading(self):
        """Read while nothing pauses us and the reader has room."""
        reading = not (self.paused or self._eof or self.reader.full)
        if reading != self._reading and self.phase is not Phase.CLOSED \
                and not self.transport.is_closing():
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def request_done(self):
        """A request that was in flight (a flush) or running in pieces finished."""
        dispatcher = self.dispatcher
        if self.phase is Phase.CLOSED:
            self._release_export()
            return
        if not dispatcher.busy:
            self._unpause(PAUSE_BUSY)
        if dispatcher.inflight < Dispatcher.MAX_INFLIGHT:
            self._unpause(PAUSE_INFLIGHT)
        self._maybe_close()

    def freeze(self):
        """Run no request until `thaw` (the export's image is being switched); those
        running finish, and READ replies that would send from its file read it now."""
        self._pause(PAUSE_FROZEN)
        self.replies.materialize_files()

    @property
    def settled(self) -> bool:
        """Nothing of this connection runs against the export's image (frozen ones)."""
        return not (self.dispatcher.inflight or self.dispatcher.busy)

    def thaw(self):
        """Go on, with whatever image the export has now."""
        self.dispatcher.backend = self.export.backend
        self._unpause(PAUSE_FROZEN)

    def hold(self):
        """A live handover: run no request after the one being received (a WRITE whose
        payload is arriving completes and runs), stop reading, and send every reply."""
        self.holding = True
        self.replies.materialize_files()
        self._process()

    @property
    def held(self) -> bool:
        """Held at a request boundary with nothing running and every reply sent: the
        socket and `handover.state_of` are all a successor needs."""
        return (self.paused & PAUSE_FROZEN and self.phase is Phase.TRANSMITTING
                and self.settled and self.replies.idle
                and not self.transport.get_write_buffer_size())

    def release(self):
        """The handover failed: go on serving (with the export's backend as it is now)."""
        self.holding = False
        self.thaw()

    def budget_available(self):
        """PayloadBudget: bytes were released; try the waiting request again."""
        # called back later: the refusal that queued us may not have paused us yet
        if self.phase is not Phase.CLOSED:
            asyncio.get_running_loop().call_soon(self._unpause, PAUSE_BUDGET)

    # -------------------------------------------------------------- reading

    def get_buffer(self, sizehint):
        """Where the next received bytes go (the reader decides)."""
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes):
        """Account for received bytes and act on them (unless a turn is pending anyway)."""
        self.reader.received(nbytes)
        if self._continue_pending:
            self._update_reading()
        else:
            self._process()

    def _process(self):
        """Act on every event the reader has, as far as nothing pauses us."""
        if self._processing:
            return
        self._processing = True
        try:
            if self.phase is Phase.NEGOTIATING:
                self._negotiate()
            if self.phase is Phase.TRANSMITTING:
                self._transmit()
        except ProtocolError as exc:
            self.abort(str(exc), kind="protocol violation")
        finally:
            self._processing = False
        self._update_reading()

    # ------------------------------------------------------------ handshake

    def _negotiate(self):
        reader, negotiation = self.reader, self.negotiation
        while not self.paused and self.phase is Phase.NEGOTIATING:
            event = reader.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is Option:
                router = self.server.router
                if router is not None and router.forward(self, event.option, event.payload):
                    return
                self._act(negotiation.option(event.option, event.payload), event)
            elif kind is OversizedOption:
                result = negotiation.oversized(event.option, event.length)
                if result.action is Action.CONTINUE:
                    reader.skip(event.length)
                self._act(result)
            elif kind is ClientFlags:
                negotiation.client_flags(event.data)
            else:
                self.abort(event.reason, kind="protocol violation")

    def _act(self, result, event=None):
        """Send an option's replies and take the step the negotiation chose."""
        self.transport.writelines(result.replies)
        if result.action is Action.WAIT:
            # an export opens in a worker thread: nothing is read meanwhile
            self._pause(PAUSE_BUSY)
            loop = asyncio.get_running_loop()
            result.pending.add_done_callback(
                lambda _done: loop.call_soon_threadsafe(self._ask_again, event))
        elif result.action is Action.CLOSE:
            self.phase = Phase.CLOSING
            self._cancel_timer()
            self.transport.close()
        elif result.action is Action.TRANSMIT:
            self._start_transmission(result.export)
        elif result.action is Action.STARTTLS:
            if self.reader.buffered:
                # bytes sent before the TLS handshake must never pass as sent through it
                raise ProtocolError("data after STARTTLS before the TLS handshake")
            self.phase = Phase.STARTING_TLS
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())

    def _ask_again(self, event):
        if self.phase is Phase.NEGOTIATING:
            self.paused &= ~PAUSE_BUSY
            self._act(self.negotiation.option(event.option, event.payload), event)
            self._process()     # what arrived meanwhile (unless it waits again)

    async def _start_tls(self):
        raw = self.transport
        tls, failure = await start_server_tls(raw, self, self.server.tls_context)
        if tls is None:
            self.abort(f"TLS handshake failed: {failure}", kind="TLS handshake failed")
            # asyncio does not report a connection lost during the TLS handshake
            self.connection_lost(None)
            return
        if self.phase is not Phase.STARTING_TLS:
            tls.abort()
            return
        self.transport = tls
        tls.set_write_buffer_limits(HANDSHAKE_HIGH_WATER, HANDSHAKE_LOW_WATER)
        self.client.certificate = peer_subject(tls) or None
        log.info("%s: TLS %s%s", self.client.label, tls.get_extra_info("cipher")[0],
                 f", client {self.client.certificate}" if self.client.certificate else "")
        # the spec: option haggling starts over, nothing agreed before TLS holds
        self.negotiation = self.negotiation.restarted_over_tls()
        self.reader.start_options()
        self.phase = Phase.NEGOTIATING
        self._process()

    def _start_transmission(self, export):
        self._cancel_timer()
        self.server.negotiated(self)
        export.attach()
        self.export = export
        self.session = session = self.negotiation.session(export)
        self._enter_transmission(export, session)
        log.info("%s: attached export=%s %s", self.client.label, export.name,
                 session.summary(export.read_only))

    def _resume_transmission(self, state):
        """Go on with a connection a previous server handed over (`handover`)."""
        self._resume = None
        try:
            export = self.server.exports.lookup(state.session.export_name, self.client)
        except QcownbdError as exc:
            log.error("%s: not resumed: %s", state.client, exc)
            self.phase = Phase.CLOSED
            self.server.unregister(self)
            self.transport.abort()
            return
        self.server.negotiated(self)
        export.attach()
        self.export, self.session = export, state.session
        stats = self.stats
        stats.started -= state.seconds
        stats.requests, stats.bytes_read = state.requests, state.bytes_read
        stats.bytes_written, stats.errors = state.bytes_written, state.errors
        self._enter_transmission(export, state.session)
        self.reader.preload(state.leftover)
        log.info("%s: resumed export=%s %s", self.client.label, export.name,
                 state.session.summary(export.read_only))
        self._process()

    def _enter_transmission(self, export, session):
        self.reader.start_transmission(session.mode)
        transport = self.transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.replies = ReplyWriter(transport, self._reply_backlog, WRITE_HIGH_WATER,
                                   WRITE_LOW_WATER, plain=transport is self._plain_transport,
                                   pool=self.server.buffers, on_broken=self._reply_broken)
        self.dispatcher = Dispatcher(export, session, self.replies, self.stats, self.client.label,
                                     offload=self.server.offload,
                                     defer=asyncio.get_running_loop().call_soon,
                                     on_async_done=self.request_done, log=self.server.log,
                                     zero_copy=self.server.zero_copy)
        self.phase = Phase.TRANSMITTING

    # --------------------------------------------------------- transmission

    def _transmit(self):
        reader, dispatcher, replies = self.reader, self.dispatcher, self.replies
        transmitting = Phase.TRANSMITTING
        # a long pipeline is taken in turns of TIME_SLICE, so that the other clients'
        # requests are served in between
        deadline = perf_counter() + TIME_SLICE
        # the replies of every request taken now leave together (see ReplyWriter)
        replies.corked = True
        try:
            while not self.paused and self.phase is transmitting:
                if self.holding and reader.at_boundary:
                    self._pause(PAUSE_FROZEN)
                    break
                if perf_counter() > deadline:
                    self._continue_later()
                    break
                event = reader.next_event()
                if event is None:
                    if self._eof:
                        # the client sends nothing more: what it sent is all answered
                        self._closing()
                    break
                kind = type(event)
                if kind is PayloadNeeded:
                    self._payload_needed(event.request)
                elif kind is Payload:
                    self._payload_received(event)
                elif kind is Violation:
                    self.abort(event.reason, kind="protocol violation")
                elif not dispatcher.run_checked(event):
                    self._closing()     # DISC: what is in flight is still answered
                if dispatcher.busy:
                    self._pause(PAUSE_BUSY)
                if dispatcher.inflight >= Dispatcher.MAX_INFLIGHT:
                    self._pause(PAUSE_INFLIGHT)
        finally:
            replies.corked = False
            replies.flush()
        self._maybe_close()

    def _continue_later(self):
        """Take the rest of the pipeline in a later turn of the loop (one turn pending
        at most: every received byte calls `_process` too)."""
        if not self._continue_pending:
            self._continue_pending = True
            asyncio.get_running_loop().call_soon(self._continue)

    def _continue(self):
        self._continue_pending = False
        self._process()
