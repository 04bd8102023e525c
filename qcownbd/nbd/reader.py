"""The bytes a client sends, framed into events, without I/O (h11's shape).

The connection hands the reader what the transport receives (`get_buffer`
and `received`, the two halves of asyncio's BufferedProtocol) and pulls
events with `next_event` whenever it is ready to act on one; a connection
that stops pulling (its client does not read its replies, say) leaves the
bytes where they are.  During the handshake the events are the client's
flags and its options; in transmission they are requests:

* a `Request` without payload, to run;
* `PayloadNeeded` for a request that carries one (WRITE): the caller takes
  the payload from the receive buffer (`payload_in_buffer`), has it received
  into a buffer of its own (`receive_payload`), or `skip`s it; until it
  decides, the same event comes back;
* `Payload` once a payload received into its own buffer is complete;
* `Violation` when the bytes are not NBD: nothing after them can be framed.

States, and what moves between them (nothing else is legal):

    CLIENT_FLAGS -> OPTIONS <-> SKIPPING
    OPTIONS -> REQUESTS (start_transmission)
    REQUESTS -> DECIDING (a request with payload) -> REQUESTS | PAYLOAD | SKIPPING
    PAYLOAD -> REQUESTS;  SKIPPING -> the state it interrupted
    any -> BROKEN (a violation) | STOPPED (stop: bytes are dropped from then on)
"""

import mmap
from enum import Enum
from typing import NamedTuple

from qcownbd.errors import ProtocolError
from qcownbd.nbd import protocol
from qcownbd.nbd.constants import Cmd, CmdFlag
from qcownbd.nbd.protocol import ReplyMode, Request

#: receive buffer in transmission: many pipelined requests (and small payloads) per read
RECV_BUFFER = 512 * 1024
#: receive buffer while negotiating: the largest option payload read whole fits
HANDSHAKE_BUFFER = 32 * 1024
#: after a payload this long the next receive takes just one request header, so that
#: the next large payload lands in its own buffer instead of half in the receive
#: buffer (from where it would have to be copied)
LARGE_PAYLOAD = RECV_BUFFER // 2
CLIENT_FLAGS_SIZE = protocol.CLIENT_FLAGS.size
OPTION_HEADER_SIZE = protocol.OPTION_HEADER.size

_WRITE = int(Cmd.WRITE)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)


class State(Enum):
    """Where the reader is in the client's byte stream (see the module docstring)."""

    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    REQUESTS = "requests"
    DECIDING = "deciding on a payload"
    PAYLOAD = "receiving a payload"
    SKIPPING = "skipping"
    BROKEN = "broken"
    STOPPED = "stopped"


class ClientFlags(NamedTuple):
    """The client's 32-bit flags word, the first thing it sends."""

    data: bytes


class Option(NamedTuple):
    """One option with its whole payload."""

    option: int
    payload: bytes


class OversizedOption(NamedTuple):
    """An option whose payload is longer than the reader holds: `skip` it or close."""

    option: int
    length: int


class PayloadNeeded(NamedTuple):
    """A request whose payload follows it; the caller decides what to do with it."""

    request: Request


class Payload(NamedTuple):
    """A request and its complete payload."""

    request: Request
    data: memoryview


class Violation(NamedTuple):
    """Bytes that break the protocol; the connection must close."""

    reason: str


