"""`qcownbd serve`: run the NBD server for exports named on the command line or in a config.

    qcownbd serve [--listen HOST:PORT]... [--unix PATH] [--read-only]
                  [--format auto|raw|qcow1] [--config FILE] [--demo]
                  [--tls off|on|require --tls-cert FILE --tls-key FILE [--tls-ca FILE]]
                  [NAME=PATH | PATH]...

Signals and the life cycle of the server are `qcownbd.service`'s.
"""

import dataclasses
import os
from pathlib import Path

from qcownbd import service
from qcownbd.config import (
    DEFAULT_LISTEN, TLS_MODES, ExportConfig, ServerConfig, check_export_name, check_tls,
    load_config, parse_listen,
)
from qcownbd.console import setup_logging
from qcownbd.errors import ConfigError, UsageError
from qcownbd.image import formats


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
        specs.append(f"demo={service.demo_image()}")
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


def run(args) -> int:
    """Entry point of `qcownbd serve`."""
    setup_logging(args, "info")
    config, cli = build_config(args)
    return service.run(config, cli, args.config)
