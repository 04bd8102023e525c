"""What a running server answers on its control socket: ``status``, ``snapshot``, ``upgrade``.

The answers are plain JSON-able data; `qcownbd.cli.control` turns them into
what a person reads.  Both run on the event loop, between requests, and a
snapshot takes the reload lock, so a SIGHUP cannot swap the export under it.
"""

import os
import time

from qcownbd import __version__
from qcownbd.errors import ControlError
from qcownbd.image import metadata_cache
from qcownbd.live_snapshot import take_snapshot


class ControlCommands:
    """The handlers of `qcownbd.control.ControlServer` for one server."""

    def __init__(self, server, registry, images, reload_lock, upgrade, pool=None):
        self.server, self.registry, self.images = server, registry, images
        self.reload_lock = reload_lock
        #: hands over to a successor and returns its pid (`qcownbd.upgrade.Upgrade.run`)
        self._upgrade = upgrade
        #: the worker processes serving the clients (`qcownbd.workers`), or None
        self.pool = pool
        self.started = time.monotonic()

    def handlers(self) -> dict:
        """{command: handler} for the control server."""
        return {"status": self.status, "snapshot": self.snapshot, "upgrade": self.upgrade}

    async def status(self, _request: dict) -> dict:
        """Exports, the metadata cache, clients and what the ended clients did (with
        worker processes: theirs, and each worker's pid, exports, connections and
        metadata cache)."""
        own = self._own_status()
        if self.pool is None:
            return own
        workers = await self.pool.status()
        return merge_worker_status(own, workers)

    def _own_status(self) -> dict:
        server, ended = self.server, self.server.ended
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "listening": [_address(a) for a in server.addresses()],
            "exports": [_export(e) for e in self.registry.open_exports()],
            "unavailable": [{"name": name, "reason": reason}
                            for name, reason in self.registry.unavailable()],
            "metadata_cache": metadata_cache.SHARED.stats(),
            "clients": [_client(c) for c in sorted(server.connections,
                                                   key=lambda c: c.stats.started)],
            "ended": {"clients": server.ended_connections, "requests": ended.requests,
                      "bytes_read": ended.bytes_read, "bytes_written": ended.bytes_written,
                      "errors": ended.errors},
        }

    async def snapshot(self, request: dict) -> dict:
        """A live snapshot of ``request["export"]`` (named ``request.get("name")``)."""
        name, snapshot_name = request.get("export"), request.get("name")
        if not isinstance(name, str) or not name:
            raise ControlError("snapshot: give the name of an export")
        if snapshot_name is not None and not isinstance(snapshot_name, str):
            raise ControlError("snapshot: the snapshot's name must be a string")
        async with self.reload_lock:
            if self.pool is not None:
                return await self.pool.snapshot(request)
            export = self.registry.served(name)
            return await take_snapshot(self.server, export, self.images.open_backend,
                                       snapshot_name)


    async def upgrade(self, _request: dict) -> dict:
        """Hand over to a successor (`qcownbd.upgrade`); its pid once it serves."""
        return {"previous_pid": os.getpid(), "pid": await self._upgrade()}


def merge_worker_status(own: dict, workers: list[dict]) -> dict:
    """The status of a server with worker processes: the exports and clients of all,
    the ended clients and the metadata caches summed, and ``workers``: each one's
    index, pid, the exports it has open (a fleet's overlays among them), its
    connections and its metadata cache."""
    merged = dict(own)
    exports: dict[str, dict] = {}
    for status in workers:
        for export in status["exports"]:
            seen = exports.get(export["name"])
            if seen is None:
                exports[export["name"]] = dict(export)
            else:   # a fleet's golden image: open in every worker
                seen["clients"] += export["clients"]
    merged["exports"] = list(exports.values())
    merged["unavailable"] = sorted({(u["name"], u["reason"]) for s in workers
                                    for u in s["unavailable"]})
    merged["unavailable"] = [{"name": n, "reason": r} for n, r in merged["unavailable"]]
    merged["clients"] = own["clients"] + [c for s in workers for c in s["clients"]]
    ended = dict(own["ended"])
    for status in workers:
        for key, value in status["ended"].items():
            ended[key] += value
    merged["ended"] = ended
    if workers:     # this process opens no image: the workers' caches are the cache
        merged["metadata_cache"] = {key: sum(s["metadata_cache"][key] for s in workers)
                                    for key in own["metadata_cache"]}
    merged["workers"] = [{"index": s["index"], "pid": s["pid"],
                          "exports": [e["name"] for e in s["exports"]],
                          "connections": len(s["clients"]),
                          "metadata_cache": s["metadata_cache"]} for s in workers]
    return merged


def _address(address) -> str:
    if isinstance(address, str):
        return address
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _export(export) -> dict:
    backend = export.backend
    return {"name": export.name, "kind": export.config.kind,
            "image": getattr(backend, "path", None), "format": backend.format_name,
            "backing": getattr(backend, "backing_name", None),
            "size": export.size, "read_only": export.read_only,
            "clients": export.connections, "description": export.description}


def _client(conn) -> dict:
    stats = conn.stats
    return {"client": conn.client.label, "export": conn.export.name if conn.export else None,
            "phase": conn.phase.value,
            "tls": conn.session.tls if conn.session is not None else None,
            "certificate": conn.client.certificate,
            "seconds": round(time.monotonic() - stats.started, 3),
            "requests": stats.requests, "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written, "errors": stats.errors}
