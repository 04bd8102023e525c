"""Which worker serves an export, and what the parent knows of the exports.

With worker processes (`qcownbd.workers`) the parent negotiates without
opening an image: its registry is `RemoteRegistry`, made of what the
configuration says and what each worker reports of the exports it opened
(size, flags).  That answers LIST, INFO and the meta context options; the
option that chooses an export (GO, EXPORT_NAME) goes to the export's worker
with the connection, and that worker answers it.

A configured image belongs to one worker (`image_owner`: a hash of its
file's path, so a reload keeps it where it was and two exports of one image
meet in one registry), so that one process writes its QCOW1 metadata; a fleet's golden image is opened read-only by every worker, and
each overlay (`FLEET/ID`) is placed on the worker with the fewest overlays
when first asked for, and stays there (`Placement`): all connections of one
overlay meet in one process.
"""

import os
import zlib
from types import SimpleNamespace

from qcownbd.errors import NoSuchExport


def image_owner(config, count: int) -> int:
    """The worker (0 to count - 1) that opens the configured export ``config``: by
    its image file, so that exports of one image meet in one worker, whose
    registry says which may share it."""
    return zlib.crc32(os.path.realpath(config.path).encode()) % count


def opened_by(config, index: int, count: int) -> bool:
    """Whether worker ``index`` of ``count`` opens ``config`` (every worker opens a
    fleet: its golden image read-only; its overlays as they are placed there)."""
    return config.kind == "fleet" or image_owner(config, count) == index


class Placement:
    """Where each export name is served: configured ones by `image_owner`, members
    (fleet overlays) on the least loaded worker at their first use, for good."""

    def __init__(self, count: int):
        self.count = count
        self._members: dict[str, int] = {}
        self._load = [0] * count

    def worker_of(self, name: str, config) -> int:
        """The worker serving ``name``, configured as ``config`` (None: a member,
        placed when it is new)."""
        if config is not None:
            return image_owner(config, self.count)
        index = self._members.get(name)
        if index is None:
            index = min(range(self.count), key=lambda i: (self._load[i], i))
            self._members[name] = index
            self._load[index] += 1
        return index

    def members_of(self, index: int) -> list[str]:
        """The members placed on worker ``index``."""
        return sorted(name for name, where in self._members.items() if where == index)


class RemoteExport:
    """What negotiation needs of an export another process serves."""

    transient = False

    def __init__(self, name: str, config, info: dict, ready: bool):
        self.name, self.config = name, config
        self.size = int(info["size"])
        self.read_only = bool(info["read_only"])
        self.description = info.get("description") or ""
        self.preferred_block_size = int(info["block"])
        self.backend = SimpleNamespace(can_trim=bool(info["can_trim"]),
                                       can_fast_zero=bool(info["can_fast_zero"]))
        self._ready = ready

    def claim(self) -> None:
        """Only when its worker cannot take the connection (it is being replaced)."""
        if not self._ready:
            raise NoSuchExport(f"export {self.name!r}: its worker is restarting",
                               public=f"export {self.name!r} is unavailable; try again")
        raise NoSuchExport(f"export {self.name!r}: its worker did not take the client",
                           public=f"export {self.name!r} is unavailable; try again")


def export_info(export) -> dict:
    """What a worker reports of one of its exports (`RemoteExport` reads it)."""
    backend = export.backend
    return {"size": export.size, "read_only": export.read_only,
            "description": export.description, "block": export.preferred_block_size,
            "can_trim": backend.can_trim, "can_fast_zero": backend.can_fast_zero}


class RemoteRegistry:
    """The parent's export registry (``lookup``, ``listing``...) from the
    configuration and the workers' reports (`report`)."""

    def __init__(self, configs: dict):
        self.configs = dict(configs)
        #: worker index -> ({name: info}, {name: why unavailable})
        self._reports: dict[int, tuple[dict, dict]] = {}
        #: the workers that can take connections now
        self.ready: set[int] = set()

    def report(self, index: int, exports: dict, broken: dict) -> None:
        """What worker ``index`` serves now (it started, or reloaded)."""
        self._reports[index] = (exports, broken)

    def _info(self, name: str) -> tuple[dict | None, bool]:
        """(info, whether a worker that has it is ready), from the latest reports."""
        found, ready = None, False
        for index, (exports, _broken) in sorted(self._reports.items()):
            if name in exports:
                found = exports[name]
                ready = ready or index in self.ready
        return found, ready

    def _broken(self) -> dict:
        return {name: why for _exports, broken in self._reports.values()
                for name, why in broken.items() if name in self.configs}

    def lookup(self, name: str, client=None) -> RemoteExport:
        """The export ``name`` (a fleet's ``FLEET/ID`` too), as the registry's."""
        parent, slash, member = name.partition("/")
        if name not in self.configs and slash and parent in self.configs \
                and self.configs[parent].kind == "fleet" and member:
            export = self.lookup(parent)
            info = {"size": export.size, "read_only": self.configs[parent].read_only,
                    "description": "", "block": export.preferred_block_size,
                    "can_trim": export.backend.can_trim,
                    "can_fast_zero": export.backend.can_fast_zero}
            return RemoteExport(name, export.config, info, export._ready)
        if name == "" and len(self.configs) == 1:
            name = next(iter(self.configs))
        info, ready = self._info(name)
        if name in self.configs and info is not None:
            return RemoteExport(name, self.configs[name], info, ready)
        if name in self.configs:
            raise NoSuchExport(f"export {name!r} is unavailable")
        raise NoSuchExport(f"no export named {name!r}")

    def served(self, name: str) -> RemoteExport:
        """The export served under exactly ``name``."""
        if name not in self.configs:
            raise NoSuchExport(f"no export named {name!r}")
        return self.lookup(name)

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export that can be used."""
        return [(name, info["description"]) for name in self.configs
                for info in [self._info(name)[0]] if info is not None]

    def unavailable(self) -> list[tuple[str, str]]:
        """(name, why) of the configured exports no worker could open."""
        return sorted(self._broken().items())

    def counts(self) -> tuple[int, int]:
        """(exports served, exports broken)."""
        return len(self.listing()), len(self._broken())

    def open_exports(self) -> list:
        """No image is open in this process."""
        return []

    # the three steps of a reload (`service.Reloader`): the workers open the images
    def plan(self, configs: dict) -> dict:
        """Take the new configuration; all of it goes to the workers."""
        self.configs = dict(configs)
        return self.configs

    def ready_pending(self) -> dict:
        """Each worker applies its own pending changes."""
        return {}

    def close_all(self) -> None:
        """Nothing to close here (the workers close their images)."""
