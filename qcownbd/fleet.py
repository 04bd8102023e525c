"""Fleets: one read-only golden image, one copy-on-write QCOW1 overlay per client.

```toml
[exports.fleet]
golden = "/var/lib/qcownbd/golden.qcow"   # never written; opened read-only once
golden_format = "qcow1"                   # raw | qcow1 (pinned: QCOW1 cannot record it)
overlay_dir = "/var/lib/qcownbd/fleet"    # created if missing
overlays = "persistent"                   # persistent | ephemeral
description = "Debian 12 fleet"
max_overlays = 1000                       # overlay files at once; more first connects fail
l2_cache_tables = 64
```
A client asks for `fleet/ID` and gets its own overlay `overlay_dir/ID.qcow`
(ephemeral ones: `overlay_dir/ephemeral/ID.qcow`), created on first connect
with the golden image's absolute path as backing file, as `qemu-img create
-f qcow -b GOLDEN` would.  The export `fleet` itself serves the golden image
read-only.  Overlays are not listed (clients would learn each other's IDs).

One backend reads the golden image for every overlay; all connections to
one overlay share its backend (multi-conn).  An overlay is closed when its
last client leaves (so `qcownbd fleet delete/commit` can work on it while
the server runs); an ephemeral one is deleted then, and ephemeral ones left
by a crash are deleted when the fleet opens again.
"""

import errno
import logging
import os
import re
import secrets
from dataclasses import dataclass

from qcownbd.config import (
    ExportConfig, _check_table, _dir_list, check_export_name, parse_networks,
)
from qcownbd.errors import ConfigError, ImageFormatError, ProtocolError
from qcownbd.exports import Export
from qcownbd.image import formats
from qcownbd.image.locking import lock_image
from qcownbd.image.probe import lock_or_explain, open_fd, open_image
from qcownbd.image.qcow1 import Qcow1Image, create_qcow1

log = logging.getLogger("qcownbd.fleet")

OVERLAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
OVERLAY_SUFFIX = ".qcow"
EPHEMERAL_SUBDIR = "ephemeral"
MODES = ("persistent", "ephemeral")
DEFAULT_MAX_OVERLAYS = 1000

_KEYS = {"golden": str, "golden_format": str, "overlay_dir": str, "overlays": str,
         "description": str, "max_overlays": int, "l2_cache_tables": int, "allow": list,
         "allow_unix": bool, "backing_dirs": list}


def is_overlay_id(ident: str) -> bool:
    """Whether ``ident`` may name an overlay (a plain file name, never a path)."""
    return bool(OVERLAY_ID.fullmatch(ident)) and ".." not in ident


@dataclass(frozen=True)
class FleetConfig:
    """A fleet export: the golden image and where and how overlays are kept."""

    name: str
    golden: str
    golden_format: str
    overlay_dir: str
    overlays: str = "persistent"
    description: str = ""
    max_overlays: int = DEFAULT_MAX_OVERLAYS
    l2_cache_tables: int | None = None
    #: as for any export (qcownbd.access): client networks, Unix clients
    allow: tuple[str, ...] | None = None
    allow_unix: bool = True
    #: where the golden image's own backing files may lie
    backing_dirs: tuple[str, ...] = ()

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

    def open(self, registry) -> "Fleet":
        """Open the golden image read-only, as ``registry`` opens exports; drop stale overlays."""
        golden = registry.open_export(ExportConfig(
            name=self.name, path=self.golden, format=self.golden_format, read_only=True,
            l2_cache_tables=self.l2_cache_tables, backing_dirs=self.backing_dirs)).backend
        try:
            removed = OverlayDir(self.overlay_dir).remove_stale()
        except OSError as exc:
            golden.close()
            raise ImageFormatError(f"export {self.name}: overlay_dir {self.overlay_dir}: "
                                   f"{exc.strerror or exc}") from None
        for path in removed:
            log.info("export %s: removed stale %s", self.name, path)
        log.info("export %s: fleet of %s (%s, %s overlays in %s)", self.name, self.golden,
                 golden.format_name, self.overlays, self.overlay_dir)
        return Fleet(self, golden)