class RequestReader:
    """The framing of one connection's incoming bytes (see the module docstring).

    ``max_option`` is the longest option payload delivered whole; longer
    ones come as `OversizedOption`.
    """

    def __init__(self, max_option: int, buffer_size: int = HANDSHAKE_BUFFER):
        if max_option + OPTION_HEADER_SIZE > buffer_size:
            raise ValueError("an option of max_option bytes must fit the buffer")
        self.max_option = max_option
        self.state = State.CLIENT_FLAGS
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._mode = ReplyMode.SIMPLE
        self._extended = False
        self._header_size = protocol.request_size(self._mode)
        self._header_only = False
        self._pending: Request | None = None    # DECIDING / PAYLOAD: its request
        self._payload: memoryview | None = None  # PAYLOAD: the caller's buffer
        self._got = 0                           # PAYLOAD: bytes of it received
        self._skip = 0                          # SKIPPING: bytes still to drop
        self._resume = State.OPTIONS            # SKIPPING: the state to return to

    # ----------------------------------------------------- the transport's side

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty while reading is allowed)."""
        state = self.state
        if state is State.PAYLOAD:
            return self._payload[self._got:]
        if state is State.SKIPPING:
            # nothing is buffered while skipping: the buffer is scratch space
            return self._view[:min(self._skip, len(self._buf))]
        if state is State.STOPPED or state is State.BROKEN:
            return self._view
        if self._header_only:
            return self._view[self._end:self._header_size]
        if self._end == len(self._buf) and self._start:
            kept = self._end - self._start
            self._buf[:kept] = self._view[self._start:self._end]
            self._start, self._end = 0, kept
        return self._view[self._end:]

    def received(self, nbytes: int) -> None:
        """``nbytes`` arrived in the last buffer `get_buffer` gave out."""
        state = self.state
        if state is State.PAYLOAD:
            self._got += nbytes
        elif state is State.SKIPPING:
            self._skip -= nbytes
            if not self._skip:
                self.state = self._resume
        elif state is not State.STOPPED and state is not State.BROKEN:
            self._end += nbytes
            if self._header_only and self._end >= self._header_size:
                self._header_only = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet framed."""
        return self._end - self._start

    @property
    def full(self) -> bool:
        """True when no byte more fits until events are taken (reading must pause).

        A transport must not read then: asyncio's TLS layer takes an empty buffer from
        `get_buffer` for the client's close_notify and ends the connection."""
        if self.state is State.PAYLOAD:
            return self._got == len(self._payload)
        return self._end - self._start == len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """Between requests: no request is half framed, no payload half received."""
        return self.state is State.REQUESTS

    @property
    def payload_received(self) -> int:
        """Bytes of the payload being received into its own buffer (PAYLOAD)."""
        return self._got

    # ----------------------------------------------------- the connection's side

    def next_event(self):
        """The next event, or None until more bytes arrive."""
        state = self.state
        if state is State.REQUESTS:
            if self._end - self._start < self._header_size:
                return None
            return self._request()
        if state is State.DECIDING:
            return PayloadNeeded(self._pending)
        if state is State.PAYLOAD:
            if self._got < len(self._payload):
                return None
            request, data = self._pending, self._payload
            self._pending = self._payload = None
            self.state = State.REQUESTS
            self._header_only = len(data) >= LARGE_PAYLOAD
            return Payload(request, data)
        if state is State.OPTIONS:
            return self._option()
        if state is State.CLIENT_FLAGS:
            if self._end - self._start < CLIENT_FLAGS_SIZE:
                return None
            self.state = State.OPTIONS
            return ClientFlags(self._take(CLIENT_FLAGS_SIZE))
        return None

    def _request(self):
        try:
            request = protocol.parse_request(self._view, self._start, self._mode)
        except ProtocolError as exc:
            return self._broken(str(exc))
        self._start += self._header_size
        if self._start == self._end:
            self._start = self._end = 0
        if request.type == _WRITE or (self._extended and request.flags & _PAYLOAD_LEN):
            self._pending = request
            self.state = State.DECIDING
            return PayloadNeeded(request)
        return request

    def _option(self):
        have = self._end - self._start
        if have < OPTION_HEADER_SIZE:
            return None
        try:
            option, length = protocol.parse_option_header(
                self._view[self._start:self._start + OPTION_HEADER_SIZE])
        except ProtocolError as exc:
            return self._broken(str(exc))
        if length > self.max_option:
            self._take(OPTION_HEADER_SIZE)
            return OversizedOption(option, length)
        if have < OPTION_HEADER_SIZE + length:
            return None
        self._take(OPTION_HEADER_SIZE)
        return Option(option, self._take(length))

    def _take(self, count: int) -> bytes:
        data = bytes(self._view[self._start:self._start + count])
        self._start += count
        if self._start == self._end:
            self._start = self._end = 0
        return data

    def _broken(self, reason: str) -> Violation:
        self.state = State.BROKEN
        self._start = self._end = 0
        return Violation(reason)

    def start_options(self) -> None:
        """Options start over (after STARTTLS: the client sends no new flags)."""
        self.state = State.OPTIONS

    def start_transmission(self, mode: ReplyMode) -> None:
        """Frame requests from now on: compact headers, or extended ones."""
        self._mode = mode
        self._extended = mode == ReplyMode.EXTENDED
        self._header_size = protocol.request_size(mode)
        if len(self._buf) < RECV_BUFFER:
            # requests pipelined right behind the option stay where they were
            kept = bytes(self._view[self._start:self._end])
            # pages are only taken as far as the client's pipeline reaches
            self._buf = mmap.mmap(-1, RECV_BUFFER)
            self._view = memoryview(self._buf)
            self._buf[:len(kept)] = kept
            self._start, self._end = 0, len(kept)
        self.state = State.REQUESTS

    def skip(self, count: int) -> None:
        """Drop the next ``count`` bytes: an oversized option's payload, a refused one."""
        if self.state is State.DECIDING:
            self._pending = None
            self.state = State.REQUESTS
        have = min(count, self._end - self._start)
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        if count > have:
            self._skip, self._resume = count - have, self.state
            self.state = State.SKIPPING

    def payload_in_buffer(self) -> memoryview | None:
        """DECIDING: the whole payload as a view of the receive buffer, or None when
        it has not all arrived.  The view is valid until the next `get_buffer`."""
        length = self._pending.length
        if self._end - self._start < length:
            return None
        start = self._start
        self._start += length
        if self._start == self._end:
            self._start = self._end = 0
        self._pending = None
        self.state = State.REQUESTS
        return self._view[start:start + length]

    def receive_payload(self, buffer: memoryview) -> None:
        """DECIDING: receive the payload into ``buffer`` (exactly its length)."""
        have = self._end - self._start
        buffer[:have] = self._view[self._start:self._end]
        self._start = self._end = 0
        self._payload, self._got = buffer, have
        self.state = State.PAYLOAD

    def leftover(self) -> bytes:
        """REQUESTS or OPTIONS: the bytes received but not yet framed (a live handover
        passes them on to the successor, a server to its worker, whose reader starts
        from them: `preload`)."""
        if self.state is not State.REQUESTS and self.state is not State.OPTIONS:
            raise ProtocolError(f"no request boundary: the reader is {self.state.value}")
        return bytes(self._view[self._start:self._end])

    def preload(self, data: bytes) -> None:
        """REQUESTS or OPTIONS, nothing buffered: take ``data`` as if it had just been
        received (what the previous server read of the client's stream and did not
        frame)."""
        if self.state not in (State.REQUESTS, State.OPTIONS) or self._end != self._start:
            raise ProtocolError("preload: only into an empty reader in transmission "
                                "or option haggling")
        if len(data) > len(self._buf):
            raise ProtocolError(f"preload: {len(data)} bytes do not fit the receive buffer")
        self._buf[:len(data)] = data
        self._start, self._end = 0, len(data)
        self._header_only = False

    def stop(self) -> None:
        """Frame nothing more (after DISC, or when the server stops): drop every byte."""
        self._start = self._end = 0
        self._pending = self._payload = None
        self.state = State.STOPPED
