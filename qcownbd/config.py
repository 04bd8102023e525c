"""The server's configuration: a TOML file and the command line, as one value.

```toml
[server]
listen = ["127.0.0.1:10809", "[::1]:10809"]   # also HOST, :PORT, PORT; [] = no TCP
unix = "/run/qcownbd.sock"        # without listen: the Unix socket alone
max_connections = 256
handshake_timeout = 30
payload_timeout = 30              # a WRITE payload stalled this long ends its connection
max_handshakes = 64               # connections still negotiating; the oldest gives way
max_connections_per_client = 0    # per client address; 0 = no limit
tls = "off"                       # off | on | require
tls_cert = "/etc/qcownbd/server-cert.pem"
tls_key = "/etc/qcownbd/server-key.pem"
tls_ca = "/etc/qcownbd/ca-cert.pem"   # verify client certificates against it
backing_dirs = ["/srv/images"]    # backing files must lie here (every export)
metadata_cache = "32M"            # QCOW1 L2 tables of all exports and overlays, together

[exports.vm1]
path = "/srv/images/vm1.qcow"
format = "qcow1"            # auto | raw | qcow1
read_only = false
description = "first VM"
backing_format = "raw"
allow = ["127.0.0.0/8", "::1/128"]   # client networks; absent = everyone
allow_unix = true                    # Unix-socket clients (default true)
backing_dirs = ["/srv/base"]         # replaces [server] backing_dirs
```
An export table with `golden` instead of `path` is a fleet of per-client
copy-on-write overlays of one read-only golden image (`qcownbd.fleet`):
```toml
[exports.fleet]
golden = "/var/lib/qcownbd/golden.qcow"   # never written; opened read-only once
golden_format = "qcow1"                   # raw | qcow1 (pinned: QCOW1 cannot record it)
overlay_dir = "/var/lib/qcownbd/fleet"    # created if missing
overlays = "persistent"                   # persistent | ephemeral
description = "Debian 12 fleet"
max_overlays = 1000                       # overlay files at once; more first connects fail
tenant = "any"                            # any | address | certificate: who may open an overlay
```
With ``tenant = "address"`` (or ``"certificate"``) an overlay belongs to the
client address (or TLS client certificate subject) that created it, and no
other client can open it: fleet IDs stop being bearer names.
(and allow, allow_unix, backing_dirs as for any export).  Unknown keys are
errors that name them: a typo must not silently change what is served.
"""

import dataclasses
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import ClassVar

from qcownbd.console import parse_size
from qcownbd.errors import ConfigError, UsageError
from qcownbd.image import formats
from qcownbd.image.metadata_cache import DEFAULT_BUDGET, check_budget
from qcownbd.nbd.constants import DEFAULT_PORT, MAX_STRING

DEFAULT_HOST = "127.0.0.1"
DEFAULT_LISTEN = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
#: what an export's `format` may say
FORMATS = tuple(formats.choices(auto=True))
TLS_MODES = ("off", "on", "require")
#: a fleet's `overlays`: kept for good, or deleted when their last client leaves
#: (indexed by FleetConfig.ephemeral)
OVERLAY_MODES = ("persistent", "ephemeral")
#: a fleet's `tenant`: who may open an overlay once it exists
TENANT_MODES = ("any", "address", "certificate")
DEFAULT_MAX_OVERLAYS = 1000

log = logging.getLogger("qcownbd.config")


class _Reconfigurable:
    """What a reload may change on an open export without opening its image again."""

    #: fields that only say how the export is presented and who may use it
    in_place: ClassVar[tuple[str, ...]] = ("description", "allow", "allow_unix")

    def opens_like(self, other) -> bool:
        """True when ``other`` differs from this config in `in_place` fields at most."""
        return type(other) is type(self) and dataclasses.replace(
            self, **{key: getattr(other, key) for key in self.in_place}) == other


