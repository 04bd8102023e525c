"""Flow control of one connection: why it stops reading, and WRITE payloads.

`NbdConnection` stops pulling events, and pauses its transport, while any
bit of its ``paused`` is set.  A WRITE payload too big for the reader's
buffer is received into a pooled buffer of its own, once the server-wide
payload budget grants it, and ends the connection if it makes no progress
for the server's ``payload_timeout``: `PayloadReception` is that part of
the connection.
"""

import asyncio

from qcownbd.nbd.constants import MAX_REQUEST_SIZE

# Why reading is paused: bits of ``NbdConnection.paused`` (plain ints: the
# request loop tests them at every step, and an enum.Flag's truth is Python code)
PAUSE_BACKLOG = 1       # the client does not read its replies
PAUSE_BUDGET = 2        # a large payload waits for the server's payload budget
PAUSE_INFLIGHT = 4      # too many flushes in flight
PAUSE_BUSY = 8          # a long request runs in pieces, or an export opens: wait
PAUSE_FROZEN = 16       # the export's image is being switched (a live snapshot)

#: an oversized WRITE payload up to this size is read and thrown away; above it we close
MAX_DISCARD = 2 * MAX_REQUEST_SIZE


class PayloadReception:
    """The WRITE-payload part of `NbdConnection` (a mixin: it uses the connection's
    ``reader``, ``server``, ``dispatcher``, ``_timer``, ``_pause`` and ``abort``)."""

    _payload_buffer = None      # pooled buffer of a payload being received
    _payload_seen = 0           # its bytes when the stall timer last looked

    @property
    def payload_received(self) -> int:
        """Bytes of the WRITE payload being received into its own buffer."""
        return self.reader.payload_received

    def budget_revoked(self, rate: float):
        """PayloadBudget: our payload arrives too slowly while others wait for budget."""
        self._drop_payload()
        self.abort(f"WRITE payload arriving at {rate:.0f} bytes/s while others wait "
                    "for the payload budget", kind="slow WRITE payload")

    def _payload_needed(self, req):
        """A request with a payload: refuse and skip it, run it, or receive it first."""
        error, reason = self.dispatcher.check(req)
        if error:
            self.dispatcher.refuse(req, error, reason)
            if req.length > MAX_DISCARD:
                self.abort(f"payload of {req.length} bytes is too big to skip",
                            send_queued=True, kind="payload too big to skip")
            else:
                self.reader.skip(req.length)
            return
        data = self.reader.payload_in_buffer()
        if data is not None:
            self.dispatcher.run(req, data)
            return
        if not self.server.payloads.reserve(req.length, self):
            self._pause(PAUSE_BUDGET)     # this event comes again once bytes are released
            return
        buffer = self.server.buffers.take(req.length)
        self._payload_buffer = buffer
        self.reader.receive_payload(memoryview(buffer)[:req.length])
        self._payload_seen = self.reader.payload_received
        self._timer = asyncio.get_running_loop().call_later(
            self.server.payload_timeout, self._check_payload_progress)

    def _payload_received(self, event):
        buffer = self._payload_buffer
        self._drop_payload()
        self.dispatcher.run(event.request, event.data)
        # the write is done (writes never run in pieces): the buffer may take the next payload
        self.server.buffers.give_back([buffer])

    def _drop_payload(self):
        """Forget the payload being received (complete or abandoned) and its reservation."""
        if self._payload_buffer is None:
            return
        self.server.payloads.release(self)
        self._payload_buffer = None
        self._cancel_timer()

    def _check_payload_progress(self):
        received = self.reader.payload_received
        if received == self._payload_seen:
            self.abort(f"no byte of a WRITE payload for {self.server.payload_timeout:g}s",
                        kind="stalled WRITE payload")
            return
        self._payload_seen = received
        self._timer = asyncio.get_running_loop().call_later(
            self.server.payload_timeout, self._check_payload_progress)
