"""`qcownbd serve`: run the NBD server for exports named on the command line or in a config.

    qcownbd serve [--listen HOST:PORT]... [--unix PATH] [--read-only]
                  [--format auto|raw|qcow1] [--config FILE] [--demo]
                  [--tls off|on|require --tls-cert FILE --tls-key FILE [--tls-ca FILE]]
                  [NAME=PATH | PATH]...

Signals: SIGTERM/SIGINT stop (in-flight requests finish, images are
committed and closed, exit 0); SIGHUP reloads the config file's exports
and rereads the TLS certificate, key and CA files (same paths: certificates
are rotated by replacing the files; the TLS mode needs a restart).  Under
systemd the inherited sockets are used and READY/RELOADING/STOPPING/STATUS
are reported.
"""

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from qcownbd import systemd
from qcownbd.cli import setup_logging
from qcownbd.config import (
    DEFAULT_LISTEN, TLS_MODES, ExportConfig, ServerConfig, check_export_name, check_tls,
    load_config, parse_listen,
)
from qcownbd.errors import ConfigError, UsageError
from qcownbd.exports import ExportRegistry
from qcownbd.image import formats
from qcownbd.image.probe import open_image
from qcownbd.image.qcow1 import create_qcow1
from qcownbd.nbd.server import NbdServer, raise_fd_limit
from qcownbd.nbd.tls import server_context

log = logging.getLogger("qcownbd.server")

DEMO_SIZE = 64 * 1024 * 1024
DEMO_BANNER = (b"qcownbd demo disk\n"
               b"This QCOW1 image is served by qcownbd; write to it freely.\n")


def register(sub, common) -> None:
    """Add the `serve` subcommand to the qcownbd parser."""
    parser = sub.add_parser("serve", parents=[common], help="serve images over NBD",
                            description="Serve QCOW1 and raw images over NBD.")
    parser.add_argument("--listen", action="append", metavar="HOST:PORT",
                        help=f"address to listen on, repeatable; [::1]:PORT for IPv6 "
                             f"(default {DEFAULT_LISTEN})")
    parser.add_argument("--unix", metavar="PATH", help="also listen on this Unix socket")
    parser.add_argument("--read-only", action="store_true",
                        help="refuse writes to the command-line exports")
    parser.add_argument("--format", choices=formats.choices(auto=True), default="auto",
                        help="format of the command-line images (default: probe)")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (SIGHUP reloads it)")
    parser.add_argument("--demo", action="store_true",
                        help="serve a small demo QCOW1 image as export 'demo'")
    parser.add_argument("--tls", choices=TLS_MODES,
                        help="NBD_OPT_STARTTLS: off, on (offered) or require (default: config, off)")
    parser.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="CA (PEM) that must have signed every client's certificate")
    parser.add_argument("exports", nargs="*", metavar="NAME=PATH | PATH",
                        help="images to serve; a bare PATH is named after its file")
    parser.set_defaults(func=run)


def cli_exports(args) -> dict[str, ExportConfig]:
    """ExportConfigs for the NAME=PATH / PATH arguments (and --demo)."""
    exports = {}
    specs = list(args.exports)
    if args.demo:
        specs.append(f"demo={demo_image()}")
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = Path(spec).stem, spec
        if not path:
            raise UsageError(f"export {spec!r} has no path")
        if name in exports:
            raise UsageError(f"export name {name!r} is given twice")
        exports[name] = ExportConfig(name=check_export_name(name), path=os.path.abspath(path),
                                     format=args.format, read_only=args.read_only)
    return exports


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


def build_config(args) -> tuple[ServerConfig, dict[str, ExportConfig]]:
    """The file's config (if any) and the command-line exports, checked."""
    config = load_config(args.config) if args.config else ServerConfig()
    cli = cli_exports(args)
    clash = sorted(set(cli) & set(config.exports))
    if clash:
        raise ConfigError(f"export(s) {', '.join(clash)} given both in the config and as arguments")
    if args.listen:
        config.listen = list(args.listen)
    for address in config.listen:
        parse_listen(address)
    if args.unix:
        config.unix = args.unix
    tls_from_args(config, args)
    if not cli and not config.exports:
        raise UsageError("nothing to serve: give NAME=PATH, --config FILE or --demo")
    cli = {name: dataclasses.replace(export, backing_dirs=tuple(config.backing_dirs))
           for name, export in cli.items()}
    return config, cli


