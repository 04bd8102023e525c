"""Export names to open backends: opening, lookup, reload and retirement.

Every connection to an export shares that export's one backend object, which
is what makes CAN_MULTI_CONN true (a flush on any connection covers writes
made on all of them).  A reload never takes a serving export away: a change
of presentation (description, allow lists) applies to the open export; a
changed image is opened first and then takes the name over, the old export
closing with its last connection; a change that needs the very image file
the old export holds for writing waits until that export is idle.  A
failed open leaves the old export serving.  An image file is in one
export only, unless every export that has it (as its image or as a backing
file) only reads it: the registry says which export has it, where the
image locks would only blame "another process".

Each kind of export config (its ``kind``: "image", "fleet") has a provider
that opens it and finds its members: the export a client names
``PARENT/ID`` (a fleet's overlays).  The registry knows no kind itself.
"""

import logging
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Protocol

from qcownbd.errors import ExportOpening, ImageFormatError, NoSuchExport, QcownbdError
from qcownbd.image.backend import Backend
from qcownbd.image.probe import open_image

log = logging.getLogger("qcownbd.exports")


class Export:
    """One named export: its config, its open backend and who is using it.

    ``on_claim(export)`` runs when a client takes the export (GO,
    EXPORT_NAME) and may still refuse it with NoSuchExport; ``on_close(export)``
    runs once its backend is closed.  A ``transient`` export closes when its
    last connection ends, the others only once retired.
    """

    def __init__(self, config, backend: Backend, *, description: str | None = None,
                 transient: bool = False, on_claim: Callable | None = None,
                 on_close: Callable | None = None):
        self.config = config
        self.name = config.name
        self.description = config.description if description is None else description
        self.backend = backend
        self.read_only = config.read_only or backend.read_only
        self.size = backend.size
        self.preferred_block_size = backend.preferred_block_size
        self.transient = transient
        self._on_claim = on_claim
        self._on_close = on_close
        self.connections = 0
        self.retired = False
        self.closed = False
        #: set while a live snapshot switches the image: new clients wait for it
        self._thawed: Future | None = None
        #: `file_identity` of the image and of each backing file under it, top first
        self.files = []
        level = backend
        while level is not None:
            self.files.append(file_identity(level.path))
            level = level.backing

    def claim(self) -> None:
        """A client takes the export for transmission, before it is told so: the last
        moment to refuse (NoSuchExport), e.g. when a new overlay cannot be named."""
        if self._thawed is not None:
            raise ExportOpening(self._thawed)   # asked again once the snapshot is done
        if self._on_claim is not None:
            self._on_claim(self)

    def freeze(self) -> None:
        """A live snapshot begins: clients choosing the export now wait for `thaw`."""
        self._thawed = Future()

    def thaw(self) -> None:
        """The snapshot is over: the waiting clients go on."""
        thawed, self._thawed = self._thawed, None
        if thawed is not None:
            thawed.set_result(None)

    def switch_backend(self, backend: Backend) -> None:
        """Serve ``backend`` (the same disk, through a new overlay) from now on."""
        self.backend = backend
        self.preferred_block_size = backend.preferred_block_size

    def attach(self) -> None:
        """A connection entered transmission on this export."""
        self.connections += 1

    def detach(self) -> None:
        """A connection ended; a retired or transient export closes with its last one."""
        self.connections -= 1
        if (self.retired or self.transient) and not self.connections:
            self.close()

    def retire(self) -> None:
        """Refuse new clients; close now or when the last connection ends."""
        self.retired = True
        if not self.connections:
            self.close()

    def close(self) -> None:
        """Commit and release the image (once)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.backend.close()
        except (QcownbdError, OSError) as exc:
            log.error("export %s: closing %s failed: %s", self.name, self.config.path, exc)
        if self._on_close is not None:
            self._on_close(self)


class ExportProvider(Protocol):
    """Opens the export configs of one ``kind`` and finds their members."""

    kind: str

    def open(self, config) -> Export:
        """Open the export; ImageFormatError (one line, naming it) on failure."""

    def member(self, parent: Export, name: str, client) -> Export:
        """The export ``client`` calls ``PARENT/name``; NoSuchExport if there is none
        (or none for this client)."""

    def reconfigure(self, export: Export, config) -> None:
        """Apply ``config``, which differs only in presentation (``config.opens_like``),
        to the open ``export``."""

    def reopen(self, parent: Export, name: str, path: str) -> Export:
        """Member ``PARENT/name``, which a previous server had open as the file ``path``,
        opened now for the connections it handed over; NoSuchExport when it cannot be."""

    def resumed(self) -> None:
        """The handed-over connections are back: what `reopen` kept for them and none
        took may close."""


class ImageProvider:
    """Plain exports: one image each, opened with its backing chain; no members."""

    kind = "image"

    def open(self, config) -> Export:
        """The export of one image file."""
        return Export(config, self.open_backend(config))

    def open_backend(self, config) -> Backend:
        """Open the image of an export config; ImageFormatError naming the export."""
        try:
            backend = open_image(config.path, fmt=config.format, read_only=config.read_only,
                                 backing_format=config.backing_format,
                                 allowed_backing_dirs=config.backing_dirs)
        except OSError as exc:
            raise ImageFormatError(f"export {config.name}: {config.path}: "
                                   f"{exc.strerror or exc}") from None
        except ImageFormatError as exc:
            raise ImageFormatError(f"export {config.name}: {exc}") from None
        log.info("export %s: %s (%s%s)", config.name, config.path, backend.format_name,
                 ", read-only" if config.read_only or backend.read_only else "")
        return backend

    def member(self, parent: Export, name: str, client) -> Export:
        """Plain exports have no members."""
        raise NoSuchExport(f"no export named {parent.name + '/' + name!r}")

    def reconfigure(self, export: Export, config) -> None:
        """A new description or allow list, in place."""
        export.config, export.description = config, config.description

    def reopen(self, parent: Export, name: str, path: str) -> Export:
        """Plain exports have no members."""
        raise NoSuchExport(f"export {parent.name}/{name}: {parent.name} is not a fleet any "
                           "more, and it has clients")

    def resumed(self) -> None:
        """Nothing is kept for handed-over connections."""


def file_identity(path) -> tuple[int, int] | None:
    """What makes two paths one image: (st_dev, st_ino), or a block device's number
    (two device nodes, one disk); None when the path cannot be looked at."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if stat.S_ISBLK(st.st_mode):
        return -1, st.st_rdev
    return st.st_dev, st.st_ino


