"""The server's configuration: a TOML file and the command line, as one value.

```toml
[server]
listen = ["127.0.0.1:10809", "[::1]:10809"]
unix = "/run/qcownbd.sock"
max_connections = 256
handshake_timeout = 30

[exports.vm1]
path = "/srv/images/vm1.qcow"
format = "qcow1"            # auto | raw | qcow1
read_only = false
description = "first VM"
backing_format = "raw"
l2_cache_tables = 64
```
Unknown keys are errors that name them: a typo must not silently change
what is served.
"""

import os
import tomllib
from dataclasses import dataclass, field

from qcownbd.errors import ConfigError
from qcownbd.nbd.constants import DEFAULT_PORT, MAX_STRING

DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
FORMATS = ("auto", "raw", "qcow1", "qcow")


@dataclass(frozen=True)
class ExportConfig:
    """How one export is opened and presented."""

    name: str
    path: str
    format: str = "auto"
    read_only: bool = False
    description: str = ""
    backing_format: str | None = None
    l2_cache_tables: int | None = None


@dataclass
class ServerConfig:
    """Everything `qcownbd serve` needs: where to listen, limits, exports."""

    listen: list[str] = field(default_factory=list)
    unix: str | None = None
    max_connections: int = 256
    handshake_timeout: float = 30.0
    exports: dict[str, ExportConfig] = field(default_factory=dict)


_SERVER_KEYS = {"listen": list, "unix": str, "max_connections": int,
                "handshake_timeout": (int, float)}
_EXPORT_KEYS = {"path": str, "format": str, "read_only": bool, "description": str,
                "backing_format": str, "l2_cache_tables": int}


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPV6]:PORT" -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad listen address {text!r} (use HOST:PORT or [IPV6]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"bad listen address {text!r}: put IPv6 addresses in brackets")
    if not host:
        raise ConfigError(f"bad listen address {text!r}: no host")
    return host, int(port)


def check_export_name(name: str) -> str:
    """Export names are short UTF-8 strings without NUL (never paths to open)."""
    if "\0" in name or len(name.encode()) > MAX_STRING:
        raise ConfigError(f"bad export name {name[:40]!r}")
    return name


def _check_table(table, allowed: dict, where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(allowed))})")
    for key, value in table.items():
        kinds = allowed[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is int):
            raise ConfigError(f"{where}: {key} has the wrong type ({type(value).__name__})")


def _export(name: str, table: dict, base_dir: str) -> ExportConfig:
    where = f"[exports.{name}]"
    _check_table(table, _EXPORT_KEYS, where)
    if "path" not in table:
        raise ConfigError(f"{where}: path is missing")
    fmt = table.get("format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    cache = table.get("l2_cache_tables")
    if cache is not None and cache < 1:
        raise ConfigError(f"{where}: l2_cache_tables must be at least 1")
    return ExportConfig(
        name=check_export_name(name),
        path=os.path.join(base_dir, os.path.expanduser(table["path"])),
        format=fmt, read_only=table.get("read_only", False),
        description=table.get("description", ""),
        backing_format=table.get("backing_format"), l2_cache_tables=cache)


def parse_config(data: dict, base_dir: str = ".") -> ServerConfig:
    """A ServerConfig from parsed TOML; relative paths are taken from ``base_dir``."""
    _check_table(data, {"server": dict, "exports": dict}, "config")
    server = data.get("server", {})
    _check_table(server, _SERVER_KEYS, "[server]")
    config = ServerConfig()
    for address in server.get("listen", []):
        if not isinstance(address, str):
            raise ConfigError("[server]: listen must be a list of strings")
        parse_listen(address)
        config.listen.append(address)
    config.unix = server.get("unix")
    config.max_connections = server.get("max_connections", config.max_connections)
    config.handshake_timeout = float(server.get("handshake_timeout", config.handshake_timeout))
    if config.max_connections < 1 or config.handshake_timeout <= 0:
        raise ConfigError("[server]: max_connections and handshake_timeout must be positive")
    for name, table in data.get("exports", {}).items():
        config.exports[name] = _export(name, table, base_dir)
    return config


def load_config(path: str) -> ServerConfig:
    """Read and check a TOML configuration file."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return parse_config(data, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
