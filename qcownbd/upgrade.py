"""Live handover: the running server passes its sockets and clients to a successor.

`qcownbd upgrade` (the control socket) and SIGUSR2 start the successor as
``python -m qcownbd`` with the running server's own arguments (so the
qcownbd installed now serves), with one end of a socket pair (its number in
$QCOWNBD_HANDOVER_FD).  The steps, on `qcownbd.handover_channel`:

1. the successor reads its configuration and says ``{"ready"}``;
2. this server stops accepting, holds every connection at a request
   boundary with its replies sent (`NbdServer.hold_for_handover`; TLS and
   negotiating connections are answered and closed), commits every image
   (fleet overlays too) and drops its image locks, keeping the files open;
   with worker processes (`qcownbd.workers`) each worker does so and hands
   its held connections back to this server, which passes them on with its
   own;
3. it sends the listening sockets (and the control socket) with the names of
   the exports that have clients and the files of the fleet overlays they
   write; the successor opens its exports (its own configuration says what
   they are), then those very overlays (with workers: each in the worker
   its connections will go to), and says ``{"opened"}``;
4. it sends each connection's state (`qcownbd.handover`) and socket; the
   successor says ``{"taken"}``, resumes them, and ``{"serving"}`` once it
   listens.  Then this server exits 0 without closing anything the clients
   could notice: descriptors are closed, never shut down.

Whatever fails before the end (the successor exits, says ``{"failed"}``,
or is too slow), this server takes its image locks, sockets and
connections back (the workers theirs), kills the successor, logs why and
serves on.  Once the successor serves, the workers exit too; the successor
starts its own.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from qcownbd import systemd
from qcownbd.config import parse_listen
from qcownbd.errors import HandoverError, QcownbdError
from qcownbd.handover import (
    HANDOVER_FD_ENV, decode_state, encode_state, overlays_of, state_of,
)
from qcownbd.handover_channel import MAX_FDS, Channel
from qcownbd.image import locking

log = logging.getLogger("qcownbd.server")

#: how long the successor may take to start and read its configuration
START_TIMEOUT = 30.0
#: how long connections may take to reach a request boundary with their replies sent
HOLD_TIMEOUT = 5.0
#: how long the successor may take to open the images (a large QCOW1 image scans)
OPEN_TIMEOUT = 120.0
STEP_TIMEOUT = 30.0


class Upgrade:
    """The running server's side (see the module docstring).  ``argv``: the arguments
    it was started with; ``lock``: the reload lock (no reload or snapshot meanwhile)."""

    def __init__(self, server, registry, control, argv: list[str], lock: asyncio.Lock,
                 pool=None):
        self.server, self.registry, self.control = server, registry, control
        self.argv, self.lock = argv, lock
        #: the worker processes (`qcownbd.workers`), whose connections go over too
        self.pool = pool
        #: set once a successor serves: this process only has to exit
        self.done = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """SIGUSR2: upgrade in a task (its failure is logged)."""
        task = asyncio.get_running_loop().create_task(self._logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _logged(self) -> None:
        try:
            await self.run()
        except HandoverError:
            pass    # run() logged it

    async def run(self) -> int:
        """Hand over to a successor; its pid, or HandoverError (logged) with this server
        serving on."""
        if self.lock.locked():
            log.warning("upgrade refused: a reload, snapshot or upgrade is running")
            raise HandoverError("upgrade: a reload, snapshot or upgrade is running; "
                                "try again in a moment")
        async with self.lock:
            try:
                return await self._hand_over()
            except HandoverError as exc:
                log.error("upgrade failed, still serving as pid %d: %s", os.getpid(), exc)
                raise HandoverError(f"upgrade failed, still serving as pid {os.getpid()}: "
                                    f"{exc}") from None

    async def _hand_over(self) -> int:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Channel(ours)
        try:
            # a signal meant for this server (systemctl kill) must not kill the successor
            # before its handlers are set; once it serves, they are its own
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qcownbd", *self.argv, pass_fds=[theirs.fileno()],
                preexec_fn=systemd.ignoring_signals(signal.SIGUSR2, signal.SIGHUP),
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, HANDOVER_FD_ENV: str(theirs.fileno())})
        except OSError as exc:
            raise HandoverError(f"cannot start {sys.executable}: {exc.strerror}") from None
        finally:
            theirs.close()
        log.info("upgrade: started the successor, pid %d", process.pid)
        rollback = _Rollback(self, process)
        try:
            await _ask(channel, START_TIMEOUT, process)
            held = loop.time()
            await self._release(rollback)
            handed = rollback.handed()
            overlays = overlays_of(decode_state(state) for state, _fd in handed)
            live = sorted({state["export"] for state, _fd in handed} - overlays.keys())
            listening = rollback.listening + ([rollback.control] if rollback.control else [])
            configured = [sock.getsockname() in self.server.configured
                          for sock in rollback.listening]
            channel.send({"release": {"listening": len(rollback.listening),
                                      "configured": configured,
                                      "control": rollback.control is not None,
                                      "exports": live, "overlays": overlays}},
                         [sock.fileno() for sock in listening])
            await _ask(channel, OPEN_TIMEOUT, process)
            await self._send_connections(channel, handed, process)
            message = await _ask(channel, STEP_TIMEOUT, process)
            if message.get("serving") != process.pid:
                raise HandoverError(f"the successor said {message!r}")
        except HandoverError:
            await loop.run_in_executor(None, channel.close)
            await rollback.undo()
            raise
        channel.close()
        log.info("upgrade: pid %d serves %d connection(s) now (held for %.2f s); exiting",
                 process.pid, len(handed), loop.time() - held)
        if self.pool is not None:
            self.pool.finish()
        self.done.set()
        return process.pid

    async def _release(self, rollback: "_Rollback") -> None:
        """Step 2: stop accepting, hold the connections, commit and unlock the images."""
        rollback.listening = self.server.stop_listening()
        if self.control is not None:
            rollback.control = self.control.stop_listening()
        rollback.held = await self.server.hold_for_handover(HOLD_TIMEOUT)
        exports = self.registry.open_exports()
        rollback.unlocked = True
        await asyncio.get_running_loop().run_in_executor(None, commit_and_unlock, exports)
        if self.pool is not None:
            # the workers' connections come back here, held, their images unlocked
            rollback.collected = await self.pool.hold(HOLD_TIMEOUT + STEP_TIMEOUT)

    async def _send_connections(self, channel: Channel, handed: list, process) -> None:
        """Step 4, at most MAX_FDS connections a message."""
        for first in range(0, max(len(handed), 1), MAX_FDS):
            batch = handed[first:first + MAX_FDS]
            channel.send({"connections": [state for state, _fd in batch],
                          "last": first + MAX_FDS >= len(handed)},
                         [fd for _state, fd in batch])
            await _ask(channel, STEP_TIMEOUT, process)


def encoded_connections(held: list, collected: list) -> list[tuple[dict, socket.socket]]:
    """(encoded state, socket) of the connections this process ``held`` and of those
    its workers handed back (``collected``, already encoded)."""
    return [(encode_state(state_of(conn)), conn.transport.get_extra_info("socket"))
            for conn in held] + collected


class _Rollback:
    """What a failed handover must give back to the running server."""

    def __init__(self, upgrade: Upgrade, process):
        self.upgrade, self.process = upgrade, process
        self.listening: list[socket.socket] = []
        self.control: socket.socket | None = None
        self.held: list = []
        #: (encoded state, socket) of the workers' held connections
        self.collected: list = []
        self.unlocked = False

    def handed(self) -> list[tuple[dict, int]]:
        """(encoded state, descriptor) of every connection to hand over."""
        return [(state, sock.fileno())
                for state, sock in encoded_connections(self.held, self.collected)]

    async def undo(self) -> None:
        """Kill the successor, then take everything back."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        upgrade = self.upgrade
        if self.unlocked:
            await asyncio.get_running_loop().run_in_executor(
                None, relock, upgrade.registry.open_exports())
        if self.listening:
            await upgrade.server.listen_again(self.listening)
        if self.control is not None:
            await upgrade.control.start(self.control)
        upgrade.server.release_held(self.held)
        if upgrade.pool is not None:
            await upgrade.pool.release(self.collected)


