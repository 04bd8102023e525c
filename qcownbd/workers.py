"""Worker processes: every core serves clients; the parent listens and negotiates.

The parent starts ``count`` workers as ``python -m qcownbd`` with its own
arguments (so they read the same configuration), each with one end of a
socket pair (`handover_channel.AsyncChannel`) and $QCOWNBD_WORKER saying
which worker it is (`qcownbd.worker`).  Its first message (``start``) names
the fleet overlays whose clients a previous server hands over (none may be
taken for stale).  Each worker opens the images it owns (`routing`) with
its part of the metadata cache (`cache_share`), reports them, and serves
the connections it is handed:
the parent accepts, negotiates until an option chooses an export (GO,
EXPORT_NAME), and passes the socket with the negotiation's state
(`handover.NegotiatingState`) to that export's worker, which answers the
option and serves the client from then on.  The parent keeps no
descriptor of it: the data path has no extra hop.

A worker that dies (even by SIGKILL) is noticed by the end of its channel
and started again; its clients' connections died with it and they
reconnect (the kernel released its image locks, the replacement opens the
images again).  Reload, status, snapshots and upgrades go through the
parent, which asks the workers (`reload`, `status`, `snapshot`, `hold`,
`release`, `exit`, `stop`); a successor's workers first reopen the fleet
overlays of the connections they will get (`reopen`) and close those none
took (`resumed`).
"""

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys

from qcownbd import systemd
from qcownbd.access import client_from_peername
from qcownbd.errors import ControlError, HandoverError, QcownbdError
from qcownbd.handover import encode_negotiating, encode_state, negotiating_state_of
from qcownbd.handover_channel import AsyncChannel
from qcownbd.image.metadata_cache import MIN_BUDGET
from qcownbd.nbd import protocol
from qcownbd.nbd.constants import Opt
from qcownbd.routing import Placement, RemoteRegistry

log = logging.getLogger("qcownbd.server")

#: the environment variable telling a worker which it is: "INDEX/COUNT/FD"
WORKER_ENV = "QCOWNBD_WORKER"
#: what a worker must not inherit: systemd talks to the parent only
PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                   "QCOWNBD_HANDOVER_FD")
#: how long a worker may take to open its images (a large QCOW1 image scans)
START_TIMEOUT = 120.0
#: a worker that dies at once is started again after this pause, not in a tight loop
RESTART_PAUSE = 0.5
MAX_RESTART_PAUSE = 30.0
STOP_TIMEOUT = 20.0


def cache_share(budget: int, count: int) -> int:
    """Each of ``count`` workers' metadata cache: an equal part of the budget, which
    stays the service's (at least the cache's minimum)."""
    return max(budget // count, MIN_BUDGET)


def worker_count(configured: int) -> int:
    """The number of workers: as configured, 0 meaning one per core we may run on."""
    return configured or len(os.sched_getaffinity(0))


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, index: int, process, channel: AsyncChannel):
        self.index, self.process, self.channel = index, process, channel
        self.ready = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerProcess:
    """A worker's process (started with subprocess: before the event loop runs, too);
    ``wait`` waits for it in a thread."""

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        """Its exit status (negative: the signal that ended it), once it exited."""
        return await asyncio.get_running_loop().run_in_executor(None, self._popen.wait)


