"""The server's life cycle: open the exports, listen, serve, reload, stop.

Signals: SIGTERM/SIGINT stop (in-flight requests finish, images are
committed and closed, exit 0); so do the end of a --run command (exit with
its status) and of the last handed-over connection (--stdin, systemd's
Accept=yes), `qcownbd.launch` has the rest of the script side.  SIGHUP reloads the config file's exports
and rereads the TLS certificate, key and CA files (same paths: certificates
are rotated by replacing the files); a change of the listen addresses or the
TLS mode is applied by a live handover, as SIGUSR2 and `qcownbd upgrade`
start (`qcownbd.upgrade`; with --fd-store, SIGTERM keeps the clients in
systemd's file descriptor store: `qcownbd.fdstore`).  Under
systemd the inherited sockets are used and READY/RELOADING/STOPPING/STATUS
are reported.
"""

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qcownbd import systemd
from qcownbd.config import (
    ExportConfig, ServerConfig, parse_listen, tcp_addresses,
)
from qcownbd.control import ControlServer
from qcownbd.control_commands import ControlCommands
from qcownbd.errors import ConfigError, HandoverError, ImageFormatError, QcownbdError
from qcownbd.fdstore import Restored, keep_for_restart
from qcownbd.exports import Export, ExportRegistry, ImageProvider
from qcownbd.fleet import FleetProvider
from qcownbd.handover import overlays_of
from qcownbd.image import faults, metadata_cache
from qcownbd.image.probe import open_image
from qcownbd.image.qcow1 import create_qcow1
from qcownbd.image.window import WindowSpec
from qcownbd.launch import Launch, stdin_socket
from qcownbd.nbd.server import NbdServer, is_listening, raise_fd_limit
from qcownbd.nbd.tls import server_context
from qcownbd.upgrade import Successor, Upgrade, signal_upgrade
from qcownbd import worker
from qcownbd.workers import WorkerPool, worker_count

log = logging.getLogger("qcownbd.server")

#: what `serve` returns when a successor took over: the process exits at once
HANDED_OVER = object()

DEMO_SIZE = 64 * 1024 * 1024
DEMO_BANNER = (b"qcownbd demo disk\n"
               b"This QCOW1 image is served by qcownbd; write to it freely.\n")


def run(config: ServerConfig, cli: dict[str, ExportConfig],
        load: Callable[[], ServerConfig] | None, launch: Launch | None = None,
        window: WindowSpec | None = None, argv: list[str] | None = None) -> int:
    """Serve ``config``'s exports and the command line's ``cli`` ones until told to stop;
    ``load()`` reads the config file again (SIGHUP), None when there is none; of each
    command-line image only its ``window`` is served.  Returns the exit status (the
    --run command's, with one).

    A command-line export that cannot open is the operator's typo: it fails
    the start; a config file's broken export is logged and refused instead.
    """
    launch = launch or Launch()
    whoami = worker.from_environment()
    if whoami is not None:
        return worker.run_worker(whoami, config, cli, load,
                                 lambda images, c: open_cli_export(images, c, window), Reloader)
    successor = Successor.from_environment()
    tls_context = tls_context_for(config)
    early = None
    if successor is not None:
        launch.fork = False     # the previous server detached already
        # the workers start their Python while the previous server still serves
        early = worker_pool(config, cli, launch, False, argv)
        if early is not None:
            early.launch()
        successor.take_listeners()
        kept, tcp, unix = successor.sort_listeners(tcp_addresses(config), config.unix,
                                                   config.control_socket)
        endpoints = Endpoints(kept, [], tcp, unix, successor.connections,
                              configured=successor.configured)
    else:
        endpoints = Endpoints.choose(config, launch)
    launch.detach()
    raise_fd_limit()
    metadata_cache.SHARED.resize(config.metadata_cache)
    images = ImageProvider()
    # the overlays of handed-over clients, which the fleets must not find stale
    handed_over = list(overlays_of(state for state, _sock in endpoints.resumed).values()
                       if successor is None else successor.overlays.values())
    pool = early if successor is not None else worker_pool(config, cli, launch,
                                                           endpoints.single, argv)
    if pool is not None:
        pool.handed_over = handed_over
    registry = ExportRegistry([images, FleetProvider(images, handed_over)]) if pool is None \
        else pool.registry
    try:
        try:
            if pool is None:
                for export_config in cli.values():
                    registry.check_image_free(export_config)
                    registry.add(open_cli_export(images, export_config, window))
                registry.apply({**cli, **config.exports})
                if successor is not None:
                    successor.take_connections(registry)
            status = asyncio.run(serve(config, cli, registry, images, load, tls_context,
                                       endpoints, launch, argv or [], successor, pool))
        except QcownbdError as exc:
            if successor is not None:
                successor.fail(str(exc))    # (a no-op once it serves)
            raise
        if status is HANDED_OVER:
            # a successor (or systemd's store) has the clients and the images are
            # committed: nothing more may be written or closed in a way a client
            # would notice (descriptors close at exit, without a shutdown)
            launch.close()
            logging.shutdown()
            os._exit(0)
        return status
    finally:
        registry.close_all()
        launch.close()


