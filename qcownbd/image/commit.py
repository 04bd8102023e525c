"""`qcownbd commit`: an overlay's own clusters written down into its backing file.

The order keeps what the chain reads the same whatever the moment of a
crash: the overlay's data goes into the backing file and is made durable
there first (the overlay still shadows all of it), and only then does the
overlay let go of its clusters (its zeroed L1 table is durable before the
file is cut back), so it ends empty, reading as its backing file - what
`qemu-img commit` leaves.  A commit cut short is finished by running it
again.  The backing file is opened for writing with QEMU's locks: anyone
else holding it (a server, a VM, another overlay's reader) makes the commit
refuse before writing anything.
"""

import os
from collections.abc import Callable

from qcownbd.errors import ImageFormatError
from qcownbd.image.backend import Backend
from qcownbd.image.formats import AUTO, normalise_format
from qcownbd.image.probe import MAX_BACKING_DEPTH, BackingPolicy, open_image

#: bytes copied per read/write
COPY_CHUNK = 4 << 20


def commit_overlay(path, *, backing_format: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[int, str]:
    """Commit the QCOW1 overlay ``path`` into its backing file and empty it.

    Returns (bytes committed, the backing file's path).  ``progress(done,
    total)`` follows the bytes copied.
    """
    path = os.path.abspath(os.fsdecode(path))
    policy = BackingPolicy(backing_format=normalise_format(backing_format, "backing format"),
                           allowed_dirs=[], max_depth=MAX_BACKING_DEPTH, lock=True)
    opened: list[tuple[str, Backend]] = []

    def open_for_writing(name: bytes) -> Backend:
        try:
            resolved = policy.resolve(path, name, 1)
            st = os.stat(path)
            policy.chain.add((st.st_dev, st.st_ino))    # an overlay naming itself: a loop
            backend = policy.open(resolved, policy.backing_format or AUTO, False, 1)
        except ImageFormatError as exc:
            raise ImageFormatError(f"{path}: backing file: {exc}") from None
        opened.append((resolved, backend))
        return backend

    overlay = open_image(path, fmt="qcow1", read_only=False, lend_backing=open_for_writing)
    try:
        if not opened:
            raise ImageFormatError(f"{path}: has no backing file to commit into")
        backing_path, backing = opened[0]
        runs = [(start, length) for start, length, _kind, _host, depth
                in overlay.map_extents() if depth]
        end = max((start + length for start, length in runs), default=0)
        if end > backing.size:
            raise ImageFormatError(
                f"{path}: holds data up to byte {end}, past the end of its "
                f"{backing.size}-byte backing file {backing_path}; nothing was changed")
        committed = _copy_down(overlay, backing, runs, progress)
        backing.flush()         # durable below before the overlay lets go of it
        overlay.drop_all()
    finally:
        overlay.close()
    return committed, backing_path


def _copy_down(overlay, backing: Backend, runs, progress) -> int:
    buffer = memoryview(bytearray(min(COPY_CHUNK, overlay.size)))
    done, total = 0, sum(length for _start, length in runs)
    for start, length in runs:
        for pos in range(start, start + length, COPY_CHUNK):
            piece = buffer[:min(COPY_CHUNK, start + length - pos)]
            overlay.read_into(pos, piece)
            backing.write(pos, piece)
            done += len(piece)
            if progress is not None:
                progress(done, total)
    return done
