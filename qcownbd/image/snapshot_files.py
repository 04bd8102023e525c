"""The file steps of a live snapshot: the image keeps its bytes under a new
name, and a new empty QCOW1 overlay of it takes the image's own name.

So the export's configured path always names the live disk (a restart
serves what the clients wrote after the snapshot), and the snapshot is the
old image file itself, from then on only ever opened read-only as the
overlay's backing file.  The swap is crash-safe: the overlay is written and
synced under a temporary name, the snapshot name is a hard link to the
image, and one rename puts the overlay in place, so at every moment the
image's name holds either the old image or a complete overlay of it.
"""

import os
import secrets
import time

from qcownbd.errors import ImageFormatError
from qcownbd.image.qcow1_header import create_qcow1


def default_name(path: str, now: float | None = None) -> str:
    """``disk.snap-20261202T101500Z.qcow`` for ``/images/disk.qcow``."""
    stem, suffix = os.path.splitext(os.path.basename(path))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stem}.snap-{stamp}{suffix}"


def check_name(name: str) -> None:
    """A snapshot name is a plain file name beside the image (the overlay stores it as
    its backing file name, resolved in its own directory)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ImageFormatError(f"snapshot name {name!r}: give a plain file name "
                               "(it is created beside the image)")
    if ":" in name:
        raise ImageFormatError(f"snapshot name {name!r}: a colon would read as protocol "
                               "syntax in a backing file name")
    if name.startswith("."):
        raise ImageFormatError(f"snapshot name {name!r}: must not start with a dot")


def split_off_snapshot(path: str, size: int, name: str) -> str:
    """Keep the image at ``path`` as ``name`` beside it and put an empty overlay of it
    (``size`` bytes, the image's permissions) at ``path``; returns the snapshot's path.

    The caller holds the image open with its pointers committed and no writes
    in flight.  On failure nothing is left changed.
    """
    check_name(name)
    directory = os.path.dirname(os.path.abspath(path))
    snapshot = os.path.join(directory, name)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    linked = False
    try:
        create_qcow1(temp, size, name)
        os.chmod(temp, os.stat(path).st_mode & 0o777)
        os.link(path, snapshot)
        linked = True
        os.rename(temp, path)
        sync_directory(directory)
    except FileExistsError:
        raise ImageFormatError(f"{snapshot}: already exists") from None
    except OSError as exc:
        if linked:
            os.unlink(snapshot)
        raise ImageFormatError(f"{path}: snapshot failed: {exc.strerror}") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return snapshot


def undo_split(path: str, snapshot: str) -> None:
    """Put the snapshot back at ``path`` (the overlay could not be opened): the image
    serves on as before the snapshot."""
    os.rename(snapshot, path)
    sync_directory(os.path.dirname(os.path.abspath(path)))


def sync_directory(directory: str) -> None:
    """Make the names just created or replaced in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
