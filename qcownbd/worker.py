"""One worker process (`qcownbd.workers`): opens its images, serves what it is handed.

It reads the same configuration as its parent and opens the exports that
are its own (`routing.opened_by`), with its share of the metadata cache's
budget (`cache_share`), reports them, and then serves the
connections the parent passes (negotiating ones answer the option that
chose the export first).  It listens nowhere and talks to systemd not at
all.  It stops when the parent says so, and is started ignoring the signals
a whole service gets (the terminal's ^C, the SIGTERM systemd sends every
process of the unit): the parent may first want its connections, for
systemd's file descriptor store.  It dies with its parent (the service died: a SIGKILL
leaves no worker holding image locks), and exits without a word to its
clients when the parent's successor has taken them (an upgrade).
"""

import asyncio
import ctypes
import logging
import os
import signal
import socket

from qcownbd.config import ServerConfig
from qcownbd.control_commands import ControlCommands
from qcownbd.errors import HandoverError, QcownbdError
from qcownbd.exports import ExportRegistry, ImageProvider
from qcownbd.fleet import FleetProvider
from qcownbd.handover import decode_any, encode_state, state_of
from qcownbd.handover_channel import AsyncChannel, Channel
from qcownbd.image import faults, metadata_cache
from qcownbd.nbd.server import NbdServer
from qcownbd.routing import export_info, opened_by
from qcownbd.upgrade import HOLD_TIMEOUT, commit_and_unlock, relock
from qcownbd.workers import START_TIMEOUT, WORKER_ENV, cache_share

log = logging.getLogger("qcownbd.server")

PR_SET_PDEATHSIG = 1


def from_environment() -> tuple[int, int, int] | None:
    """(index, count, channel fd) when this process is a worker, else None."""
    value = os.environ.pop(WORKER_ENV, None)
    if value is None:
        return None
    index, count, fd = (int(part) for part in value.split("/"))
    return index, count, fd