@dataclass(frozen=True)
class ExportConfig(_Reconfigurable):
    """How one export is opened and presented."""

    #: which provider of the export registry opens it
    kind: ClassVar[str] = "image"

    name: str
    path: str
    format: str = "auto"
    read_only: bool = False
    description: str = ""
    backing_format: str | None = None
    #: client networks allowed to see and use the export; None = everyone
    allow: tuple[str, ...] | None = None
    allow_unix: bool = True
    #: directories backing files must resolve into (realpath); () = anywhere
    backing_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetConfig(_Reconfigurable):
    """A fleet export: the golden image and where and how overlays are kept."""

    kind: ClassVar[str] = "fleet"
    in_place: ClassVar[tuple[str, ...]] = _Reconfigurable.in_place + ("max_overlays", "tenant")

    name: str
    golden: str
    golden_format: str
    overlay_dir: str
    overlays: str = "persistent"
    description: str = ""
    max_overlays: int = DEFAULT_MAX_OVERLAYS
    #: as for any export (qcownbd.access): client networks, Unix clients
    allow: tuple[str, ...] | None = None
    allow_unix: bool = True
    #: where the golden image's own backing files may lie
    backing_dirs: tuple[str, ...] = ()
    #: who may open an existing overlay: anyone, or only the client that created it
    tenant: str = "any"

    @property
    def path(self) -> str:
        """The image the fleet export itself serves (read-only): the golden one."""
        return self.golden

    @property
    def read_only(self) -> bool:
        """The golden image is never written."""
        return True

    @property
    def ephemeral(self) -> bool:
        """Whether overlays are deleted when their last client leaves."""
        return self.overlays == "ephemeral"

    def golden_export(self) -> ExportConfig:
        """The golden image as a plain read-only export of the fleet's name."""
        return ExportConfig(name=self.name, path=self.golden, format=self.golden_format,
                            read_only=True, backing_dirs=self.backing_dirs)

    def overlay_export(self, ident: str, path: str) -> ExportConfig:
        """The export of overlay ``ident`` (the QCOW1 file ``path``), as `NAME/ID`."""
        return ExportConfig(name=f"{self.name}/{ident}", path=path, format=formats.QCOW1.name,
                            description=f"overlay {ident} of {self.name}",
                            allow=self.allow,
                            allow_unix=self.allow_unix)


@dataclass
class ServerConfig:
    """Everything `qcownbd serve` needs: where to listen, limits, exports."""

    #: TCP addresses; None: not said (see `tcp_addresses`), [] none at all
    listen: list[str] | None = None
    unix: str | None = None
    #: the control socket (`qcownbd status`, `snapshot`); None: none
    control_socket: str | None = None
    max_connections: int = 256
    handshake_timeout: float = 30.0
    payload_timeout: float = 30.0
    max_handshakes: int = 64
    max_connections_per_client: int = 0
    #: worker processes serving the connections (0: one per core; 1: this process alone)
    workers: int = 0
    tls: str = "off"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_client: bool | None = None
    backing_dirs: list[str] = field(default_factory=list)
    #: bytes of QCOW1 L2 tables kept in memory, all images together
    metadata_cache: int = DEFAULT_BUDGET
    exports: dict[str, ExportConfig | FleetConfig] = field(default_factory=dict)


_SERVER_KEYS = {"listen": list, "unix": str, "control_socket": str, "max_connections": int,
                "handshake_timeout": (int, float), "payload_timeout": (int, float),
                "max_handshakes": int,
                "max_connections_per_client": int, "workers": int, "tls": str, "tls_cert": str,
                "tls_key": str, "tls_ca": str, "tls_verify_client": bool,
                "backing_dirs": list, "metadata_cache": (str, int)}
_EXPORT_KEYS = {"path": str, "format": str, "read_only": bool, "description": str,
                "backing_format": str, "allow": list,
                "allow_unix": bool, "backing_dirs": list}
_FLEET_KEYS = {"golden": str, "golden_format": str, "overlay_dir": str, "overlays": str,
               "description": str, "max_overlays": int, "allow": list,
               "allow_unix": bool, "backing_dirs": list, "tenant": str}


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"HOST:PORT", "[IPV6]:PORT", "HOST", "[IPV6]", ":PORT" or "PORT" -> (host, port);
    what is left out is the default address (127.0.0.1) or ``default_port``."""
    if not text:
        raise ConfigError("bad listen address '': empty")
    if text.isdigit():
        host, port = "", text
    elif text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad listen address {text!r} (use [IPV6] or [IPV6]:PORT)")
        port = rest[1:] if rest else str(default_port)
        if not host:
            raise ConfigError(f"bad listen address {text!r}: no IPv6 address in the brackets")
    elif text.count(":") > 1:
        raise ConfigError(f"bad listen address {text!r}: put IPv6 addresses in brackets")
    else:
        host, sep, port = text.partition(":")
        port = port if sep else str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad listen address {text!r}: the port must be 1 to 65535 "
                          "(use HOST:PORT, HOST, :PORT or PORT)")
    return host or DEFAULT_HOST, int(port)


def format_listen(host: str, port: int) -> str:
    """(host, port) as "HOST:PORT", IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_addresses(config: ServerConfig) -> list[str]:
    """Where to listen on TCP: what the config or command line said; the default
    address only when nothing at all said where to listen (no Unix socket either)."""
    if config.listen is not None:
        return config.listen
    return [] if config.unix else [DEFAULT_LISTEN]