async def _ask(channel: Channel, timeout: float, process) -> dict:
    """The successor's next message (in a worker thread: the loop serves on); its
    exit status in the error when it ended."""
    try:
        message, fds = await asyncio.get_running_loop().run_in_executor(
            None, channel.receive, timeout)
    except HandoverError as exc:
        try:
            status = await asyncio.wait_for(process.wait(), 1.0)
        except asyncio.TimeoutError:
            raise exc from None
        raise HandoverError(f"the successor exited with status {status}: {exc}") from None
    for sock in fds:
        sock.close()
    return message


def _image_files(backend):
    """The open files under ``backend``: itself (or what a window or shared view has)
    and its backing chain."""
    level = backend
    while level is not None:
        inner = getattr(level, "inner", None) or getattr(level, "_image", None)
        if inner is not None:
            level = inner
            continue
        if getattr(level, "fd", None) is not None:
            yield level
        level = getattr(level, "backing", None)


def commit_and_unlock(exports) -> None:
    """Commit every image (durable, metadata included) and drop its locks, so that the
    successor can open it; nothing writes it here any more."""
    try:
        for export in exports:
            export.backend.flush()
    except (QcownbdError, OSError) as exc:
        raise HandoverError(f"committing the images failed: {exc}") from None
    for export in exports:
        for image in _image_files(export.backend):
            locking.unlock_image(image.fd)


def relock(exports) -> None:
    """Take the image locks `commit_and_unlock` dropped back (a handover failed)."""
    for export in exports:
        for image in _image_files(export.backend):
            locking.lock_image(image.fd, writable=not image.read_only)


# -- the successor's side ----------------------------------------------------