def fleet_config(name: str, table: dict, base_dir: str, server_dirs: list[str]) -> FleetConfig:
    """A FleetConfig from an `[exports.NAME]` table that has a `golden` key."""
    where = f"[exports.{name}]"
    _check_table(table, _KEYS, where)
    missing = [key for key in ("golden", "golden_format", "overlay_dir") if key not in table]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing (a fleet needs golden, "
                          "golden_format and overlay_dir)")
    if "/" in check_export_name(name):
        raise ConfigError(f"{where}: a fleet's name cannot contain '/' "
                          "(clients ask for NAME/ID)")
    golden_format = _golden_format(table["golden_format"], where)
    overlays = table.get("overlays", "persistent")
    if overlays not in MODES:
        raise ConfigError(f"{where}: overlays must be \"persistent\" or \"ephemeral\"")
    limits = {key: table[key] for key in ("max_overlays", "l2_cache_tables") if key in table}
    if any(value < 1 for value in limits.values()):
        raise ConfigError(f"{where}: {', '.join(limits)} must be at least 1")

    def absolute(key: str) -> str:
        return os.path.abspath(os.path.join(base_dir, os.path.expanduser(table[key])))

    return FleetConfig(
        name=name, golden=absolute("golden"), golden_format=golden_format,
        overlay_dir=absolute("overlay_dir"),
        overlays=overlays, description=table.get("description", ""),
        allow=None if "allow" not in table else parse_networks(table["allow"], where),
        allow_unix=table.get("allow_unix", True),
        backing_dirs=tuple(_dir_list(table["backing_dirs"], where, base_dir)
                           if "backing_dirs" in table else server_dirs), **limits)


def _golden_format(fmt, where: str) -> str:
    """golden_format as a format's name ("auto" is refused: the pin is the point)."""
    found = formats.lookup(fmt)
    if found is None:
        names = " or ".join(f'"{name}"' for name in formats.FORMATS)
        raise ConfigError(f"{where}: golden_format must be {names}")
    return found.name


class OverlayDir:
    """The files of a fleet's overlay directory (used by the server and `qcownbd fleet`)."""

    def __init__(self, directory: str):
        self.directory = directory

    def _folder(self, ephemeral: bool) -> str:
        return os.path.join(self.directory, EPHEMERAL_SUBDIR) if ephemeral else self.directory

    def path(self, ident: str, ephemeral: bool) -> str:
        """Where overlay ``ident`` lives (``ident`` already checked)."""
        return os.path.join(self._folder(ephemeral), ident + OVERLAY_SUFFIX)

    def overlays(self) -> list[tuple[str, str, str]]:
        """(ID, "persistent"|"ephemeral", path) of every overlay file, sorted."""
        found = []
        for mode in MODES:
            folder = self._folder(mode == "ephemeral")
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                ident = name[:-len(OVERLAY_SUFFIX)]
                if name.endswith(OVERLAY_SUFFIX) and is_overlay_id(ident):
                    found.append((ident, mode, os.path.join(folder, name)))
        return sorted(found)

    def create_unpublished(self, ident: str, ephemeral: bool, size: int, backing: str) -> str:
        """Create a new overlay for ``ident`` under a temporary name; return that name.

        `publish` gives it its real name once a client really uses it, so
        lookups that go no further (NBD_OPT_INFO, clients refused by an
        allow list) leave nothing behind.
        """
        folder = self._folder(ephemeral)
        os.makedirs(folder, mode=0o750, exist_ok=True)
        temp = os.path.join(folder, f".{ident}.{secrets.token_hex(4)}.tmp")
        try:
            create_qcow1(temp, size, backing)
            # guest data: readable by the server's user only
            os.chmod(temp, 0o600)
        except BaseException:
            if os.path.lexists(temp):
                os.unlink(temp)
            raise
        return temp

    def publish(self, temp: str, ident: str, ephemeral: bool) -> None:
        """Give a temporary overlay its name (atomically: nobody sees half an image).

        rename, not link + unlink, so the server's open file keeps a live name
        (lsof and /proc show the overlay, not a deleted file).  The check
        before it is enough: one server owns an overlay directory, and its
        lookups run one at a time on the event loop.
        """
        path = self.path(ident, ephemeral)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already exists", path)
        os.rename(temp, path)

    def remove_stale(self) -> list[str]:
        """Delete leftover ephemeral overlays and temporaries that nobody holds open.

        A file still locked (another server, or the older fleet a SIGHUP
        reload keeps for its clients) is left alone.
        """
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        stale = [path for _, mode, path in self.overlays() if mode == "ephemeral"]
        for folder in (self._folder(False), self._folder(True)):
            if os.path.isdir(folder):
                stale += [os.path.join(folder, name) for name in os.listdir(folder)
                          if name.startswith(".") and name.endswith(".tmp")]
        return [path for path in stale if remove_unless_in_use(path)]