def check_export_name(name: str) -> str:
    """Export names are short names, never paths: no leading "/", no "..", no controls."""
    if len(name.encode()) > MAX_STRING:
        raise ConfigError(f"bad export name {name[:40]!r}: longer than {MAX_STRING} bytes")
    if name.startswith("/") or ".." in name.split("/"):
        raise ConfigError(f"bad export name {name[:40]!r}: names are not paths")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ConfigError(f"bad export name {name[:40]!r}: control characters")
    return name


def parse_networks(networks: list, where: str) -> tuple[str, ...]:
    """Checked client networks ("10.0.0.0/8", "::1/128", "192.0.2.7") as strings."""
    checked = []
    for network in networks:
        try:
            checked.append(str(ipaddress.ip_network(network, strict=True)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: allow: bad network {network!r} ({exc})") from None
    return tuple(checked)


#: the longest path and path component the kernel takes (PATH_MAX, NAME_MAX)
PATH_MAX, NAME_MAX = 4096, 255


def config_path(value: str, where: str, key: str, base_dir: str = ".") -> str:
    """A path from the config, relative to ``base_dir``; a NUL byte or a path the
    kernel would refuse as too long is a one-line ConfigError, not a crash later."""
    shown = repr(value[:60] + ("..." if len(value) > 60 else ""))
    if "\0" in value:
        raise ConfigError(f"{where}: {key} {shown} contains a NUL byte")
    path = os.path.join(base_dir, os.path.expanduser(value))
    encoded = os.fsencode(path)
    if len(encoded) >= PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise ConfigError(f"{where}: {key} {shown} is too long for a path")
    return path


def _dir_list(value: list, where: str, base_dir: str) -> list[str]:
    if not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{where}: backing_dirs must be a list of directory names")
    return [config_path(item, where, "backing_dirs", base_dir) for item in value]


#: a per-export cache size of earlier versions, now one server-wide budget
RETIRED_KEY = "l2_cache_tables"


def _check_table(table, allowed: dict, where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    if RETIRED_KEY in table:
        # an upgrade must not make yesterday's config refuse to load
        log.warning("%s: l2_cache_tables is ignored: the L2 tables of every export share "
                    "one budget, [server] metadata_cache", where)
        table = {key: value for key, value in table.items() if key != RETIRED_KEY}
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(allowed))})")
    for key, value in table.items():
        kinds = allowed[key]
        # a bool is an int to isinstance, never to a config
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise ConfigError(f"{where}: {key} has the wrong type ({type(value).__name__})")


