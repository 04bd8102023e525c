"""`qcownbd serve`: run the NBD server for exports named on the command line or in a config.

    qcownbd serve [--listen HOST:PORT]... [-p PORT] [--unix PATH] [-r]
                  [--format auto|raw|qcow1] [-x NAME] [-D TEXT] [-s]
                  [--offset BYTES] [--size BYTES | --partition N] [--config FILE] [--demo]
                  [--tls off|on|require --tls-cert FILE --tls-key FILE [--tls-ca FILE]]
                  [--fork] [--pid-file FILE] [--run CMD] [--stdin] [--fd-store]
                  [NAME=PATH | PATH]...

Signals and the life cycle of the server are `qcownbd.service`'s.
"""

import argparse
import dataclasses
import os
import signal
from pathlib import Path

from qcownbd import service
from qcownbd.config import (
    DEFAULT_HOST, DEFAULT_LISTEN, TLS_MODES, ExportConfig, ServerConfig, check_export_name,
    check_tls, format_listen, load_config, make_read_only, parse_budget, parse_listen,
)
from qcownbd.console import parse_size, setup_logging
from qcownbd.errors import ConfigError, ImageFormatError, UsageError
from qcownbd.image import formats
from qcownbd.image.snapshot import ThrowawayOverlays
from qcownbd.image.window import WindowSpec
from qcownbd.launch import Launch
from qcownbd.nbd.constants import DEFAULT_PORT


def register(sub, common) -> None:
    """Add the `serve` subcommand to the qcownbd parser."""
    parser = sub.add_parser("serve", parents=[common], help="serve images over NBD",
                            description="Serve QCOW1 and raw images over NBD.")
    _listen_options(parser.add_argument_group("where to listen"))
    _export_options(parser.add_argument_group("what to serve"))
    _tls_options(parser.add_argument_group("TLS"))
    _script_options(parser.add_argument_group("scripts, daemons and inetd"))
    parser.add_argument("exports", nargs="*", metavar="NAME=PATH | PATH",
                        help="images to serve; a bare PATH is named after its file")
    parser.set_defaults(func=run)


def _listen_options(group) -> None:
    group.add_argument("--listen", action="append", metavar="HOST:PORT",
                       help=f"TCP address to listen on, repeatable: HOST:PORT, HOST, :PORT, "
                            f"PORT; [::1]:PORT for IPv6 (default {DEFAULT_LISTEN}, unless "
                            f"--unix or the config says where to listen)")
    group.add_argument("-p", "--port", type=_port, metavar="PORT",
                       help=f"the port of the default address, and of --listen HOSTs "
                            f"given without one (default {DEFAULT_PORT})")
    group.add_argument("--unix", metavar="PATH",
                       help="listen on this Unix socket (alone, unless --listen, -p or "
                            "the config's listen)")
    group.add_argument("--workers", type=_workers, metavar="N",
                       help="worker processes serving the clients (default: the config's "
                            "workers, else one per core; 1: this process alone)")
    group.add_argument("--control", metavar="PATH",
                       help="answer qcownbd status and qcownbd snapshot on this Unix socket "
                            "(owner-only; default: the config's control_socket, else none)")


def _export_options(group) -> None:
    group.add_argument("-r", "--read-only", action="store_true",
                       help="refuse writes to every export, the config's too")
    group.add_argument("--format", choices=formats.choices(auto=True),
                       help="format of the command-line images (default: probe)")
    group.add_argument("-x", "--export-name", metavar="NAME",
                       help="name of the one command-line image (default: its file's stem)")
    group.add_argument("-D", "--description", metavar="TEXT",
                       help="description of the command-line images (nbdinfo --list shows it)")
    group.add_argument("-s", "--snapshot", action="store_true",
                       help="throw-away writes: serve the command-line images through "
                            "temporary overlays, deleted at exit; the images never change")
    group.add_argument("--offset", type=_bytes, metavar="BYTES",
                       help="serve the command-line images from this byte on (64M, 1G...)")
    group.add_argument("--size", type=_bytes, metavar="BYTES",
                       help="serve only this many bytes of them (default: to the end)")
    group.add_argument("--partition", type=_partition, metavar="N",
                       help="serve only partition N of them: an MBR primary partition (1-4) "
                            "or a GPT entry")
    group.add_argument("--config", metavar="FILE", help="TOML configuration (SIGHUP reloads it)")
    group.add_argument("--metadata-cache", type=_budget, metavar="SIZE",
                       help="memory for QCOW1 metadata (L2 tables), one budget shared by "
                            "every export and overlay (default 32M; overrides the config)")
    group.add_argument("--demo", action="store_true",
                       help="serve a small demo QCOW1 image as export 'demo'")


