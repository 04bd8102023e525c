"""Which exports a client may see and use, by its network address.

An export with ``allow`` networks is visible (LIST) and usable (INFO, GO,
EXPORT_NAME, meta contexts) only from addresses inside one of them; for any
other client it does not exist (ERR_UNKNOWN, the same answer as a name that
was never configured, so probing reveals nothing).  Unix-socket clients have
no address: file permissions on the socket guard them, so they are allowed
unless the export says ``allow_unix = false``.
"""

import functools
import ipaddress
from dataclasses import dataclass

from qcownbd.errors import NoSuchExport


@dataclass
class Client:
    """Who is connected: for access checks, fleet tenants and the log.

    ``address`` is None for Unix-socket clients; ``certificate`` is the
    subject (common name) of a verified TLS client certificate, once TLS
    is up.
    """

    label: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    certificate: str | None = None


def client_from_peername(peername) -> Client:
    """The `Client` of a transport's peername ("unix" when the socket has none)."""
    if not isinstance(peername, tuple):
        return Client(str(peername) if peername else "unix")
    host, port = peername[0], peername[1]
    address = ipaddress.ip_address(host.split("%", 1)[0])
    # a dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return Client(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", address)


@functools.lru_cache(maxsize=256)
def _networks(allow: tuple[str, ...]):
    return tuple(ipaddress.ip_network(network) for network in allow)


def allowed(config, address) -> bool:
    """May a client at ``address`` (None: Unix socket) use the export of ``config``?"""
    if address is None:
        return config.allow_unix
    if config.allow is None:
        return True
    return any(address in network for network in _networks(config.allow))


class PeerExports:
    """The export registry as one client sees it (``lookup`` and ``listing``)."""

    def __init__(self, registry, client: Client):
        self.registry = registry
        self.client = client

    def lookup(self, name: str):
        """The export named ``name``; NoSuchExport when missing or not for this client."""
        parent, slash, _member = name.partition("/")
        if slash and parent in self._names():
            # "fleet/ID": fence with the fleet's list before a member is looked up
            # (that may create an overlay, and its errors would reveal the fleet)
            self._check(self.registry.lookup(parent, self.client), name)
        export = self.registry.lookup(name, self.client)
        self._check(export, name)
        return export

    def _names(self) -> set[str]:
        return {entry[0] for entry in self.registry.listing()}

    def _check(self, export, name: str) -> None:
        if not allowed(export.config, self.client.address):
            # the client reads what a name never configured reads; the log says why
            raise NoSuchExport(f"export {export.name!r} refused by its allow list",
                               public=f"no export named {name!r}")

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of the exports this client may use."""
        return [(name, desc) for name, desc in self.registry.listing()
                if allowed(self.registry.lookup(name, self.client).config, self.client.address)]