def _refuse_shared_image(config, exports: Iterable[Export]) -> None:
    """ImageFormatError when an open export has ``config``'s image (as its own, or as a
    backing file) and one of the two may write it; the error names that export."""
    identity = file_identity(config.path)
    if identity is None:
        return      # the open itself says what is wrong with the path
    for export in exports:
        for depth, held in enumerate(export.files):
            written = depth == 0 and not export.read_only
            if held == identity and (written or not config.read_only):
                other = f"export {export.name}" if depth == 0 else \
                    f"a backing file of export {export.name}"
                raise ImageFormatError(
                    f"export {config.name}: same image as {other} ({config.path}); an image "
                    "can be in several exports only if none of them writes it")


def _holds_for_writing(export: Export, config) -> bool:
    """Whether ``config`` needs the image file ``export`` has open, with a writer on
    either side: image locks then keep the two from being open at once."""
    same = os.path.realpath(export.config.path) == os.path.realpath(config.path)
    return same and not (export.read_only and config.read_only)


class ExportRegistry:
    """The exports being served, looked up by name during negotiation."""

    def __init__(self, providers: Iterable[ExportProvider] = ()):
        self._providers = {p.kind: p for p in providers} or {"image": ImageProvider()}
        self._exports: dict[str, Export] = {}
        self._broken: dict[str, tuple[object, str]] = {}
        #: changed configs waiting for their export's clients to leave (see `plan`)
        self._pending: dict[str, object] = {}
        self._retired: list[Export] = []
        #: members handed out by lookups (a fleet's overlays), until they close
        self._members: list[Export] = []

    def open_export(self, config, opened: Iterable[Export] = ()) -> Export:
        """Open one export with the provider of its kind, once `check_image_free`
        (with the exports of ``opened`` too) lets it."""
        self.check_image_free(config, opened)
        return self._providers[config.kind].open(config)

    def check_image_free(self, config, opened: Iterable[Export] = ()) -> None:
        """ImageFormatError, naming the other export, when an open export (or one of
        ``opened``) has ``config``'s image and one of the two may write it: call it
        before opening an export some other way than `open_export`."""
        _refuse_shared_image(config, [*self._still_open(), *opened])

    def _still_open(self) -> list[Export]:
        """The exports whose backends are open, read without changing the registry
        (`open_all` calls this from a worker thread)."""
        every = (*self._exports.values(), *self._retired, *self._members)
        return [export for export in every if not export.closed]

    def add(self, export: Export) -> None:
        """Serve an already opened export."""
        self._exports[export.name] = export

    def apply(self, configs: dict) -> None:
        """Make the served exports match ``configs`` (startup; SIGHUP uses the three steps).

        Unchanged exports keep their backend and connections; a broken one is
        logged and refused at negotiation while the others serve.
        """
        self.install(self.open_all(self.plan(configs)))

    def plan(self, configs: dict) -> dict:
        """Apply at once what ``configs`` changes without opening an image (dropped
        exports retire, presentation changes apply in place); return the configs to
        open: new, changed and broken ones (an image may have become readable since).
        """
        for name, export in list(self._exports.items()):
            config = configs.get(name)
            if config == export.config:
                continue
            if config is None:
                del self._exports[name]
                self._retire(export)
            elif export.config.opens_like(config):
                self._providers[config.kind].reconfigure(export, config)
                log.info("export %s: updated in place", name)
            elif _holds_for_writing(export, config):
                if export.connections:
                    log.info("export %s: the new settings apply once its %d client(s) have "
                             "left (the image they use must be opened again)", name,
                             export.connections)
                    self._pending[name] = config
                else:
                    del self._exports[name]
                    self._retire(export)    # frees the image, opened again below
        self._broken = {n: b for n, b in self._broken.items() if configs.get(n) == b[0]}
        self._pending = {n: c for n, c in self._pending.items()
                         if configs.get(n) == c and n in self._exports}
        return {name: config for name, config in configs.items()
                if name not in self._pending and (name not in self._exports
                                                  or self._exports[name].config != config)}

    def ready_pending(self) -> dict:
        """The configs of exports whose change waited for their clients to leave and
        can now be opened (their old exports retire now)."""
        ready = {}
        for name, config in list(self._pending.items()):
            export = self._exports.get(name)
            if export is not None and not export.connections:
                del self._pending[name], self._exports[name]
                self._retire(export)
                ready[name] = config
        return ready

    def open_all(self, configs: dict) -> dict[str, tuple]:
        """{name: (config, Export or the error)}; touches no registry state, so it may
        run in a worker thread (a large read-write QCOW1 scan takes seconds)."""
        opened = {}
        for name, config in configs.items():
            try:
                exports = [result for _config, result in opened.values()
                           if isinstance(result, Export)]
                opened[name] = (config, self.open_export(config, exports))
            except ImageFormatError as exc:
                opened[name] = (config, exc)
        return opened

    def install(self, opened: dict[str, tuple]) -> None:
        """Serve what `open_all` opened in place of what served the name before; log
        what it could not open (the old export, if any, goes on serving)."""
        for name, (config, result) in opened.items():
            old = self._exports.get(name)
            if isinstance(result, ImageFormatError):
                if old is None:
                    self._broken[name] = (config, str(result))
                    log.error("%s", result)
                else:
                    log.error("%s; export %s keeps its previous settings", result, name)
                continue
            if old is not None:
                self._retire(old)
            self._exports[name] = result
            self._broken.pop(name, None)

    def _retire(self, export: Export) -> None:
        log.info("export %s: removed; %d connection(s) go on", export.name, export.connections)
        export.retire()
        if not export.closed:
            self._retired.append(export)

    def lookup(self, name: str, client=None) -> Export:
        """The export ``client`` (an `access.Client`) asked for; the empty name means a
        lone export."""
        export = self._exports.get(name)
        parent, slash, member = name.partition("/")
        if export is None and slash and parent in self._exports:
            return self._member(self._exports[parent], member, client)   # "fleet/vm42"
        if export is None and name == "" and len(self._exports) + len(self._broken) == 1:
            export = next(iter(self._exports.values()), None)
            name = next(iter(self._broken), name)
        if export is not None:
            return export
        if name in self._broken:
            raise NoSuchExport(f"export {name!r} is unavailable")
        raise NoSuchExport(f"no export named {name!r}")

    def _member(self, parent: Export, name: str, client) -> Export:
        """Ask the parent's provider; keep what it hands out until it closes."""
        member = self._providers[parent.config.kind].member(parent, name, client)
        if member not in self._members:
            self._members.append(member)
        return member

    def reopen_member(self, name: str, path: str) -> Export:
        """Open member ``name`` (``PARENT/ID``), which a previous server had open as the
        file ``path``, now and keep it for the connections it handed over (until
        `resumed`); NoSuchExport or ImageFormatError (one line) when it cannot be."""
        parent, _slash, member = name.partition("/")
        export = self._exports.get(parent)
        if export is None:
            raise NoSuchExport(f"export {name}: {parent!r} is not in the configuration any "
                               "more, and it has clients")
        try:
            opened = self._providers[export.config.kind].reopen(export, member, path)
        except OSError as exc:
            raise ImageFormatError(f"export {name}: {path}: {exc.strerror or exc}") from None
        if opened not in self._members:
            self._members.append(opened)
        return opened

    def resumed(self) -> None:
        """The connections a previous server handed over are back (`reopen_member`)."""
        for provider in self._providers.values():
            provider.resumed()

    def served(self, name: str) -> Export:
        """The export served under exactly ``name`` (no lone-export or member lookup)."""
        export = self._exports.get(name)
        if export is None:
            raise NoSuchExport(f"no export named {name!r}")
        return export

    def unavailable(self) -> list[tuple[str, str]]:
        """(name, why) of the configured exports that could not be opened."""
        return [(name, reason) for name, (_config, reason) in self._broken.items()]

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export that can be used."""
        return [(e.name, e.description) for e in self._exports.values()]

    def counts(self) -> tuple[int, int]:
        """(exports served, exports broken)."""
        return len(self._exports), len(self._broken)

    def open_exports(self) -> list[Export]:
        """Every export whose backend is still open, retired ones and members included."""
        self._retired = [e for e in self._retired if not e.closed]
        self._members = [e for e in self._members if not e.closed]
        return list(self._exports.values()) + self._retired + self._members

    def close_all(self) -> None:
        """Commit and close every backend (server shutdown)."""
        for export in self.open_exports():
            export.close()
        self._exports.clear()