def worker_pool(config: ServerConfig, cli: dict, launch: Launch, single: bool,
                argv: list[str] | None) -> WorkerPool | None:
    """The worker processes to serve with, or None to serve in this process (one
    worker, or a setup that keeps its clients in one process: logged); ``single``:
    the server serves handed-over connections only (`Endpoints.single`)."""
    count = worker_count(config.workers)
    if count == 1:
        return None
    alone = ("-s (the throw-away overlays live with this process)" if not argv else
             "TLS (a TLS session cannot be passed to another process)"
             if config.tls != "off" else
             "--stdin or systemd's Accept=yes (one connection)" if single else "")
    if alone:
        log.info("serving in one process, not %d workers: %s", count, alone)
        return None
    return WorkerPool(count, argv, {**cli, **config.exports}, launch.keeps_stderr())


def open_cli_export(images: ImageProvider, config: ExportConfig,
                    window: WindowSpec | None) -> Export:
    """The export of a command-line image, or of its ``window``."""
    backend = images.open_backend(config)
    if window is None:
        return Export(config, backend)
    try:
        part = window.apply(backend)
    except ImageFormatError as exc:
        raise ImageFormatError(f"export {config.name}: {config.path}: {exc}") from None
    log.info("export %s: %s: bytes %d to %d", config.name, window.describe(), part.offset,
             part.offset + part.size)
    return Export(config, part)


@dataclass
class Endpoints:
    """Where clients come from: sockets inherited listening (systemd socket
    activation), connections handed over (--stdin, systemd's Accept=yes: served
    alone, and the server ends with them), or else the addresses to listen on;
    and connections in transmission a previous server left (``resumed``: a live
    handover, systemd's file descriptor store), with ``restored`` to take out of
    that store once served."""

    listening: list[socket.socket]
    connected: list[socket.socket]
    tcp: list[str]
    unix: str | None
    resumed: list[tuple] = field(default_factory=list)
    restored: Restored | None = None
    #: the names of the socket unit's listening sockets (systemd keeps those itself)
    unit_sockets: list = field(default_factory=list)
    #: for each of ``listening``: whether it listens where the configuration says
    configured: list[bool] = field(default_factory=list)

    @classmethod
    def choose(cls, config: ServerConfig, launch: Launch) -> "Endpoints":
        """What the environment and ``config`` say; ConfigError when nowhere is left."""
        restored, unit = Restored.take(systemd.inherited_fds())
        inherited = [socket.socket(fileno=fd) for _name, fd in unit]
        connected = [sock for sock in inherited if not is_listening(sock)]
        if launch.stdin:
            connected.append(stdin_socket())
        listening = [sock for sock in inherited if is_listening(sock)]
        if inherited or connected or restored.names:
            return cls(listening + restored.listening, connected, [], None,
                       restored.connections, restored,
                       [sock.getsockname() for sock in listening],
                       [False] * len(listening) + [True] * len(restored.listening))
        tcp = tcp_addresses(config)
        if not tcp and not config.unix:
            raise ConfigError("nowhere to listen: listen = [] and no unix socket "
                              "(give --listen or --unix)")
        return cls([], [], tcp, config.unix)

    @property
    def single(self) -> bool:
        """Only handed-over connections: the server stops when they have ended."""
        return not (self.listening or self.tcp or self.unix)

    async def open(self, server: NbdServer) -> None:
        """Listen, adopt, serve."""
        # new addresses first: one that cannot be bound fails the start before any
        # client's bytes are read
        for address in self.tcp:
            await server.listen_tcp(*parse_listen(address))
        if self.unix:
            await server.listen_unix(self.unix)
        configured = self.configured or [False] * len(self.listening)
        await server.adopt([s for s, c in zip(self.listening, configured) if not c])
        await server.adopt([s for s, c in zip(self.listening, configured) if c], True)
        await server.adopt(self.connected)
        await server.resume(self.resumed)


def demo_image() -> str:
    """The demo image's path, created with a text banner at offset 0 if absent."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    path = os.path.join(data_home, "qcownbd", "demo.qcow")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        create_qcow1(path, DEMO_SIZE)
        image = open_image(path, fmt="qcow1")
        try:
            image.write(0, DEMO_BANNER)
        finally:
            image.close()
        log.info("created the demo image %s", path)
    return path


def tls_context_for(config: ServerConfig):
    """The server's ssl context from the configured files, or None with TLS off."""
    if config.tls == "off":
        return None
    return server_context(config.tls_cert, config.tls_key, config.tls_ca,
                          config.tls_verify_client)