def _tls_options(group) -> None:
    group.add_argument("--tls", choices=TLS_MODES,
                       help="NBD_OPT_STARTTLS: off, on (offered) or require (default: config, off)")
    group.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    group.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="CA (PEM) that must have signed every client's certificate")


def _script_options(group) -> None:
    group.add_argument("--fork", action="store_true",
                       help="detach once listening: `qcownbd serve --fork ... && client` works")
    group.add_argument("--pid-file", metavar="FILE",
                       help="write the server's pid here once listening; removed at exit")
    group.add_argument("--run", metavar="CMD",
                       help="once listening, run CMD with /bin/sh, $uri (also $nbd), $port, "
                            "$unixsocket and $exportname set; stop when it exits, with its "
                            "status (nbdkit's captive mode)")
    group.add_argument("--stdin", action="store_true",
                       help="serve the one connection on standard input and exit when it "
                            "ends (inetd, systemd Accept=yes, nbdinfo [ CMD ])")
    group.add_argument("--fd-store", action="store_true",
                       help="under systemd, SIGTERM keeps the listening sockets and the "
                            "connections in systemd's file descriptor store for the next "
                            "start: systemctl restart without losing a client (the unit "
                            "needs FileDescriptorStoreMax=)")


def launch_from_args(args) -> Launch:
    """The Launch of --fork, --pid-file, --run and --stdin, refusing combinations that
    cannot mean anything."""
    if args.fork and args.run:
        raise UsageError("--run keeps the server in the foreground: drop --fork")
    if args.stdin:
        clash = [option for option, value in (
            ("--listen", args.listen), ("-p/--port", args.port), ("--unix", args.unix),
            ("--fork", args.fork), ("--pid-file", args.pid_file), ("--run", args.run))
            if value]
        if clash:
            raise UsageError(f"--stdin serves the connection on standard input, without "
                             f"listening: drop {', '.join(clash)}")
    return Launch(fork=args.fork, pid_file=args.pid_file, command=args.run, stdin=args.stdin,
                  fd_store=args.fd_store)


#: options that shape the command-line images, and what they are called in errors
IMAGE_OPTIONS = {"format": "--format", "export_name": "-x/--export-name",
                 "description": "-D/--description", "snapshot": "-s/--snapshot",
                 "offset": "--offset", "size": "--size", "partition": "--partition"}


def cli_exports(args) -> dict[str, ExportConfig]:
    """ExportConfigs for the NAME=PATH / PATH arguments (and --demo)."""
    specs = list(args.exports)
    if args.demo:
        specs.append(f"demo={service.demo_image()}")
    given = [option for key, option in IMAGE_OPTIONS.items()
             if getattr(args, key) not in (None, False)]
    if given and not specs:
        # a flag that would change nothing is refused, never ignored
        raise UsageError(f"{', '.join(given)} shape(s) the command-line images, and there is "
                         "none (the config file sets its exports' own)")
    named = [_split_spec(spec) for spec in specs]
    if args.export_name is not None and (len(named) != 1 or named[0][0] is not None):
        raise UsageError("-x/--export-name names the one command-line image given as PATH "
                         "(or write NAME=PATH)")
    exports = {}
    for spec, (name, path) in zip(specs, named):
        if name is None:
            name = args.export_name or Path(path).stem
        if not path:
            raise UsageError(f"export {spec!r} has no path")
        if name in exports:
            raise UsageError(f"export name {name!r} is given twice")
        exports[name] = ExportConfig(name=check_export_name(name), path=os.path.abspath(path),
                                     format=args.format or "auto", read_only=args.read_only,
                                     description=args.description or "")
    return exports


def _split_spec(spec: str) -> tuple[str | None, str]:
    """NAME=PATH -> (NAME, PATH); a bare PATH (or one whose "NAME" has a "/") ->
    (None, PATH)."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name:
        return None, spec
    return name, path


def config_loader(args):
    """The function that reads the config file (at the start and on SIGHUP) with the
    command line's --read-only and --metadata-cache applied, or None without --config."""
    if not args.config:
        return None
    path = os.path.abspath(args.config)

    def load() -> ServerConfig:
        """The config file as it is now, the command line's overrides applied."""
        config = load_config(path)
        if args.read_only:
            make_read_only(config)
        if args.metadata_cache:
            config.metadata_cache = args.metadata_cache
        return config
    return load