def remove_unless_in_use(path: str) -> bool:
    """Delete an image file while holding QEMU's write lock on it; False if in use."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        lock_image(fd, writable=True)
        os.unlink(path)
        return True
    except ImageFormatError:
        return False
    finally:
        os.close(fd)


def overlay_in_use(path: str) -> bool:
    """Whether a writer (a server with a client on it) holds the overlay."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lock_image(fd, writable=False)
        return False
    except ImageFormatError:
        return True
    finally:
        os.close(fd)


def describe_overlay(path: str, golden_format: str | None) -> dict:
    """`info` of an overlay (read without locks, so a live one too), whether it is in use
    and when it was last written."""
    img = open_image(path, fmt="qcow1", read_only=True, backing_format=golden_format,
                     lock=False)
    try:
        info = formats.describe(img)
    finally:
        img.close()
    return {"in-use": overlay_in_use(path), "modified": int(os.stat(path).st_mtime), **info}


class SharedGolden:
    """The fleet's golden backend as seen by one overlay: closing the overlay leaves it open."""

    def __init__(self, golden):
        self._golden = golden
        # the two calls on every read of an unallocated cluster: bound once
        self.read_into = golden.read_into
        self.block_status = golden.block_status

    def __getattr__(self, name):
        return getattr(self._golden, name)

    def close(self) -> None:
        """The fleet closes the golden image, once, after its last overlay."""


class Overlay(Export):
    """One client's overlay, shared by all its connections; closed with the last one.

    A new overlay starts under a temporary file name (``unpublished``) and
    takes its real name when its first connection attaches.
    """

    def __init__(self, config: ExportConfig, backend, fleet: "Fleet", ident: str,
                 unpublished: str | None = None):
        super().__init__(config, backend)
        self.fleet = fleet
        self.ident = ident
        self.unpublished = unpublished

    def attach(self) -> None:
        """A connection entered transmission: the overlay now exists for good."""
        if self.unpublished is not None:
            try:
                self.fleet.dir.publish(self.unpublished, self.ident, self.fleet.config.ephemeral)
            except OSError as exc:
                raise ProtocolError(f"overlay {self.name}: cannot create {self.config.path}: "
                                    f"{exc.strerror}") from None
            self.unpublished = None
            log.info("export %s: created overlay %s", self.fleet.name, self.config.path)
        super().attach()

    def detach(self) -> None:
        """A connection ended; the last one closes (and maybe deletes) the overlay."""
        self.connections -= 1
        if not self.connections:
            self.close()

    def close(self) -> None:
        """Commit and close; an ephemeral or never used overlay's file is deleted."""
        if self.closed:
            return
        super().close()
        if self.unpublished is not None or self.fleet.config.ephemeral:
            path = self.unpublished or self.config.path
            try:
                os.unlink(path)
            except OSError as exc:
                log.error("export %s: cannot delete %s: %s", self.name, path, exc.strerror)
        self.fleet.forget(self)


