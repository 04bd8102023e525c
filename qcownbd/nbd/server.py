"""The listening side: sockets, the set of live connections, orderly stop.

`NbdServer` is what every `NbdConnection` talks to, and holds what they
share: the payload budget, the buffer pool, the worker threads.  It also
runs the metadata commit timer: a backend with allocations not yet
committed gets a `flush` in a worker thread every couple of seconds, so a
crash loses at most that much of what clients did not flush themselves.
"""

import asyncio
import errno
import logging
import os
import resource
import socket
import stat
import time

from qcownbd.errors import ConfigError, ControlError
from qcownbd.nbd.connection import NbdConnection, Phase
from qcownbd.nbd.dispatch import ConnectionStats
from qcownbd.nbd.replies import BufferPool
from qcownbd.ratelimit import RateLimitedLog

log = logging.getLogger("qcownbd.server")

METADATA_COMMIT_INTERVAL = 2.0
#: how long a stopping server waits for clients to take their last replies
STOP_GRACE = 10.0
#: bytes of partly received WRITE payloads all connections may hold at once
PAYLOAD_BUDGET = 128 * 1024 * 1024
#: while others wait for the payload budget, a payload holding some must arrive at
#: least this fast (bytes a second, measured over RATE_GRACE seconds at least)
MIN_UPLOAD_RATE = 256 * 1024
RATE_GRACE = 1.0


class PayloadBudget:
    """Server-wide bound on the memory of WRITE payloads still being received.

    A payload too large for the receive buffer needs a reservation; one
    payload is always granted when nothing is reserved, so any single request
    can proceed.  Refused connections wait (not reading) and are woken in
    turn, through their ``budget_available()``, when bytes are released.

    Nobody may hold budget it does not use while others wait: then a holder
    whose payload has arrived slower than ``min_rate`` bytes a second (over at
    least ``grace`` seconds) loses it, through its ``budget_revoked(rate)``,
    so a few clients trickling bytes into huge WRITEs cannot stall the
    writes of everyone else.
    """

    def __init__(self, limit: int, *, min_rate: float = MIN_UPLOAD_RATE,
                 grace: float = RATE_GRACE, clock=time.monotonic):
        self.limit = limit
        self.used = 0
        self.min_rate = min_rate
        self.grace = grace
        self._clock = clock
        self._waiting: list = []
        #: connection -> (bytes reserved, when)
        self._holders: dict = {}
        self._timer = None

    def reserve(self, nbytes: int, conn) -> bool:
        """Take ``nbytes`` for ``conn``, or queue it to be woken later and say no."""
        if self.used and self.used + nbytes > self.limit:
            if conn not in self._waiting:
                self._waiting.append(conn)
            self._reclaim()
            return False
        self.used += nbytes
        self._holders[conn] = (nbytes, self._clock())
        return True

    def release(self, conn) -> None:
        """Give back ``conn``'s reservation and let the waiting connections try again."""
        nbytes, _since = self._holders.pop(conn)
        self.used -= nbytes
        waiting, self._waiting = self._waiting, []
        for other in waiting:
            other.budget_available()

    def forget(self, conn) -> None:
        """A waiting connection went away."""
        if conn in self._waiting:
            self._waiting.remove(conn)

    def _reclaim(self) -> None:
        """Take the budget back from holders too slow to deserve it while others wait."""
        now = self._clock()
        for conn, (_nbytes, since) in list(self._holders.items()):
            elapsed = now - since
            if elapsed >= self.grace and conn.payload_received < self.min_rate * elapsed:
                conn.budget_revoked(conn.payload_received / elapsed)
        if self._waiting and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.grace / 2, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        if self._waiting:
            self._reclaim()