def tls_from_args(config: ServerConfig, args) -> None:
    """--tls* flags override the config file's TLS settings."""
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(args, key)
        if value:
            setattr(config, key, os.path.abspath(value))
    if args.tls:
        config.tls = args.tls
    check_tls(config, "command line")


def tls_context_for(config: ServerConfig):
    """The server's ssl context from the configured files, or None with TLS off."""
    if config.tls == "off":
        return None
    return server_context(config.tls_cert, config.tls_key, config.tls_ca,
                          config.tls_verify_client)


def run(args) -> int:
    """Entry point of `qcownbd serve`."""
    setup_logging(args, "info")
    config, cli = build_config(args)
    tls_context = tls_context_for(config)
    raise_fd_limit()
    registry = ExportRegistry()
    # a command-line export that cannot open is the operator's typo: fail at once
    for export_config in cli.values():
        registry.add(registry.open_export(export_config))
    try:
        registry.apply({**cli, **config.exports})
        return asyncio.run(serve(config, cli, registry, args.config, tls_context))
    finally:
        registry.close_all()


async def serve(config: ServerConfig, cli: dict, registry: ExportRegistry,
                config_path: str | None, tls_context=None) -> int:
    """Listen, serve until SIGTERM/SIGINT, then stop cleanly."""
    server = NbdServer(registry, max_connections=config.max_connections,
                       handshake_timeout=config.handshake_timeout,
                       payload_timeout=config.payload_timeout,
                       max_handshakes=config.max_handshakes,
                       max_connections_per_client=config.max_connections_per_client,
                       tls=config.tls, tls_context=tls_context)
    inherited = systemd.inherited_sockets()
    if inherited:
        await server.adopt(inherited)
    else:
        for address in config.listen or [DEFAULT_LISTEN]:
            await server.listen_tcp(*parse_listen(address))
        if config.unix:
            await server.listen_unix(config.unix)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads = Reloader(server, registry, cli, config_path, config)
    loop.add_signal_handler(signal.SIGHUP, reloads.start)
    commit_task = loop.create_task(server.commit_metadata_forever())
    status_task = loop.create_task(report_status(server))
    systemd.notify(f"READY=1\nSTATUS={server.status()}")
    await stopping.wait()
    log.info("stopping")
    systemd.notify("STOPPING=1")
    commit_task.cancel()
    status_task.cancel()
    await server.stop()
    return 0


class Reloader:
    """SIGHUP: reread the config; new exports appear, removed ones refuse new clients.

    New and changed exports are opened in a worker thread (opening a large
    read-write QCOW1 image scans its tables for seconds) while the loop goes
    on serving; reloads run one at a time.  The TLS files are read again too:
    new handshakes use the new certificate, established sessions keep theirs.
    """

    def __init__(self, server: NbdServer, registry: ExportRegistry, cli: dict, config_path,
                 config: ServerConfig):
        self.server, self.registry, self.cli = server, registry, cli
        self.config_path, self.config = config_path, config
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """The signal handler: reload in a task (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """One reload: exports, then the TLS files."""
        async with self._lock:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
            try:
                exports = load_config(self.config_path).exports if self.config_path else {}
            except ConfigError as exc:
                log.error("reload failed, keeping the old exports: %s", exc)
            else:
                to_open = self.registry.retire_changed({**self.cli, **exports})
                opened = await asyncio.get_running_loop().run_in_executor(
                    None, self.registry.open_all, to_open)
                self.registry.install(opened)
                log.info("reloaded: %s", self.server.status())
            self._reload_tls()
            systemd.notify(f"READY=1\nSTATUS={self.server.status()}")

    def _reload_tls(self) -> None:
        if self.server.tls_context is None:
            return
        try:
            self.server.tls_context = tls_context_for(self.config)
            log.info("reloaded TLS certificate %s", self.config.tls_cert)
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the old certificate: %s", exc)


async def report_status(server: NbdServer) -> None:
    """Keep systemd's STATUS= line current (connections come and go)."""
    last = None
    while True:
        await asyncio.sleep(1.0)
        text = server.status()
        if text != last:
            systemd.notify(f"STATUS={text}")
            last = text