class WorkerPool:
    """The parent's side (see the module docstring); ``router`` of the `NbdServer`."""

    def __init__(self, count: int, argv: list[str], configs: dict, log_to_stderr: bool = True):
        self.count, self.argv = count, argv
        #: the fleet overlay files of the connections a previous server hands over: no
        #: worker opening its fleets may delete them as stale (until `resumed`)
        self.handed_over: list[str] = []
        #: False: the workers' stderr is /dev/null (a --fork server lets its pipe go;
        #: a worker that cannot start says why to this process, through its channel)
        self.log_to_stderr = log_to_stderr
        self.registry = RemoteRegistry(configs)
        self.placement = Placement(count)
        self.workers: list[Worker | None] = [None] * count
        self.stopping = False
        #: the `NbdServer` whose limits count the connections the workers serve
        self.server = None
        #: tag -> (worker index, client address) of every connection a worker serves
        self._handed: dict[int, tuple] = {}
        self._last_tag = 0
        self._tasks: set[asyncio.Task] = set()
        #: index -> (process, our end of its channel) started by `launch`
        self._launched: dict[int, tuple] = {}

    # ------------------------------------------------------------- life cycle

    def launch(self) -> None:
        """Start the worker processes now, before the event loop; `start` then has them
        open their images.  An upgrade's successor does so before the old server holds
        its clients: the workers' Python start is not part of the clients' pause."""
        for index in range(self.count):
            self._launched[index] = self._process(index)

    async def start(self) -> None:
        """Start every worker and wait until each has opened its images; the first
        failure (a worker's own error: an image it cannot open) ends the start."""
        for index in range(self.count):
            self._spawn(index)
        for worker in list(self.workers):
            await self._wait_ready(worker)
        log.info("%d workers serve: pids %s", self.count,
                 ", ".join(str(w.pid) for w in self.workers))

    def _process(self, index: int) -> tuple["WorkerProcess", socket.socket]:
        """Worker ``index``'s process, waiting for its ``start``, and our end of its
        channel; HandoverError when it cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {key: value for key, value in os.environ.items() if key not in PARENT_ONLY_ENV}
        env[WORKER_ENV] = f"{index}/{self.count}/{theirs.fileno()}"
        try:
            # the parent has the terminal's ^C and systemd's signals (systemctl stop and
            # kill signal every process of the unit): it tells a worker what to do
            popen = subprocess.Popen(
                [sys.executable, "-m", "qcownbd", *self.argv], pass_fds=[theirs.fileno()],
                preexec_fn=systemd.ignoring_signals(signal.SIGINT, signal.SIGTERM,
                                                    signal.SIGHUP, signal.SIGUSR2),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=None if self.log_to_stderr else subprocess.DEVNULL, env=env)
        except OSError as exc:
            ours.close()
            raise HandoverError(f"cannot start a worker: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        return WorkerProcess(popen), ours

    def _spawn(self, index: int) -> Worker:
        process, ours = self._launched.pop(index, None) or self._process(index)
        worker = None

        def on_message(message, socks):
            self._heard(worker, message, socks)

        worker = Worker(index, process, AsyncChannel(ours, on_message,
                                                     lambda: self._lost(worker)))
        self.workers[index] = worker
        try:
            # the one thing a worker must know before it opens its images
            worker.channel.send({"start": {"handed_over": self.handed_over}})
        except HandoverError:
            pass        # it died at once: `_wait_ready` says so
        return worker

    async def _wait_ready(self, worker: Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise HandoverError(f"worker {worker.index} (pid {worker.pid}) did not open its "
                                f"images within {START_TIMEOUT:g} s") from None

    def _heard(self, worker: Worker, message: dict, socks: list) -> None:
        """An unasked message: a worker's report of its exports."""
        for sock in socks:
            sock.close()
        if "failed" in message and not worker.ready.done():
            worker.ready.set_exception(QcownbdError(str(message["failed"])))
            return
        if "ended" in message:
            self._ended(message["ended"])
        if "exports" in message:
            self.registry.report(worker.index, message["exports"], message.get("broken", {}))
        if "ready" in message and not worker.ready.done():
            self.registry.ready.add(worker.index)
            worker.ready.set_result(None)

    def _lost(self, worker: Worker) -> None:
        """The worker's channel ended: it died (or was told to go)."""
        self.registry.ready.discard(worker.index)
        for tag, (index, _address) in list(self._handed.items()):
            if index == worker.index:
                self._ended(tag)        # its connections died with it
        if not worker.ready.done():
            worker.ready.set_exception(HandoverError(
                f"worker {worker.index} (pid {worker.pid}) exited while starting"))
        if worker.ready.exception() is not None or self.stopping \
                or self.workers[worker.index] is not worker:
            return      # (a start that failed says why: `start`, `_replace`)
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, dead: Worker) -> None:
        status = await dead.process.wait()      # reaped: its image locks are gone
        # a stop of the whole service (systemd signals every process of the unit)
        # reaches this process in a moment too: no error, no replacement then
        await asyncio.sleep(RESTART_PAUSE)
        if self.stopping:
            return
        log.error("worker %d (pid %d) %s; its clients reconnect to its replacement",
                  dead.index, dead.pid, "died" if status else "stopped")
        pause = RESTART_PAUSE
        while not self.stopping:
            try:
                worker = self._spawn(dead.index)
                await self._wait_ready(worker)
            except QcownbdError as exc:
                pause = min(pause * 2, MAX_RESTART_PAUSE)
                log.error("worker %d: %s; trying again in %g s", dead.index, exc, pause)
                await asyncio.sleep(pause)
                continue
            log.info("worker %d: pid %d replaces pid %d", dead.index, worker.pid, dead.pid)
            return

    async def stop(self) -> None:
        """Tell every worker to stop (clients get their last replies) and wait."""
        self.stopping = True
        self._tell_all({"stop": True})
        for worker in self.workers:
            if worker is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                worker.process.kill()
                await worker.process.wait()

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w is not None and not w.channel.closed]

    # ---------------------------------------------------------------- routing

    def _send(self, worker: Worker, state: dict, sock: socket.socket, address) -> None:
        """Pass a connection to ``worker``; it counts against the limits here until
        the worker says it ended (or dies).  HandoverError when it is gone."""
        self._last_tag += 1
        worker.channel.send({"connection": state, "tag": self._last_tag}, [sock.fileno()])
        self._handed[self._last_tag] = (worker.index, address)

    def _ended(self, tag) -> None:
        handed = self._handed.pop(tag, None)
        if handed is not None and self.server is not None:
            self.server.ended_elsewhere(handed[1])

    def worker_of(self, name: str) -> int:
        """The worker that serves export ``name``."""
        return self.placement.worker_of(name, self.registry.configs.get(name))

    def forward(self, conn, option: int, payload: bytes) -> bool:
        """``conn`` read ``option``: when it chooses an export, hand the connection to
        its worker (True); else (or when that worker cannot take it) it is answered
        here, by the negotiation (False)."""
        if option == Opt.GO:
            try:
                name, _infos = protocol.parse_info_request(payload)
            except QcownbdError:
                return False
        elif option == Opt.EXPORT_NAME:
            try:
                name = payload.decode()
            except UnicodeDecodeError:
                return False
        else:
            return False
        try:
            export = conn.negotiation.exports.lookup(name)
        except QcownbdError:
            return False        # the negotiation refuses it
        worker = self.workers[self.worker_of(export.name)]
        if worker is None or worker.index not in self.registry.ready:
            return False        # refused: its worker is being replaced
        state = negotiating_state_of(conn, option, payload)
        try:
            self._send(worker, encode_negotiating(state), conn.transport.get_extra_info("socket"),
                       conn.client.address)
        except HandoverError:
            return False
        conn.hand_off()
        return True

    def resume(self, state, sock: socket.socket) -> None:
        """A connection in transmission (handed over by a previous server) goes to the
        worker of its export; closed if that worker is gone."""
        worker = self.workers[self.worker_of(state.session.export_name)]
        try:
            address = client_from_peername(sock.getpeername()).address
        except OSError:
            address = None      # the client is gone: its worker will find out
        try:
            if worker is None:
                raise HandoverError("no worker")
            self._send(worker, encode_state(state), sock, address)
            self.server.counted_elsewhere(address)
        except HandoverError as exc:
            log.error("%s: not resumed: its worker is gone (%s)", state.client, exc)
        sock.close()

    async def reopen(self, overlays: dict[str, str]) -> None:
        """An upgrade's successor: each of ``overlays`` ({FLEET/ID: file} the previous
        server's clients write) opened now by the worker its connections will go to
        (`resume`); HandoverError (one line) when one cannot be."""
        on: dict[int, dict] = {}
        for name, path in sorted(overlays.items()):
            on.setdefault(self.worker_of(name), {})[name] = path
        for index, mine in sorted(on.items()):
            worker = self.workers[index]
            if worker is None or worker.channel.closed:
                raise HandoverError(f"worker {index} is gone; overlays {', '.join(mine)} "
                                    "not reopened")
            await worker.channel.ask({"ask": "reopen", "overlays": mine},
                                     timeout=START_TIMEOUT)

    def resumed(self) -> None:
        """Every handed-over connection went to its worker: the reopened overlays none
        of them took may close, and a worker started from now on finds no overlay
        handed over."""
        self.handed_over = []
        self._tell_all({"resumed": True})

    # ------------------------------------------------------------- questions

    async def reload(self) -> None:
        """Every worker reads the configuration again and reports what it serves."""
        for worker in self._live():
            try:
                answer, _socks = await worker.channel.ask({"ask": "reload"}, timeout=START_TIMEOUT)
            except HandoverError as exc:
                log.error("worker %d: reload: %s", worker.index, exc)
                continue
            self.registry.report(worker.index, answer["exports"], answer.get("broken", {}))

    async def status(self) -> list[dict]:
        """Each worker's status (`control_commands.ControlCommands.status`), with its
        index and the overlays placed on it."""
        found = []
        for worker in self._live():
            try:
                answer, _socks = await worker.channel.ask({"ask": "status"}, timeout=10.0)
            except HandoverError:
                continue
            status = answer["status"]
            status["index"] = worker.index
            found.append(status)
        return found

    async def snapshot(self, request: dict) -> dict:
        """A live snapshot, taken by the worker of the export."""
        name = request.get("export")
        if not isinstance(name, str) or name not in self.registry.configs:
            raise ControlError(f"no export named {name!r}")
        worker = self.workers[self.worker_of(name)]
        if worker is None or worker.channel.closed:
            raise ControlError(f"export {name}: its worker is restarting; try again")
        try:
            answer, _socks = await worker.channel.ask({"ask": "snapshot", "request": request},
                                                      timeout=120.0)
        except HandoverError as exc:
            raise ControlError(str(exc)) from None
        return answer["result"]

    # ----------------------------------------------------------- the upgrade

    async def hold(self, timeout: float) -> list[tuple]:
        """An upgrade: every worker holds its connections at a request boundary,
        commits and unlocks its images and hands them back here: [(encoded state,
        socket)].  HandoverError (the workers that held release again) on failure."""
        collected = []
        try:
            for worker in self._live():
                answer, socks = await worker.channel.ask({"ask": "hold"}, timeout=timeout)
                collected += zip(answer["connections"], socks)
        except HandoverError:
            await self.release(collected)
            raise
        return collected

    async def release(self, collected: list[tuple]) -> None:
        """The upgrade failed: the workers relock their images and serve on (our copies
        of the sockets close: theirs keep the connections)."""
        for _state, sock in collected:
            sock.close()
        for worker in self._live():
            try:
                await worker.channel.ask({"ask": "release"}, timeout=30.0)
            except HandoverError as exc:
                log.error("worker %d: release after a failed upgrade: %s", worker.index, exc)

    def finish(self) -> None:
        """The successor serves: the workers exit without a word to the clients."""
        self.stopping = True
        self._tell_all({"exit": True})

    def _tell_all(self, message: dict) -> None:
        """Send ``message`` to every live worker (one that died meanwhile: `_lost`)."""
        for worker in self._live():
            try:
                worker.channel.send(message)
            except HandoverError:
                pass