async def serve(config: ServerConfig, cli: dict, registry: ExportRegistry,
                images: ImageProvider, load: Callable[[], ServerConfig] | None, tls_context,
                endpoints: Endpoints, launch: Launch, argv: list[str],
                successor: Successor | None, pool: WorkerPool | None = None):
    """Listen, serve until SIGTERM/SIGINT (or the --run command or the handed-over
    connection ends), then stop cleanly; the exit status, or HANDED_OVER once a
    successor serves (SIGUSR2, `qcownbd upgrade`).  With a ``pool`` the workers
    serve the clients this process negotiates with."""
    server = NbdServer(registry, tls=config.tls, tls_context=tls_context,
                       zero_copy=not faults.injecting(),
                       **{key: getattr(config, key) for key in NbdServer.LIMITS})
    try:
        if pool is not None:
            await pool.start()
            server.router, pool.server = pool, server
            if successor is not None:
                # the fleet overlays with clients open in the workers that get them
                successor.check_exports(registry)
                await pool.reopen(successor.overlays)
                successor.receive_connections()
        if endpoints.restored is not None:
            await endpoints.restored.reopen_overlays(
                pool.reopen if pool is not None else _reopener(registry))
    except QcownbdError:
        if pool is not None:
            await pool.stop()
        raise
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads = Reloader(server, registry, cli, load, config) if pool is None \
        else PoolReloader(pool, server, registry, cli, load, config)
    loop.add_signal_handler(signal.SIGHUP, reloads.start)
    tasks = [loop.create_task(server.commit_metadata_forever()),
             loop.create_task(report_status(server, reloads))]
    control = None
    if config.control_socket:
        control = ControlServer(config.control_socket, {})
    upgrade = Upgrade(server, registry, control, argv, reloads.lock, pool)
    refusal = upgrade_refusal(launch, endpoints, argv)
    if not refusal:
        signal_upgrade(upgrade)
        reloads.hand_over = upgrade.start
    if control is not None:
        commands = ControlCommands(server, registry, images, reloads.lock,
                                   _refused(refusal) if refusal else upgrade.run, pool)
        control.handlers = commands.handlers()
    try:
        await endpoints.open(server)
        if control is not None:
            await control.start(successor.control if successor else None)
        await launch.listening(server.addresses(), first_export(cli, config), config.tls)
        if successor is not None:
            successor.serving()
        else:
            systemd.notify(f"READY=1\nSTATUS={server.status()}")
        if endpoints.restored is not None:
            endpoints.restored.forget()
        await _until_stop(stopping, server, endpoints, launch, upgrade.done)
        if pool is not None:
            pool.stopping = True    # workers that end from now on are not replaced
        if upgrade.done.is_set():
            await asyncio.sleep(0.1)    # the answer to `qcownbd upgrade` goes out
            return HANDED_OVER
        log.info("stopping")
        systemd.notify("STOPPING=1")
        if launch.fd_store and await keep_for_restart(server, registry,
                                                      endpoints.unit_sockets, pool):
            upgrade.done.set()
            return HANDED_OVER
    finally:
        for task in tasks:
            task.cancel()
        if not upgrade.done.is_set():
            launch.interrupt_command()
            if control is not None:
                await control.close()
            await server.stop()
            if pool is not None:
                await pool.stop()
    return await launch.command_status()


def _reopener(registry: ExportRegistry):
    """`WorkerPool.reopen` for a server without workers: the overlays open here."""
    async def reopen(overlays: dict[str, str]) -> None:
        for name, path in overlays.items():
            registry.reopen_member(name, path)
    return reopen