def _export(name: str, table: dict, base_dir: str,
            server_dirs: list[str]) -> ExportConfig | FleetConfig:
    where = f"[exports.{name}]"
    if isinstance(table, dict) and "golden" in table:
        return _fleet(name, table, base_dir, server_dirs)
    _check_table(table, _EXPORT_KEYS, where)
    if "path" not in table:
        raise ConfigError(f"{where}: path is missing")
    fmt = table.get("format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    allow = table.get("allow")
    dirs = table.get("backing_dirs")
    return ExportConfig(
        name=check_export_name(name),
        path=config_path(table["path"], where, "path", base_dir),
        format=fmt, read_only=table.get("read_only", False),
        description=table.get("description", ""),
        backing_format=table.get("backing_format"),
        allow=None if allow is None else parse_networks(allow, where),
        allow_unix=table.get("allow_unix", True),
        backing_dirs=tuple(server_dirs if dirs is None else _dir_list(dirs, where, base_dir)))


def _fleet(name: str, table: dict, base_dir: str, server_dirs: list[str]) -> FleetConfig:
    """A FleetConfig from an `[exports.NAME]` table that has a `golden` key."""
    where = f"[exports.{name}]"
    _check_table(table, _FLEET_KEYS, where)
    missing = [key for key in ("golden", "golden_format", "overlay_dir") if key not in table]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing (a fleet needs golden, "
                          "golden_format and overlay_dir)")
    if "/" in check_export_name(name):
        raise ConfigError(f"{where}: a fleet's name cannot contain '/' "
                          "(clients ask for NAME/ID)")
    golden_format = _golden_format(table["golden_format"], where)
    overlays = table.get("overlays", "persistent")
    if overlays not in OVERLAY_MODES:
        raise ConfigError(f"{where}: overlays must be {_either(OVERLAY_MODES)}")
    tenant = table.get("tenant", "any")
    if tenant not in TENANT_MODES:
        raise ConfigError(f"{where}: tenant must be {_either(TENANT_MODES)}")
    max_overlays = table.get("max_overlays", DEFAULT_MAX_OVERLAYS)
    if max_overlays < 1:
        raise ConfigError(f"{where}: max_overlays must be at least 1")

    def absolute(key: str) -> str:
        return os.path.abspath(config_path(table[key], where, key, base_dir))

    return FleetConfig(
        name=name, golden=absolute("golden"), golden_format=golden_format,
        overlay_dir=absolute("overlay_dir"),
        overlays=overlays, description=table.get("description", ""), tenant=tenant,
        allow=None if "allow" not in table else parse_networks(table["allow"], where),
        allow_unix=table.get("allow_unix", True),
        backing_dirs=tuple(_dir_list(table["backing_dirs"], where, base_dir)
                           if "backing_dirs" in table else server_dirs), max_overlays=max_overlays)


def _golden_format(fmt, where: str) -> str:
    """golden_format as a format's name ("auto" is refused: the pin is the point)."""
    found = formats.lookup(fmt)
    if found is None:
        raise ConfigError(f"{where}: golden_format must be {_either(formats.FORMATS)}")
    return found.name


def _either(names) -> str:
    """'"a" or "b"': the values a key may take, for its error message."""
    return " or ".join(f'"{name}"' for name in names)


def parse_config(data: dict, base_dir: str = ".") -> ServerConfig:
    """A ServerConfig from parsed TOML; relative paths are taken from ``base_dir``."""
    _check_table(data, {"server": dict, "exports": dict}, "config")
    server = data.get("server", {})
    _check_table(server, _SERVER_KEYS, "[server]")
    config = ServerConfig()
    if "listen" in server:
        config.listen = []
    for address in server.get("listen", []):
        if not isinstance(address, str):
            raise ConfigError("[server]: listen must be a list of strings")
        parse_listen(address)
        config.listen.append(address)
    for key in ("unix", "control_socket"):
        if key in server:
            setattr(config, key, config_path(server[key], "[server]", key, base_dir))
    config.max_connections = server.get("max_connections", config.max_connections)
    config.handshake_timeout = float(server.get("handshake_timeout", config.handshake_timeout))
    config.payload_timeout = float(server.get("payload_timeout", config.payload_timeout))
    if min(config.max_connections, config.handshake_timeout, config.payload_timeout) <= 0:
        raise ConfigError("[server]: max_connections, handshake_timeout and payload_timeout "
                          "must be positive")
    _limits_and_tls(config, server, base_dir)
    for name, table in data.get("exports", {}).items():
        config.exports[name] = _export(name, table, base_dir, config.backing_dirs)
    return config


def _limits_and_tls(config: ServerConfig, server: dict, base_dir: str) -> None:
    """The [server] keys of the hardening: handshake budget, per-client limit, TLS."""
    config.max_handshakes = server.get("max_handshakes", config.max_handshakes)
    config.max_connections_per_client = server.get("max_connections_per_client", 0)
    config.workers = server.get("workers", 0)
    if config.max_handshakes < 1 or config.max_connections_per_client < 0 \
            or config.workers < 0:
        raise ConfigError("[server]: max_handshakes must be positive, "
                          "max_connections_per_client 0 (no limit) or more and "
                          "workers 0 (one per core) or more")
    config.backing_dirs = _dir_list(server.get("backing_dirs", []), "[server]", base_dir)
    if "metadata_cache" in server:
        config.metadata_cache = parse_budget(server["metadata_cache"], "[server]: metadata_cache")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if key in server:
            setattr(config, key, config_path(server[key], "[server]", key, base_dir))
    config.tls = server.get("tls", "off")
    config.tls_verify_client = server.get("tls_verify_client")
    check_tls(config, "[server]")


def parse_budget(value: str | int, where: str) -> int:
    """The metadata cache budget: bytes, or a size such as "32M"."""
    try:
        return check_budget(value if isinstance(value, int) else parse_size(value))
    except (UsageError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_tls(config: ServerConfig, where: str) -> None:
    """TLS settings that fit together (files are read when the server starts)."""
    if config.tls not in TLS_MODES:
        raise ConfigError(f"{where}: tls {config.tls!r} is not one of {', '.join(TLS_MODES)}")
    if config.tls != "off" and not (config.tls_cert and config.tls_key):
        raise ConfigError(f"{where}: tls = {config.tls!r} needs tls_cert and tls_key")
    if config.tls_verify_client and not config.tls_ca:
        raise ConfigError(f"{where}: tls_verify_client needs tls_ca")


def make_read_only(config: ServerConfig) -> None:
    """`serve --read-only`: every export of ``config`` read-only.  A fleet is refused:
    its overlays exist to be written, and a read-only one would be the golden image."""
    fleets = sorted(name for name, export in config.exports.items()
                    if isinstance(export, FleetConfig))
    if fleets:
        raise ConfigError(f"--read-only cannot apply to the fleet export(s) {', '.join(fleets)} "
                          "(their overlays exist to be written)")
    config.exports = {name: dataclasses.replace(export, read_only=True)
                      for name, export in config.exports.items()}


def load_config(path: str) -> ServerConfig:
    """Read and check a TOML configuration file."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    try:
        return parse_config(data, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
