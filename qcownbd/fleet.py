"""Fleets: one read-only golden image, one copy-on-write QCOW1 overlay per client.

A fleet export (`FleetConfig`, a table with a `golden` key in the config)
serves the golden image read-only under its own name.  A client asking for
`NAME/ID` gets its own overlay `overlay_dir/ID.qcow` (ephemeral ones:
`overlay_dir/ephemeral/ID.qcow`), created on first connect with the golden
image's absolute path as backing file, as `qemu-img create -f qcow -b
GOLDEN` would.  Overlays are not listed (clients would learn each other's IDs).

The golden image is opened once and lent to every overlay as its backing
file (`image.shared`); all connections to one overlay share its backend
(multi-conn).  An overlay is closed when its last client leaves (so `qcownbd
fleet delete/commit` can work on it while the server runs); an ephemeral one
is deleted then, and ephemeral ones left by a crash are deleted when the
fleet opens again.  Overlays whose clients a previous server handed over
(`qcownbd.upgrade`, `qcownbd.fdstore`) are opened at once instead (`Fleet.reopen`),
ephemeral ones spared, and kept until those connections are back.
"""

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from qcownbd.errors import ExportOpening, ImageFormatError, NoSuchExport
from qcownbd.exports import Export, ImageProvider, file_identity
from qcownbd.image import formats
from qcownbd.image.backend import Backend
from qcownbd.image.locking import lock_image
from qcownbd.image.probe import open_image
from qcownbd.image.qcow1 import create_qcow1
from qcownbd.image.shared import SharedImage

log = logging.getLogger("qcownbd.fleet")

OVERLAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
OVERLAY_SUFFIX = ".qcow"
#: beside an overlay of a fleet with tenants: who created it (one line)
OWNER_SUFFIX = ".owner"
EPHEMERAL_SUBDIR = "ephemeral"


def is_overlay_id(ident: str) -> bool:
    """Whether ``ident`` may name an overlay (a plain file name, never a path)."""
    return bool(OVERLAY_ID.fullmatch(ident)) and ".." not in ident


class OverlayDir:
    """The files of a fleet's overlay directory (used by the server and `qcownbd fleet`)."""

    def __init__(self, directory: str):
        self.directory = directory

    def _folder(self, ephemeral: bool) -> str:
        return os.path.join(self.directory, EPHEMERAL_SUBDIR) if ephemeral else self.directory

    def path(self, ident: str, ephemeral: bool) -> str:
        """Where overlay ``ident`` lives (``ident`` already checked)."""
        return os.path.join(self._folder(ephemeral), ident + OVERLAY_SUFFIX)

    def owner(self, ident: str, ephemeral: bool) -> str | None:
        """The recorded owner of overlay ``ident``, or None when none is recorded."""
        try:
            with open(owner_file(self.path(ident, ephemeral)), encoding="utf-8") as file:
                return file.read().strip() or None
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def record_owner(self, ident: str, ephemeral: bool, owner: str) -> None:
        """Write who owns overlay ``ident`` (before the overlay gets its name)."""
        path = owner_file(self.path(ident, ephemeral))
        # a leftover temporary is removed like any other (remove_stale)
        temp = os.path.join(self._folder(ephemeral),
                            f".{ident}{OWNER_SUFFIX}.{secrets.token_hex(4)}.tmp")
        with open(temp, "w", encoding="utf-8") as file:
            file.write(owner + "\n")
        os.chmod(temp, 0o600)
        os.rename(temp, path)

    def overlays(self) -> list[tuple[str, bool, str]]:
        """(ID, ephemeral, path) of every overlay file, sorted."""
        found = []
        for ephemeral in (False, True):
            folder = self._folder(ephemeral)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                ident = name[:-len(OVERLAY_SUFFIX)]
                if name.endswith(OVERLAY_SUFFIX) and is_overlay_id(ident):
                    found.append((ident, ephemeral, os.path.join(folder, name)))
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

    def make(self) -> None:
        """Create the directory if it is missing (OSError when it cannot be)."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)

    def remove_stale(self, keep: frozenset = frozenset()) -> list[str]:
        """Delete leftover ephemeral overlays and temporaries that nobody holds open.

        A file still locked (another server, or the older fleet a SIGHUP
        reload keeps for its clients) is left alone, and so is one of ``keep``
        (paths: the overlays of connections a previous server handed over).
        """
        stale = [path for _, ephemeral, path in self.overlays()
                 if ephemeral and os.path.realpath(path) not in keep]
        for folder in (self._folder(False), self._folder(True)):
            if os.path.isdir(folder):
                stale += [os.path.join(folder, name) for name in os.listdir(folder)
                          if name.startswith(".") and name.endswith(".tmp")]
        return [path for path in stale if remove_unless_in_use(path)]


@contextlib.contextmanager
def _locked(path: str, writable: bool):
    """Hold QEMU's locks on an image file: yields True, or False when another process
    (a server with a client on it) holds a conflicting lock."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        try:
            lock_image(fd, writable)
        except ImageFormatError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def owner_file(overlay_path: str) -> str:
    """The owner record beside an overlay file."""
    return overlay_path.removesuffix(OVERLAY_SUFFIX) + OWNER_SUFFIX