async def _until_stop(stopping: asyncio.Event, server: NbdServer, endpoints: Endpoints,
                      launch: Launch, handed_over: asyncio.Event) -> None:
    """Wait for a reason to stop: a signal, a successor serving, the end of the --run
    command, or (serving handed-over connections only) the end of the last one."""
    waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(handed_over.wait())]
    if launch.process is not None:
        waits.append(asyncio.ensure_future(launch.process.wait()))
    if endpoints.single:
        waits.append(asyncio.ensure_future(server.wait_idle()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def upgrade_refusal(launch: Launch, endpoints: Endpoints, argv: list[str]) -> str:
    """Why this server cannot hand over to a successor, or ''."""
    if not argv:
        return "upgrade: not with -s (the throw-away overlays live with this process)"
    if launch.command:
        return "upgrade: not with --run (the command is this server's child)"
    if endpoints.single:
        return "upgrade: not with --stdin or systemd's Accept=yes (one connection, no listener)"
    return ""


def _refused(reason: str):
    async def refuse() -> int:
        raise HandoverError(reason)
    return refuse


def first_export(cli: dict, config: ServerConfig) -> str:
    """The export a --run command is pointed at: the first of the command line's,
    else of the config's."""
    return next(iter(cli), None) or next(iter(config.exports), "")


class Reloader:
    """SIGHUP: reread the config and apply it without taking a serving export away.

    A config that cannot be read or parsed changes nothing (one log line, and
    systemd's STATUS says so).  Otherwise the server's limits and the metadata
    cache's budget apply at once,
    exports change as `ExportRegistry.plan` says, new and changed images are
    opened in a worker thread (a large read-write QCOW1 image scans its
    tables for seconds) while the loop goes on serving, and the TLS files are
    read again (new handshakes use the new certificate).  Listen addresses,
    the Unix and control sockets and the TLS mode need a new process: a
    changed one starts a live handover (`qcownbd.upgrade`), whose successor
    reads the file again.  Reloads run one at a time.
    """

    def __init__(self, server: NbdServer, registry: ExportRegistry, cli: dict,
                 load: Callable[[], ServerConfig] | None, config: ServerConfig,
                 hand_over: Callable[[], None] | None = None):
        self.server, self.registry, self.cli = server, registry, cli
        #: starts a live handover (None: this server cannot hand over)
        self.hand_over = hand_over
        self.load, self.config = load, config
        #: what the file said of the settings that apply only at a start
        self._start_only = _start_only(load)
        #: held by a reload, and by a live snapshot (which must keep its export)
        self.lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """The signal handler: reload in a task (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """One reload; whatever happens, systemd hears READY=1 again."""
        restart = False
        async with self.lock:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
            try:
                new = self.load() if self.load else ServerConfig()
            except ConfigError as exc:
                log.error("reload failed, keeping the old configuration: %s", exc)
                systemd.notify(f"READY=1\nSTATUS=reload failed: {exc}"[:1000])
                return
            restart = self._apply_server_settings(new)
            await self._open_and_install(self.registry.plan({**self.cli, **new.exports}))
            self._reload_tls()
            log.info("reloaded: %s", self.server.status())
            systemd.notify(f"READY=1\nSTATUS={self.server.status()}")
        if restart:
            self.hand_over()

    async def apply_pending(self) -> None:
        """Open the changed exports whose old image waited for its clients to leave."""
        if self.lock.locked():
            return
        async with self.lock:
            ready = self.registry.ready_pending()
            if ready:
                await self._open_and_install(ready)

    async def _open_and_install(self, configs: dict) -> None:
        opened = await asyncio.get_running_loop().run_in_executor(
            None, self.registry.open_all, configs)
        self.registry.install(opened)

    def _apply_server_settings(self, new: ServerConfig) -> bool:
        """The limits, at once; True when what only a start applies changed and a
        handover to a successor (which reads the file again) will apply it."""
        for key in NbdServer.LIMITS:
            setattr(self.server, key, getattr(new, key))
        metadata_cache.SHARED.resize(new.metadata_cache)
        if not self.load or (new.listen, new.unix, new.tls,
                             new.control_socket) == self._start_only:
            return False
        if self.hand_over is None:
            log.warning("reload: listen addresses, the Unix and control sockets and the TLS "
                        "mode apply at the next start")
            return False
        log.info("reload: listen addresses, the Unix or control socket or the TLS mode "
                 "changed: handing over to a new server process, which applies them")
        return True

    def _reload_tls(self) -> None:
        if self.server.tls_context is None:
            return
        try:
            self.server.tls_context = tls_context_for(self.config)
            log.info("reloaded TLS certificate %s", self.config.tls_cert)
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the old certificate: %s", exc)


class PoolReloader(Reloader):
    """A reload with worker processes: this process applies the limits and the
    settings that need a handover; each worker opens its own images."""

    def __init__(self, pool: WorkerPool, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    async def _open_and_install(self, configs: dict) -> None:
        await self.pool.reload()


def _start_only(load) -> tuple | None:
    """(listen, unix, tls, control_socket) as the config file says them (the command
    line may not)."""
    try:
        config = load() if load else None
    except ConfigError:
        return None
    return None if config is None else (config.listen, config.unix, config.tls,
                                        config.control_socket)


async def report_status(server: NbdServer, reloads: Reloader) -> None:
    """Keep systemd's STATUS= line current (connections come and go), and apply the
    reloaded changes that waited for an export's clients to leave."""
    last = None
    while True:
        await asyncio.sleep(1.0)
        await reloads.apply_pending()
        text = server.status()
        if text != last:
            systemd.notify(f"STATUS={text}")
            last = text
