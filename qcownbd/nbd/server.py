"""The listening side: sockets, the set of live connections, orderly stop.

`NbdServer` is what every `NbdConnection` talks to, and holds what they
share: the payload budget, the buffer pool, the worker threads.  It also
runs the metadata commit timer: a backend with allocations not yet
committed gets a `flush` in a worker thread every couple of seconds, so a
crash loses at most that much of what clients did not flush themselves.
"""

import asyncio
import logging
import os
import resource
import socket
import stat

from qcownbd.errors import ConfigError
from qcownbd.nbd.connection import NbdConnection
from qcownbd.nbd.replies import BufferPool

log = logging.getLogger("qcownbd.server")

METADATA_COMMIT_INTERVAL = 2.0
#: how long a stopping server waits for clients to take their last replies
STOP_GRACE = 10.0
#: bytes of partly received WRITE payloads all connections may hold at once
PAYLOAD_BUDGET = 128 * 1024 * 1024


class PayloadBudget:
    """Server-wide bound on the memory of WRITE payloads still being received.

    A payload too large for the receive buffer needs a reservation; one
    payload is always granted when nothing is reserved, so any single request
    can proceed.  Refused connections wait (not reading) and are woken in
    turn, through their ``budget_available()``, when bytes are released.
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
        self.buffers = BufferPool()
        self.connections: set[NbdConnection] = set()
        #: connections still negotiating, oldest first (a dict keeps the order)
        self._negotiating: dict[NbdConnection, None] = {}
        self._per_client: dict[object, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._committing: set[int] = set()

    # ------------------------------------------------------- connection hub

    @staticmethod
    def offload(function, done) -> None:
        """Run ``function()`` in a worker thread; ``done(future)`` follows in the loop."""
        future = asyncio.get_running_loop().run_in_executor(None, function)
        future.add_done_callback(done)

    def register(self, conn: NbdConnection) -> bool:
        """Admit a new connection unless a limit is reached (see the class)."""
        if len(self.connections) >= self.max_connections:
            return False
        # Unix-socket clients (address None) share no address worth limiting
        if conn.address is not None and self.max_connections_per_client \
                and self._per_client.get(conn.address, 0) >= self.max_connections_per_client:
            log.warning("%s: refused: too many connections from this address", conn.peer)
            return False
        if len(self._negotiating) >= self.max_handshakes:
            oldest = next(iter(self._negotiating))
            del self._negotiating[oldest]
            oldest.evict("dropped: too many connections negotiating")
        self._negotiating[conn] = None
        self._per_client[conn.address] = self._per_client.get(conn.address, 0) + 1
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
        left = self._per_client[conn.address] - 1
        if left:
            self._per_client[conn.address] = left
        else:
            del self._per_client[conn.address]
        if not self.connections:
            self._idle.set()
        return True

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        served, broken = self.exports.counts()
        text = f"{len(self.connections)} connection(s), {served} export(s)"
        return text + (f", {broken} unavailable" if broken else "")

    # ------------------------------------------------------------ listening

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on HOST:PORT; a busy or bad address is a one-line ConfigError."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: NbdConnection(self), host, port,
                                              reuse_address=True)
        except (OSError, socket.gaierror) as exc:
            shown = f"[{host}]" if ":" in host else host
            raise ConfigError(f"cannot listen on {shown}:{port}: "
                              f"{exc.strerror or exc}") from None
        self._servers.append(server)
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
        log.info("listening on %s", path)

    async def adopt(self, sockets: list[socket.socket]) -> None:
        """Serve on sockets inherited from systemd (socket activation)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            factory = lambda: NbdConnection(self)  # noqa: E731
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock)
            else:
                server = await loop.create_server(factory, sock=sock)
            self._servers.append(server)
            log.info("listening on inherited socket %s", _sockname(sock))

    # -------------------------------------------------------------- running

    async def commit_metadata_forever(self) -> None:
        """Every few seconds, flush backends that hold uncommitted metadata."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(METADATA_COMMIT_INTERVAL)
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


def _sockname(sock) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(name)