def remove_unless_in_use(path: str) -> bool:
    """Delete an image file (and an overlay's owner record) while holding QEMU's write
    lock on it; False if in use."""
    try:
        with _locked(path, writable=True) as free:
            if free:
                os.unlink(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(owner_file(path))
            return free
    except FileNotFoundError:
        return False


def overlay_in_use(path: str) -> bool:
    """Whether a writer (a server with a client on it) holds the overlay."""
    with _locked(path, writable=False) as free:
        return not free


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


def _description(config) -> str:
    """The fleet export's description: the configured one, and how to get an overlay."""
    hint = (f"copy-on-write overlays of this image: connect to {config.name}/ID "
            f"for your own disk ({config.overlays}; ID: {ID_RULE})")
    return f"{config.description} ({hint})" if config.description else hint


class FleetProvider:
    """The export registry's provider for fleets (config kind "fleet").

    The fleet export itself serves the golden image read-only; its members
    are the overlays, looked up as `NAME/ID`.
    """

    kind = "fleet"

    def __init__(self, images: ImageProvider, handed_over=(), tidy: bool = True):
        self._images = images
        #: the overlay files of connections a previous server handed over (never stale)
        self._handed_over = frozenset(os.path.realpath(path) for path in handed_over)
        #: whether this process deletes stale overlays (of worker processes, one does:
        #: two checking a file at once would each see it locked by the other)
        self._tidy = tidy
        self._fleets: dict[Export, Fleet] = {}
        #: overlays are opened (their tables scanned) here, off the event loop
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="overlay")

    def open(self, config) -> Export:
        """Open the golden image read-only, as a plain export; drop stale overlays."""
        golden = self._images.open_backend(config.golden_export())
        try:
            overlays = OverlayDir(config.overlay_dir)
            overlays.make()
            removed = overlays.remove_stale(self._handed_over) if self._tidy else []
        except OSError as exc:
            golden.close()
            raise ImageFormatError(f"export {config.name}: overlay_dir {config.overlay_dir}: "
                                   f"{exc.strerror or exc}") from None
        for path in removed:
            log.info("export %s: removed stale %s", config.name, path)
        log.info("export %s: fleet of %s (%s, %s overlays in %s)", config.name, config.golden,
                 golden.format_name, config.overlays, config.overlay_dir)
        fleet = Fleet(config, SharedImage(golden), self._workers)
        export = Export(config, fleet.golden.view(), on_close=self._closed,
                        description=_description(config))
        self._fleets[export] = fleet
        return export

    def reconfigure(self, export: Export, config) -> None:
        """A new description, allow list, overlay limit or tenant rule, in place (open
        overlays keep theirs until they close)."""
        export.config, export.description = config, _description(config)
        self._fleets[export].config = config

    def member(self, parent: Export, ident: str, client) -> Export:
        """The overlay ``client`` named ``NAME/ident``."""
        return self._fleets[parent].overlay(ident, client)

    def reopen(self, parent: Export, ident: str, path: str) -> Export:
        """Overlay ``ident``, which a previous server had open as ``path``, opened now
        (see `Fleet.reopen`)."""
        return self._fleets[parent].reopen(ident, path)

    def resumed(self) -> None:
        """The handed-over connections are back: reopened overlays none took may close."""
        for fleet in self._fleets.values():
            fleet.resumed()

    def _closed(self, export: Export) -> None:
        # the golden image stays open while overlays still read it (image.shared)
        del self._fleets[export]