def die_with_parent() -> None:
    """Have the kernel kill us when the parent dies (PR_SET_PDEATHSIG): a service
    killed with SIGKILL is gone at once, image locks and all, as one process is."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return      # not Linux: `_WorkerSide.parent_gone` ends us a moment later
    if os.getppid() != parent:
        os._exit(1)     # it died before we asked


class WorkerTag(logging.Filter):
    """Every line a worker logs says which worker it is ("worker 1: ...")."""

    def __init__(self, index: int):
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def run_worker(whoami: tuple[int, int, int], config: ServerConfig, cli: dict, load,
               open_cli_export, reloader) -> int:
    """Serve as worker ``whoami`` (`from_environment`) until told to stop."""
    die_with_parent()
    index, count, fd = whoami
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerTag(index))
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    first = Channel(sock)
    try:
        start, _socks = first.receive(START_TIMEOUT)
    except HandoverError as exc:
        log.error("no word from the parent: %s", exc)
        return 1

    def mine(configs: dict) -> dict:
        return {name: c for name, c in configs.items() if opened_by(c, index, count)}

    def my_part(new: ServerConfig) -> ServerConfig:
        """Our exports, and our share of the metadata cache (a reload resizes it)."""
        new.exports = mine(new.exports)
        new.metadata_cache = cache_share(new.metadata_cache, count)
        return new

    def load_mine() -> ServerConfig:
        return my_part(load() if load else ServerConfig())

    config, cli = my_part(config), mine(cli)
    metadata_cache.SHARED.resize(config.metadata_cache)
    images = ImageProvider()
    registry = ExportRegistry([images, FleetProvider(images, start["start"]["handed_over"],
                                                     tidy=index == 0)])
    try:
        try:
            for export_config in cli.values():
                registry.check_image_free(export_config)
                registry.add(open_cli_export(images, export_config))
            registry.apply({**cli, **config.exports})
        except QcownbdError as exc:
            # the parent says it, once, and fails its start
            Channel(sock).send({"failed": str(exc)}, timeout=5.0)
            return 1
        asyncio.run(_serve(index, sock, first.leftover(), config, cli, registry, images,
                           load_mine if load else None, reloader))
    finally:
        registry.close_all()
    return 0


def _report(registry) -> dict:
    """What the parent needs to know of our exports (`routing.RemoteRegistry.report`)."""
    return {"exports": {name: export_info(registry.served(name))
                        for name, _description in registry.listing()},
            "broken": dict(registry.unavailable())}


async def _serve(index: int, sock: socket.socket, received: bytes, config: ServerConfig,
                 cli: dict, registry, images, load, reloader) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    server = NbdServer(registry, zero_copy=not faults.injecting(),
                       **{key: getattr(config, key) for key in NbdServer.LIMITS})
    reloads = reloader(server, registry, cli, load, config, hand_over=lambda: None)
    worker = _WorkerSide(index, server, registry, images, reloads, stopping)
    channel = AsyncChannel(sock, worker.heard, worker.parent_gone, received)
    worker.channel = channel
    server.on_ended = worker.ended
    tasks = [loop.create_task(server.commit_metadata_forever()),
             loop.create_task(_apply_pending(reloads))]
    channel.send({"ready": os.getpid(), **_report(registry)})
    try:
        await stopping.wait()
    finally:
        for task in tasks:
            task.cancel()
        await server.stop()
        channel.close()


async def _apply_pending(reloads) -> None:
    """Open the reloaded exports that waited for their clients to leave."""
    while True:
        await asyncio.sleep(1.0)
        await reloads.apply_pending()


class _WorkerSide:
    """What a worker does with its parent's messages."""

    def __init__(self, index, server, registry, images, reloads, stopping):
        self.index, self.server, self.registry = index, server, registry
        self.reloads, self.stopping = reloads, stopping
        self.commands = ControlCommands(server, registry, images, reloads.lock, None)
        self.channel = None
        self._held: list = []
        self._tasks: set = set()
        #: the connections being taken (`resumed` waits for them)
        self._taking: set = set()

    def parent_gone(self) -> None:
        """The channel ended without a word: the parent died (where the kernel does
        not kill us with it).  The service died with it (its listening sockets did):
        end as if we had crashed with it, our images' metadata committed."""
        if self.stopping.is_set():
            return
        log.error("the parent process is gone; exiting")
        for export in self.registry.open_exports():
            try:
                export.backend.flush()
            except (QcownbdError, OSError) as exc:
                log.error("committing %s: %s", export.name, exc)
        logging.shutdown()
        os._exit(1)

    def ended(self, conn) -> None:
        """A connection the parent handed us ended: it counts it no more."""
        if conn.tag is not None and not self.channel.closed:
            try:
                self.channel.send({"ended": conn.tag})
            except HandoverError:
                self.stopping.set()

    def heard(self, message: dict, socks: list) -> None:
        if "connection" in message:
            self._take(message["connection"], socks, message.get("tag"))
        elif "ask" in message:
            self._spawn(self._answer(message))
        elif message.get("resumed"):
            self._spawn(self._resumed())
        elif message.get("exit"):
            # the successor serves our clients now: not a byte, not a shutdown
            logging.shutdown()
            os._exit(0)
        elif message.get("stop"):
            self.stopping.set()

    def _take(self, encoded: dict, socks: list, tag) -> None:
        try:
            state = decode_any(encoded)
        except HandoverError as exc:
            log.error("a connection not taken: %s", exc)
            for sock in socks:
                sock.close()
            self.channel.send({"ended": tag})
            return
        task = self._spawn(self.server.take_over(state, socks[0], tag))
        self._taking.add(task)
        task.add_done_callback(self._taking.discard)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resumed(self) -> None:
        """The parent passed on every connection a previous server handed over: once
        they are taken, the overlays reopened for them that none took close."""
        await asyncio.gather(*self._taking, return_exceptions=True)
        self.registry.resumed()

    async def _answer(self, question: dict) -> None:
        ask, fds = question["ask"], []
        try:
            if ask == "status":
                answer = {"status": await self.commands.status({})}
            elif ask == "reload":
                await self.reloads.reload()
                answer = _report(self.registry)
            elif ask == "snapshot":
                answer = {"result": await self.commands.snapshot(question["request"])}
            elif ask == "reopen":
                for name, path in sorted(question["overlays"].items()):
                    self.registry.reopen_member(name, path)
                answer = {"reopened": len(question["overlays"])}
            elif ask == "hold":
                answer, fds = await self._hold()
            elif ask == "release":
                await self._release()
                answer = {"released": True}
            else:
                answer = {"failed": f"unknown question {ask!r}"}
        except (QcownbdError, OSError) as exc:
            answer = {"failed": str(exc)}
        try:
            self.channel.answer(question, answer, fds)
        except HandoverError:
            self.stopping.set()

    async def _hold(self) -> tuple[dict, list[int]]:
        """An upgrade: our connections, held with their replies sent, and our images
        committed and unlocked for the successor."""
        self._held = await self.server.hold_for_handover(HOLD_TIMEOUT)
        await asyncio.get_running_loop().run_in_executor(
            None, commit_and_unlock, self.registry.open_exports())
        states = [encode_state(state_of(conn)) for conn in self._held]
        return {"connections": states}, [conn.transport.get_extra_info("socket").fileno()
                                         for conn in self._held]

    async def _release(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, relock, self.registry.open_exports())
        self.server.release_held(self._held)
        self._held = []