class Fleet(Export):
    """The fleet export: serves the golden image read-only and hands out overlays."""

    def __init__(self, config: FleetConfig, golden):
        super().__init__(config, golden)
        hint = (f"copy-on-write overlays of this image: connect to {self.name}/ID "
                f"for your own disk ({config.overlays}; ID: {ID_RULE})")
        self.description = f"{config.description} ({hint})" if config.description else hint
        self.dir = OverlayDir(config.overlay_dir)
        self._overlays: dict[str, Overlay] = {}

    def member(self, ident: str) -> Export:
        """The overlay a client named ``fleet/ident``, opened (or created) if needed."""
        if not is_overlay_id(ident):
            raise LookupError(f"bad overlay name {ident[:80]!r} in {self.name}/ (use {ID_RULE})")
        # Overlays looked up but never attached (NBD_OPT_INFO, clients an allow
        # list refuses) close here, so they cannot pile up. Safe for every other
        # one: GO attaches in the same event-loop step as its lookup.
        for idle in [o for o in self._overlays.values() if not o.connections and o.ident != ident]:
            idle.close()
        overlay = self._overlays.get(ident)
        if overlay is not None:
            return overlay
        try:
            overlay = self._open_overlay(ident)
        except (ImageFormatError, OSError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("export %s: overlay %s: %s", self.name, ident, text)
            # the details (paths) are for the operator's log, not for clients
            raise LookupError(f"overlay {self.name}/{ident} is unavailable") from None
        self._overlays[ident] = overlay
        return overlay

    def members(self) -> list[Export]:
        """The open overlays."""
        return list(self._overlays.values())

    def _open_overlay(self, ident: str) -> Overlay:
        config = self.config
        path = self.dir.path(ident, config.ephemeral)
        unpublished = None
        if not os.path.exists(path):
            if len(self.dir.overlays()) >= config.max_overlays:
                log.warning("export %s: max_overlays=%d reached, refusing overlay %s",
                            self.name, config.max_overlays, ident)
                raise LookupError(f"fleet {self.name} is full: no new overlays")
            unpublished = self.dir.create_unpublished(ident, config.ephemeral, self.size,
                                                      config.golden)
        try:
            backend = self._open_overlay_image(unpublished or path)
        except BaseException:
            if unpublished:
                os.unlink(unpublished)
            raise
        export_config = ExportConfig(
            name=f"{self.name}/{ident}", path=path, format="qcow1",
            description=f"overlay {ident} of {self.name}", l2_cache_tables=config.l2_cache_tables,
            allow=config.allow, allow_unix=config.allow_unix)
        return Overlay(export_config, backend, self, ident, unpublished)

    def _open_overlay_image(self, path: str) -> Qcow1Image:
        """Open an overlay read-write over the shared golden backend, checking it belongs here."""
        fd = open_fd(path, read_only=False)
        try:
            lock_or_explain(fd, path, True)
            image = Qcow1Image(fd, path, read_only=False, backing_opener=self._backing_for(path),
                               l2_cache_tables=self.config.l2_cache_tables)
        except BaseException:
            os.close(fd)
            raise
        if image.backing is None or image.size != -(-self.size // 512) * 512:
            image.close()
            raise ImageFormatError(f"{path}: not an overlay of {self.config.golden} "
                                   f"(size or backing file differ)")
        return image

    def _backing_for(self, path: str):
        def open_golden(name: bytes) -> SharedGolden:
            if os.fsdecode(name) != self.config.golden:
                raise ImageFormatError(
                    f"{path}: its backing file is {os.fsdecode(name)!r}, not the golden image "
                    f"{self.config.golden} (delete it with `qcownbd fleet delete`)")
            return SharedGolden(self.backend)
        return open_golden

    def forget(self, overlay: Overlay) -> None:
        """A closed overlay leaves the fleet; a retired fleet closes after its last one."""
        if self._overlays.get(overlay.ident) is overlay:
            del self._overlays[overlay.ident]
            self._close_when_idle()

    def detach(self) -> None:
        """A client of the golden image itself left."""
        self.connections -= 1
        self._close_when_idle()

    def retire(self) -> None:
        """Refuse new clients; the golden image closes after the last overlay client."""
        self.retired = True
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self.retired and not self.connections and not self._overlays:
            self.close()

    def close(self) -> None:
        """Close every overlay, then the golden image (server shutdown)."""
        overlays, self._overlays = list(self._overlays.values()), {}
        for overlay in overlays:
            overlay.close()
        super().close()
