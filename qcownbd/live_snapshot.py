"""`qcownbd snapshot` on a served export: a pause for its clients, never an error.

The steps, for one export: its connections stop taking requests (those
running finish, queued ones wait in their sockets); the image's pending
pointers are committed; `snapshot_files.split_off_snapshot` keeps the image
under the snapshot's name and puts an empty overlay of it at the image's
path; the old backend is closed and the overlay opened (its backing chain,
the snapshot first, read-only); the export and every connection switch to
it and resume.  If the overlay cannot be opened, the files are put back and
the old image opened again, so the export serves on as before.
"""

import asyncio
import logging
import os
import time

from qcownbd.errors import ControlError, ImageFormatError, QcownbdError
from qcownbd.image import locking
from qcownbd.image.qcow1 import Qcow1Image
from qcownbd.image.snapshot_files import default_name, split_off_snapshot, undo_split

log = logging.getLogger("qcownbd.snapshot")

#: how long running requests (a flush, a long zeroing) may take to finish
FREEZE_TIMEOUT = 60.0


def check_snapshottable(export) -> None:
    """ControlError unless a snapshot of ``export`` can be taken and served again after
    a restart from the same configuration."""
    config = export.config
    if config.kind != "image" or export.transient:
        raise ControlError(f"export {export.name}: snapshots are for image exports "
                           "(a fleet overlay is one already)")
    if export.read_only:
        raise ControlError(f"export {export.name}: read-only, nothing to snapshot")
    if not isinstance(export.backend, Qcow1Image):
        raise ControlError(f"export {export.name}: snapshots need a whole QCOW1 image "
                           "(the new overlay is QCOW1, and backs onto the image itself)")
    if config.format not in ("auto", "qcow1") or config.backing_format not in (None, "qcow1"):
        raise ControlError(
            f"export {export.name}: its configured format pins would not fit the chain "
            "after a snapshot (format must be auto or qcow1, backing_format unset or qcow1)")


async def take_snapshot(server, export, reopen, name: str | None = None) -> dict:
    """Snapshot the served ``export``; ``reopen(config)`` opens an export config's image
    (`ImageProvider.open_backend`).  Returns what was done, for the control answer."""
    check_snapshottable(export)
    path = export.config.path
    name = name or default_name(path)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await server.freeze(export, FREEZE_TIMEOUT)
    try:
        new, snapshot = await loop.run_in_executor(
            None, _swap_files, export.backend, path, name, export.config, reopen)
        export.switch_backend(new)
    finally:
        server.thaw(export)
    paused = time.monotonic() - started
    log.info("export %s: snapshot %s taken; clients paused %.3f s", export.name, snapshot, paused)
    return {"export": export.name, "image": os.path.abspath(path), "snapshot": snapshot,
            "paused_seconds": round(paused, 6)}


def _swap_files(old: Qcow1Image, path: str, name: str, config, reopen):
    """In a worker thread, with the export frozen: (new backend, snapshot path).

    The old image stays open until the overlay is: its lock is lowered to a
    reader's (the overlay's chain opens the same file read-only, and our own
    write lock would refuse it), and raised again if the overlay fails, so
    the export then serves on from the old image, files put back.
    """
    try:
        old.flush()
        snapshot = split_off_snapshot(path, old.size, name)
    except QcownbdError as exc:
        raise ControlError(f"export {config.name}: {exc}") from None
    locking.unlock_image(old.fd)
    locking.lock_image(old.fd, writable=False)
    try:
        new = reopen(config)
    except ImageFormatError as exc:
        undo_split(path, snapshot)
        locking.lock_image(old.fd, writable=True)
        raise ControlError(f"export {config.name}: the new overlay did not open ({exc}); "
                           "the snapshot was undone") from None
    old.close()
    return new, snapshot