class NbdServer:
    """Accepts clients for the exports of ``exports`` (an ExportRegistry).

    Connections still negotiating have their own budget, ``max_handshakes``:
    when it is full the oldest of them is dropped for the newcomer, so a
    flood of idle or half-open connections (which the handshake timeout ends
    anyway) can neither fill ``max_connections`` nor keep a real client out.
    ``max_connections_per_client`` (0: none) counts both phases per address.
    ``zero_copy``: large reads may go out with sendfile straight from the
    image file (off while faults are injected into the image I/O, which
    every read must then meet).
    """

    #: the settings a reload changes in place (ServerConfig has the same names)
    LIMITS = ("max_connections", "handshake_timeout", "payload_timeout", "max_handshakes",
              "max_connections_per_client")

    def __init__(self, exports, *, max_connections: int = 256,
                 handshake_timeout: float = 30.0, payload_timeout: float = 30.0,
                 max_handshakes: int = 64,
                 max_connections_per_client: int = 0, tls: str = "off",
                 tls_context=None, zero_copy: bool = True):
        self.exports = exports
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.payload_timeout = payload_timeout
        self.max_handshakes = max_handshakes
        self.max_connections_per_client = max_connections_per_client
        self.tls = tls
        self.tls_context = tls_context
        self.zero_copy = zero_copy
        self.payloads = PayloadBudget(PAYLOAD_BUDGET)
        #: per-request and per-connection lines go through this: one client cannot flood
        self.log = RateLimitedLog(logging.getLogger("qcownbd.nbd"))
        self.buffers = BufferPool()
        self.connections: set[NbdConnection] = set()
        #: connections still negotiating, oldest first (a dict keeps the order)
        self._negotiating: dict[NbdConnection, None] = {}
        self._per_client: dict[object, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        #: the names of the sockets listening where the configuration said (not a socket
        #: unit's): a successor with another configuration may drop them
        self.configured: set = set()
        self._unix_path = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._committing: set[int] = set()
        #: what the connections that ended did, summed (`qcownbd status`)
        self.ended = ConnectionStats()
        self.ended_connections = 0
        #: hands connections naming an export on to the worker serving it
        #: (`workers.WorkerPool`); None: this process serves them
        self.router = None
        #: connections handed to workers and still open there (the limits count them)
        self.elsewhere = 0
        #: a worker's: ``on_ended(conn)`` tells its parent that a connection ended
        self.on_ended = None

    # ------------------------------------------------------- connection hub

    @staticmethod
    def offload(function, done) -> None:
        """Run ``function()`` in a worker thread; ``done(future)`` follows in the loop."""
        future = asyncio.get_running_loop().run_in_executor(None, function)
        future.add_done_callback(done)

    def register(self, conn: NbdConnection) -> bool:
        """Admit a new connection unless a limit is reached (see the class)."""
        if len(self.connections) + self.elsewhere >= self.max_connections:
            return False
        # Unix-socket clients (address None) share no address worth limiting
        if conn.client.address is not None and self.max_connections_per_client \
                and self._per_client.get(conn.client.address, 0) >= self.max_connections_per_client:
            self.log.log(logging.WARNING, "per-client limit",
                         "%s: refused: too many connections from this address", conn.client.label)
            return False
        if len(self._negotiating) >= self.max_handshakes:
            oldest = next(iter(self._negotiating))
            del self._negotiating[oldest]
            oldest.abort("dropped: too many connections negotiating")
        self._negotiating[conn] = None
        self._per_client[conn.client.address] = self._per_client.get(conn.client.address, 0) + 1
        self.connections.add(conn)
        self._idle.clear()
        return True

    def negotiated(self, conn: NbdConnection) -> None:
        """``conn`` entered transmission: it leaves the negotiation budget."""
        self._negotiating.pop(conn, None)

    def unregister(self, conn: NbdConnection) -> bool:
        """Forget a closed connection; False if it was never admitted."""
        if conn not in self.connections:
            return False
        self.connections.discard(conn)
        self._negotiating.pop(conn, None)
        self.ended_connections += 1
        self.ended.add(conn.stats)
        self._count_out(conn.client.address)
        if not self.connections:
            self._idle.set()
        if self.on_ended is not None:
            self.on_ended(conn)
        return True

    def not_admitted(self, conn: NbdConnection) -> None:
        """A connection refused at once (a limit) has ended."""
        if self.on_ended is not None:
            self.on_ended(conn)

    def handed_off(self, conn: NbdConnection) -> None:
        """``conn`` went to a worker: it still counts against the limits (the worker
        says when it ends: `ended_elsewhere`), not as a connection of this process."""
        self.connections.discard(conn)
        self._negotiating.pop(conn, None)
        self.elsewhere += 1
        if not self.connections:
            self._idle.set()

    def counted_elsewhere(self, address) -> None:
        """A connection a worker serves (handed over by a previous server) counts here."""
        self.elsewhere += 1
        self._per_client[address] = self._per_client.get(address, 0) + 1

    def ended_elsewhere(self, address) -> None:
        """A connection handed to a worker ended (or its worker died)."""
        self.elsewhere -= 1
        self._count_out(address)

    def _count_out(self, address) -> None:
        left = self._per_client[address] - 1
        if left:
            self._per_client[address] = left
        else:
            del self._per_client[address]

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        served, broken = self.exports.counts()
        text = f"{len(self.connections) + self.elsewhere} connection(s), {served} export(s)"
        return text + (f", {broken} unavailable" if broken else "")

    # ------------------------------------------------------- live snapshots

    async def freeze(self, export, timeout: float) -> None:
        """Hold every request on ``export`` (its clients' and those that choose it now)
        and return once none runs and no metadata commit of its image does;
        ControlError, everything thawed again, after ``timeout`` seconds."""
        export.freeze()
        for conn in self._transmitting(export):
            conn.freeze()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(conn.settled for conn in self._transmitting(export)) \
                or id(export.backend) in self._committing:
            if loop.time() > deadline:
                self.thaw(export)
                raise ControlError(f"export {export.name}: requests still running after "
                                   f"{timeout:g} s; nothing was changed")
            await asyncio.sleep(0.002)

    def thaw(self, export) -> None:
        """Let ``export``'s clients go on (with its backend as it is now)."""
        for conn in self._transmitting(export):
            conn.thaw()
        export.thaw()

    def _transmitting(self, export) -> list[NbdConnection]:
        return [conn for conn in self.connections if conn.export is export
                and conn.phase in (Phase.TRANSMITTING, Phase.CLOSING)]

    # ------------------------------------------------------- live handover

    async def hold_for_handover(self, timeout: float) -> list[NbdConnection]:
        """Hold every connection that can be handed over at its next request boundary,
        with its replies sent; close the others gracefully (negotiating ones, TLS ones:
        what is in flight is answered first).  Returns the held connections once all
        are, and no metadata commit runs; those not held within ``timeout`` seconds
        are closed gracefully instead (a client that does not read its replies)."""
        held, closing = [], []
        for conn in list(self.connections):
            why = _not_handed_over(conn)
            if why:
                if conn.session is not None:
                    log.info("%s: %s: closing it once its requests are answered",
                             conn.client.label, why)
                conn.shutdown()
                closing.append(conn)
            else:
                conn.hold()
                held.append(conn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # the closing ones too: their last replies must leave before this process does
        while loop.time() < deadline and not (all(conn.held for conn in held) and
                                              self.connections.isdisjoint(closing)):
            await asyncio.sleep(0.002)
        for conn in held:
            if not conn.held:
                log.warning("%s: no request boundary with every reply sent within %g s; "
                            "closing it instead of handing it over", conn.client.label,
                            timeout)
                conn.holding = False
                conn.shutdown()
        # a metadata commit in a worker thread ends in a moment (never interrupted)
        while self._committing:
            await asyncio.sleep(0.002)
        return [conn for conn in held if conn.holding]

    def release_held(self, held: list[NbdConnection]) -> None:
        """The handover failed: the held connections go on here."""
        for conn in held:
            if conn.phase is Phase.TRANSMITTING:
                conn.release()

    def stop_listening(self) -> list[socket.socket]:
        """Stop accepting clients; duplicates of the listening sockets, for the successor
        (the closed originals are this process's only: a socket's other descriptors
        keep it listening, and its queued clients wait for whoever accepts next).
        `configured` still says which were where the configuration said."""
        kept = [sock.dup() for server in self._servers for sock in server.sockets]
        for server in self._servers:
            server.close()
        self._servers = []
        return kept

    async def listen_again(self, sockets: list[socket.socket]) -> None:
        """A handover failed: accept on the sockets `stop_listening` gave again."""
        configured = set(self.configured)
        await self.adopt([s for s in sockets if s.getsockname() not in configured])
        await self.adopt([s for s in sockets if s.getsockname() in configured], True)

    # ------------------------------------------------------------ listening

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on HOST:PORT; a busy or bad address is a one-line ConfigError."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: NbdConnection(self), host, port,
                                              reuse_address=True)
        except (OSError, socket.gaierror) as exc:
            shown = f"[{host}]" if ":" in host else host
            hint = ("; another server has it: choose another address with --listen HOST:PORT"
                    if exc.errno == errno.EADDRINUSE else "")
            raise ConfigError(f"cannot listen on {shown}:{port}: "
                              f"{exc.strerror or exc}{hint}") from None
        self._servers.append(server)
        self.configured.update(sock.getsockname() for sock in server.sockets)
        log.info("listening on %s", ", ".join(_sockname(s) for s in server.sockets))

    async def listen_unix(self, path: str) -> None:
        """Listen on a Unix socket, replacing a stale socket file."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_unix_server(lambda: NbdConnection(self), path)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._unix_path = path
        self._servers.append(server)
        self.configured.add(path)
        log.info("listening on %s", path)

    async def adopt(self, sockets: list[socket.socket], configured: bool = False) -> None:
        """Serve on inherited sockets: a listening one (systemd socket activation) for
        every client that comes; a connected one (inetd, --stdin, systemd's Accept=yes)
        as the one client it is.  ``configured``: listening where the configuration
        says (a previous server's, handed over)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            factory = lambda: NbdConnection(self)  # noqa: E731
            if not is_listening(sock):
                await loop.connect_accepted_socket(factory, sock)
                continue
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock)
            else:
                server = await loop.create_server(factory, sock=sock)
            self._servers.append(server)
            if configured:
                self.configured.add(sock.getsockname())
            log.info("listening on inherited socket %s", _sockname(sock))

    async def resume(self, connections: list[tuple]) -> None:
        """Serve connections a previous server held at a request boundary: (its
        `handover.ConnectionState`, the socket), in transmission from the start
        (with worker processes: each on the worker of its export).  What was
        reopened for them and none took may close then."""
        for state, sock in connections:
            if self.router is not None:
                self.router.resume(state, sock)     # its worker serves it
            else:
                await self.take_over(state, sock)
        if self.router is not None:
            self.router.resumed()
        else:
            self.exports.resumed()

    async def take_over(self, state, sock, tag=None) -> None:
        """Serve one connection from ``state``: a `handover.ConnectionState`, or in a
        worker a `handover.NegotiatingState` too, ``tag`` being what its parent calls it."""
        sock.setblocking(False)
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: NbdConnection(self, state, tag), sock)

    def addresses(self) -> list:
        """The names of the sockets listening: (host, port, ...) tuples, Unix paths."""
        return [sock.getsockname() for server in self._servers for sock in server.sockets]

    async def wait_idle(self) -> None:
        """Return once no client is connected."""
        await self._idle.wait()

    # -------------------------------------------------------------- running

    async def commit_metadata_forever(self) -> None:
        """Every few seconds, flush backends that hold uncommitted metadata."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(METADATA_COMMIT_INTERVAL)
            self.log.flush()
            for export in self.exports.open_exports():
                backend = export.backend
                if id(backend) in self._committing or not backend.has_pending_metadata:
                    continue
                self._committing.add(id(backend))
                future = loop.run_in_executor(None, backend.flush)
                future.add_done_callback(lambda fut, b=backend: self._committed(b, fut))

    def _committed(self, backend, future) -> None:
        self._committing.discard(id(backend))
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            log.error("metadata commit of %s failed: %s", getattr(backend, "path", "?"), exc)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close every client."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), STOP_GRACE)
        except asyncio.TimeoutError:
            log.warning("%d client(s) did not finish in time; dropping them",
                        len(self.connections))
            for conn in list(self.connections):
                conn.transport.abort()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass


def _not_handed_over(conn: NbdConnection) -> str:
    """Why ``conn`` cannot go to a successor, or ''."""
    if conn.phase is not Phase.TRANSMITTING:
        return "not in transmission"
    if conn.session.tls:
        return "a TLS session cannot be handed over (its keys live in this process)"
    return ""


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (each client is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def is_listening(sock: socket.socket) -> bool:
    """Whether ``sock`` accepts connections (else it is one connection already)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def _sockname(sock) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(name)