def build_config(args) -> tuple[ServerConfig, dict[str, ExportConfig], object]:
    """The file's config (if any) and the command-line exports, checked."""
    load = config_loader(args)
    config = load() if load else ServerConfig()
    if args.metadata_cache:
        config.metadata_cache = args.metadata_cache
    cli = cli_exports(args)
    clash = sorted(set(cli) & set(config.exports))
    if clash:
        raise ConfigError(f"export(s) {', '.join(clash)} given both in the config and as arguments")
    if args.listen or args.port:
        port = args.port or DEFAULT_PORT
        config.listen = [format_listen(*parse_listen(address, port))
                         for address in args.listen or [DEFAULT_HOST]]
    if args.unix:
        config.unix = os.path.abspath(args.unix)
    if args.workers is not None:
        config.workers = args.workers
    if args.control:
        config.control_socket = os.path.abspath(args.control)
    tls_from_args(config, args)
    if not cli and not config.exports:
        raise UsageError("nothing to serve: give NAME=PATH, --config FILE or --demo")
    cli = {name: dataclasses.replace(export, backing_dirs=tuple(config.backing_dirs))
           for name, export in cli.items()}
    return config, cli, load


def _port(text: str) -> int:
    """-p PORT: a TCP port number."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (1 to 65535)")
    return int(text)


def _workers(text: str) -> int:
    """--workers N: a number of processes (0: one per core)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid number of workers {text!r} (0, 1, 2, ...)")
    return int(text)


def tls_from_args(config: ServerConfig, args) -> None:
    """--tls* flags override the config file's TLS settings."""
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(args, key)
        if value:
            setattr(config, key, os.path.abspath(value))
    if args.tls:
        config.tls = args.tls
    check_tls(config, "command line")


def run(args) -> int:
    """Entry point of `qcownbd serve`."""
    setup_logging(args, "info")
    launch, window = launch_from_args(args), window_from_args(args)
    config, cli, load = build_config(args)
    with ThrowawayOverlays() as overlays:
        if args.snapshot:
            # until the server's own handlers are up, SIGTERM must still unwind (and
            # so delete the overlays), not kill outright
            signal.signal(signal.SIGTERM, _unwind)
            cli = {name: throwaway(export, overlays) for name, export in cli.items()}
        # -s: no successor (the throw-away overlays are deleted when this process ends)
        argv = None if args.snapshot else args.argv
        return service.run(config, cli, load, launch, window, argv)


def window_from_args(args) -> WindowSpec | None:
    """The part of the command-line images to serve (--offset/--size or --partition)."""
    if args.partition is not None and (args.offset is not None or args.size is not None):
        raise UsageError("--partition says where the window lies: drop --offset and --size")
    if args.partition is not None:
        return WindowSpec(partition=args.partition)
    if args.offset is None and args.size is None:
        return None
    return WindowSpec(offset=args.offset or 0, size=args.size)


def _bytes(text: str) -> int:
    """--offset/--size: bytes, with K, M, G... suffixes; 0 too."""
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget(text: str) -> int:
    """--metadata-cache: a size, at least the cache's minimum."""
    try:
        return parse_budget(text, "--metadata-cache")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _partition(text: str) -> int:
    """--partition N: a partition number, from 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid partition number {text!r} (1, 2, ...)")
    return int(text)


def throwaway(export: ExportConfig, overlays: ThrowawayOverlays) -> ExportConfig:
    """-s: ``export`` served through a new overlay of its image (opened read-only)."""
    try:
        overlay = overlays.overlay(export.path, export.format)
    except ImageFormatError as exc:
        raise ImageFormatError(f"export {export.name}: {exc}") from None
    # the image itself must pass a backing_dirs fence, as the overlay's backing file
    dirs = export.backing_dirs and (*export.backing_dirs, os.path.realpath(export.path))
    return dataclasses.replace(
        export, path=overlay, format=formats.QCOW1.name, backing_dirs=dirs,
        backing_format=None if export.format == "auto" else export.format)


def _unwind(signum, _frame):
    raise SystemExit(128 + signum)