class Fleet:
    """The overlays of one fleet: opened (or created) on lookup, one export each."""

    def __init__(self, config, golden: SharedImage, workers: ThreadPoolExecutor):
        self.config = config
        self.name = config.name
        self.golden = golden
        self.size = golden.backend.size
        self.dir = OverlayDir(config.overlay_dir)
        self._overlays: dict[str, Export] = {}
        #: temporary files of new overlays no client has taken yet
        self._unpublished: dict[str, str] = {}
        #: the owners of open overlays, when tenants are bound (config.tenant)
        self._owners: dict[str, str] = {}
        #: overlays being opened: ID -> (future, owner of a new one)
        self._opening: dict[str, tuple] = {}
        #: overlays reopened for handed-over connections that have not resumed yet
        self._reopened: set[str] = set()
        self._workers = workers

    def overlay(self, ident: str, client) -> Export:
        """The overlay ``ident``, opened (or created) if needed, if ``client`` may have it.

        Opening scans the overlay's tables (seconds for a large one), so it
        happens in a worker thread: the first lookups raise ExportOpening
        until it is done, and the client asks again then.
        """
        if not is_overlay_id(ident):
            raise NoSuchExport(f"bad overlay name {ident[:80]!r} in {self.name}/ (use {ID_RULE})")
        tenant = self._tenant(client)
        # Overlays looked up but never claimed (NBD_OPT_INFO, clients an allow
        # list refuses) close here, so they cannot pile up. Safe for every other
        # one: GO attaches in the same event-loop step as its lookup.
        for idle in [o for i, o in self._overlays.items()
                     if not o.connections and i != ident and i not in self._reopened]:
            idle.close()
        done = [i for i, (future, _) in self._opening.items() if future.done()]
        for other in [i for i in done if i != ident]:
            with contextlib.suppress(NoSuchExport):    # opened for a client that went away
                self._opened(other, *self._opening.pop(other)).close()
        if ident not in self._overlays:
            opening = self._opening.get(ident)
            if opening is None or not opening[0].done():
                raise ExportOpening(opening[0] if opening else self._start_opening(ident, tenant,
                                                                                   client))
            del self._opening[ident]
            self._overlays[ident] = self._opened(ident, *opening)
        self._check_owner(ident, tenant, client)
        self._reopened.discard(ident)
        return self._overlays[ident]

    def reopen(self, ident: str, path: str) -> Export:
        """Open overlay ``ident`` now, in this thread (a handover waits for it), and keep
        it for its handed-over connections (`resumed`).  ``path``: the file the previous
        server had; NoSuchExport when this fleet's is another (its overlay_dir or
        overlays setting changed) or is gone, ImageFormatError when it cannot open."""
        if not is_overlay_id(ident):
            raise NoSuchExport(f"bad overlay name {ident[:80]!r} in {self.name}/")
        ours = self.dir.path(ident, self.config.ephemeral)
        if ident in self._overlays:
            return self._overlays[ident]
        if file_identity(ours) is None or file_identity(ours) != file_identity(path):
            raise NoSuchExport(f"overlay {self.name}/{ident}: its file {path} is not this "
                               f"fleet's {ours} (overlay_dir or overlays changed, or it is "
                               "gone)")
        self._overlays[ident] = self._export(ident, self._open_overlay_image(ours))
        self._reopened.add(ident)
        log.info("export %s: reopened overlay %s for its handed-over client(s)", self.name,
                 ours)
        return self._overlays[ident]

    def resumed(self) -> None:
        """The handed-over connections are back; a reopened overlay none of them took
        closes."""
        idle = [self._overlays[i] for i in self._reopened
                if i in self._overlays and not self._overlays[i].connections]
        self._reopened.clear()
        for overlay in idle:
            overlay.close()

    def _tenant(self, client) -> str | None:
        """Who ``client`` is for this fleet's `tenant` setting (None: anyone may open any
        overlay); NoSuchExport when the setting asks for what the client lacks."""
        mode = self.config.tenant
        if mode == "any":
            return None
        if mode == "address":
            return "unix" if client is None or client.address is None else str(client.address)
        if client is None or not client.certificate:
            log.warning("export %s: %s has no TLS client certificate (tenant = \"certificate\")",
                        self.name, client.label if client else "a client")
            raise NoSuchExport(f"no export named {self.name + '/...'!r}: no client certificate",
                               public="a TLS client certificate is required for this fleet")
        return client.certificate

    def _check_owner(self, ident: str, tenant: str | None, client) -> None:
        """Refuse an existing overlay to everyone but its owner (when tenants are bound)."""
        if tenant is None:
            return
        owner = self._owners.get(ident) or self.dir.owner(ident, self.config.ephemeral)
        if owner != tenant:
            log.warning("export %s: %s (%s) may not open overlay %s, which belongs to %s",
                        self.name, client.label if client else "a client", tenant, ident,
                        owner or "nobody recorded")
            # the answer to a name that does not exist: probing reveals nothing
            raise NoSuchExport(f"no export named {self.name + '/' + ident!r}")
        self._owners[ident] = owner

    def _start_opening(self, ident: str, tenant: str | None, client):
        """Check on the loop what needs no file work, then open (or create) the overlay
        in a worker thread; returns the future of (backend, temporary name or None)."""
        config = self.config
        path = self.dir.path(ident, config.ephemeral)
        exists = os.path.exists(path)
        if exists:
            self._check_owner(ident, tenant, client)
        elif len(self.dir.overlays()) >= config.max_overlays:
            log.warning("export %s: max_overlays=%d reached, refusing overlay %s",
                        self.name, config.max_overlays, ident)
            raise NoSuchExport(f"fleet {self.name} is full: no new overlays")
        future = self._workers.submit(self._open_files, ident, path, exists)
        # a new overlay belongs to the client that made it, whoever asks next
        self._opening[ident] = (future, None if exists else tenant)
        return future

    def _open_files(self, ident: str, path: str, exists: bool) -> tuple:
        """(backend, temporary name of a new overlay or None): the file work, off the loop."""
        unpublished = None
        if not exists:
            unpublished = self.dir.create_unpublished(ident, self.config.ephemeral, self.size,
                                                      self.config.golden)
        try:
            return self._open_overlay_image(unpublished or path), unpublished
        except BaseException:
            if unpublished:
                os.unlink(unpublished)
            raise

    def _opened(self, ident: str, future, creator: str | None) -> Export:
        """The export of an overlay a worker opened; NoSuchExport when it could not."""
        try:
            backend, unpublished = future.result()
        except (ImageFormatError, OSError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("export %s: overlay %s: %s", self.name, ident, text)
            # the details (paths) are for the operator's log, not for clients
            raise NoSuchExport(f"overlay {self.name}/{ident}: {text}",
                               public=f"overlay {self.name}/{ident} is unavailable") from None
        if unpublished:
            self._unpublished[ident] = unpublished
            if creator is not None:
                self._owners[ident] = creator
        return self._export(ident, backend)

    def _export(self, ident: str, backend: Backend) -> Export:
        """The export of overlay ``ident``, open as ``backend``."""
        config = self.config
        return Export(config.overlay_export(ident, self.dir.path(ident, config.ephemeral)),
                      backend, transient=True,
                      on_claim=functools.partial(self._publish, ident),
                      on_close=functools.partial(self._closed, ident))

    def _open_overlay_image(self, path: str) -> Backend:
        """Open an overlay read-write over the shared golden image, checking it belongs here."""
        image = open_image(path, fmt=formats.QCOW1.name, read_only=False,
                           lend_backing=self._lend_golden(path))
        if image.backing is None or image.size != -(-self.size // 512) * 512:
            image.close()
            raise ImageFormatError(f"{path}: not an overlay of {self.config.golden} "
                                   f"(size or backing file differ)")
        return image

    def _lend_golden(self, path: str):
        def lend(name: bytes) -> Backend:
            if os.fsdecode(name) != self.config.golden:
                raise ImageFormatError(
                    f"{path}: its backing file is {os.fsdecode(name)!r}, not the golden image "
                    f"{self.config.golden} (delete it with `qcownbd fleet delete`)")
            return self.golden.view()
        return lend

    def _publish(self, ident: str, export: Export) -> None:
        """A client takes a new overlay: it now exists for good, under its real name."""
        temp = self._unpublished.get(ident)
        if temp is None:
            return
        try:
            owner = self._owners.get(ident)
            if owner is not None:
                self.dir.record_owner(ident, self.config.ephemeral, owner)
            self.dir.publish(temp, ident, self.config.ephemeral)
        except OSError as exc:
            detail = f"overlay {export.name}: cannot create {export.config.path}: {exc.strerror}"
            log.error("%s", detail)
            raise NoSuchExport(detail, public=f"overlay {export.name} is unavailable") from None
        del self._unpublished[ident]
        log.info("export %s: created overlay %s", self.name, export.config.path)

    def _closed(self, ident: str, export: Export) -> None:
        """An overlay closed: an ephemeral or never used one's file goes too."""
        temp = self._unpublished.pop(ident, None)
        # one reopened for a handover that failed is still the previous server's
        if (temp is not None or self.config.ephemeral) and ident not in self._reopened:
            path = temp or export.config.path
            try:
                os.unlink(path)
            except OSError as exc:
                log.error("export %s: cannot delete %s: %s", export.name, path, exc.strerror)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(owner_file(export.config.path))
        if self._overlays.get(ident) is export:
            del self._overlays[ident]
            self._owners.pop(ident, None)