class Successor:
    """A server started by a running one to take over (`from_environment`)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.previous = 0
        self.listening: list[socket.socket] = []
        #: for each of ``listening``: whether it is where the configuration said
        self.configured: list[bool] = []
        self.control: socket.socket | None = None
        self.live_exports: list[str] = []
        #: {FLEET/ID: overlay file} of the fleet overlays with clients
        self.overlays: dict[str, str] = {}
        #: (ConnectionState, socket) of every connection handed over
        self.connections: list[tuple] = []

    @classmethod
    def from_environment(cls) -> "Successor | None":
        """The successor of the server that started us, or None on a plain start."""
        fd = os.environ.pop(HANDOVER_FD_ENV, None)
        if fd is None:
            return None
        return cls(Channel.from_fd(int(fd)))

    def take_listeners(self) -> None:
        """Steps 1 and 3: say ready; take the listening sockets (the images are free
        once this returns)."""
        self.previous = os.getppid()
        self.channel.send({"ready": os.getpid()})
        message, socks = self.channel.receive(START_TIMEOUT + HOLD_TIMEOUT + STEP_TIMEOUT)
        release = message.get("release") or {}
        count = int(release.get("listening", 0))
        self.listening = socks[:count]
        self.configured = list(release.get("configured", [False] * count))
        if release.get("control") and len(socks) > count:
            self.control = socks[count]
        self.live_exports = list(release.get("exports", []))
        self.overlays = {str(name): str(path)
                         for name, path in (release.get("overlays") or {}).items()}

    def sort_listeners(self, tcp: list[str], unix: str | None, control: str | None):
        """Which of the listening sockets this configuration still wants (a socket
        unit's always); (those, the TCP addresses and Unix path to listen on anew).
        The others are closed, and so is the control socket if its path changed."""
        kept, wanted = [], []
        for address in tcp:
            host, port = parse_listen(address)
            names = _resolved(host, port)
            matching = [sock for sock in self.listening
                        if isinstance(sock.getsockname(), tuple)
                        and sock.getsockname()[:2] in names]
            kept += matching
            if not matching:
                wanted.append(address)
        unix_kept = [sock for sock in self.listening if sock.getsockname() == unix]
        kept += unix_kept
        for sock, configured in zip(self.listening, self.configured):
            if not configured and sock not in kept:
                kept.append(sock)
        for sock in self.listening:
            if sock not in kept:
                log.info("no longer listening on %s (the configuration changed)",
                         sock.getsockname())
                sock.close()
        self.listening = kept
        if self.control is not None and self.control.getsockname() != control:
            with contextlib.suppress(OSError):
                os.unlink(self.control.getsockname())
            self.control.close()
            self.control = None
        return kept, wanted, None if unix_kept else unix

    def take_connections(self, registry) -> None:
        """Steps 3 and 4: every export with clients must be served here, and every
        fleet overlay with clients open (else HandoverError); then take the
        connections."""
        self.check_exports(registry)
        for name, path in sorted(self.overlays.items()):
            try:
                registry.reopen_member(name, path)
            except QcownbdError as exc:
                raise HandoverError(str(exc)) from None
        self.receive_connections()

    def check_exports(self, registry) -> None:
        """Every export with clients is served here (else HandoverError)."""
        for name in self.live_exports:
            try:
                registry.served(name)
            except QcownbdError:
                why = dict(registry.unavailable()).get(name)
                raise HandoverError(why or f"export {name}: not in the configuration any "
                                    "more, and it has clients") from None

    def receive_connections(self) -> None:
        """Step 4, once our exports and the overlays with clients are open."""
        self.channel.send({"opened": True})
        while True:
            message, socks = self.channel.receive(STEP_TIMEOUT)
            states = [decode_state(state) for state in message.get("connections", [])]
            self.connections += zip(states, socks)
            self.channel.send({"taken": len(socks)})
            if message.get("last", True):
                return

    def serving(self) -> None:
        """The end: we listen and serve the connections; the previous server exits."""
        log.info("handover: took %d connection(s) and %d listening socket(s) from pid %d",
                 len(self.connections), len(self.listening) + (self.control is not None),
                 self.previous)
        systemd.notify(f"MAINPID={os.getpid()}\nREADY=1")
        self.channel.send({"serving": os.getpid()})
        self.channel.close()

    def fail(self, reason: str) -> None:
        """Tell the previous server why we cannot take over (it serves on)."""
        try:
            self.channel.send({"failed": reason}, timeout=5.0)
        except HandoverError:
            pass


def _resolved(host: str, port: int) -> set:
    """The (address, port) pairs listening on HOST:PORT binds."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return set()
    return {info[4][:2] for info in infos}


def report_failure(reason: str) -> None:
    """A successor's command failed before it could serve: tell the previous server
    (a no-op on a plain start).  Called by the command line's one error handler."""
    fd = os.environ.get(HANDOVER_FD_ENV)
    if fd is None:
        return
    try:
        Channel(socket.socket(fileno=os.dup(int(fd)))).send({"failed": reason}, timeout=5.0)
    except (OSError, ValueError, HandoverError):
        pass


def signal_upgrade(upgrade: Upgrade) -> None:
    """Let SIGUSR2 start an upgrade."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, upgrade.start)
