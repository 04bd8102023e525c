"""The copy engine of `convert` and `fleet commit`: a disk into a new image, kept sparse.

Runs the source reports as zero are never read, zero blocks of what is read
are never written (so a raw output keeps its holes and a QCOW1 output
allocates no cluster for them), and with a backing file only the blocks
that differ from what the new image already reads through it are written.
"""

import os
from collections.abc import Callable

from qcownbd.errors import ImageFormatError
from qcownbd.image import formats
from qcownbd.image.probe import open_image

#: bytes read and compared per step
CHUNK = 1 << 20


def convert_to_new(src, dst_path: str, out_format: str, *, backing=None, backing_format=None,
                   progress: Callable[[int], None] | None = None) -> None:
    """Copy the open backend ``src`` into the new image ``dst_path`` (removed on failure).

    ``backing`` names the new image's backing file (stored as given);
    ``progress(bytes_done)`` is called as the copy goes.
    """
    if os.path.lexists(dst_path):
        raise ImageFormatError(f"{dst_path}: already exists")
    dst = _create(dst_path, out_format, src.size, backing, backing_format)
    try:
        copy_image(src, dst, backing is not None, progress or _no_progress)
        dst.flush()
    except BaseException:
        dst.close()
        os.unlink(dst_path)
        raise
    dst.close()


def _no_progress(done: int) -> None:
    """Nobody is watching."""


def _create(path: str, out_format: str, size: int, backing, backing_format):
    """Create the image empty and open it read-write."""
    formats.FORMATS[out_format].create(path, size, backing)
    try:
        return open_image(path, fmt=out_format, backing_format=backing_format)
    except BaseException:
        os.unlink(path)
        raise


def copy_image(src, dst, backed: bool, progress: Callable[[int], None]) -> None:
    """Copy every byte of ``src`` that ``dst`` does not already read the same;
    ``progress`` hears of every chunk (one extent may be the whole disk)."""
    buf = memoryview(bytearray(CHUNK))
    old = memoryview(bytearray(CHUNK)) if backed else None
    pos = 0
    while pos < src.size:
        for extent in src.block_status(pos, src.size - pos):
            if not (extent.zero and not backed):
                _copy_run(src, dst, pos, extent.length, extent.zero, buf, old, progress)
            pos += extent.length
            progress(pos)


def _copy_run(src, dst, offset: int, length: int, zero: bool, buf, old,
              progress: Callable[[int], None]) -> None:
    end = offset + length
    while offset < end:
        view = buf[:min(CHUNK, end - offset)]
        if zero:
            view[:] = bytes(len(view))
        else:
            src.read_into(offset, view)
        base = None
        if old is not None:
            base = old[:len(view)]
            dst.read_into(offset, base)    # a fresh overlay reads its backing file
        _write_changes(dst, offset, view, base)
        offset += len(view)
        progress(offset)


def _write_changes(dst, offset: int, view, base) -> None:
    """Write the blocks of ``view`` that differ from ``base`` (zeros when None)."""
    block = max(512, dst.preferred_block_size)
    zeros = bytes(block)
    run_start = None
    pos = 0
    while pos < len(view):
        # blocks are aligned to the disk, not to this buffer
        step = min(block - (offset + pos) % block, len(view) - pos)
        old = base[pos:pos + step] if base is not None else zeros[:step]
        differs = view[pos:pos + step] != old
        if differs and run_start is None:
            run_start = pos
        elif not differs and run_start is not None:
            _write_run(dst, offset + run_start, view[run_start:pos])
            run_start = None
        pos += step
    if run_start is not None:
        _write_run(dst, offset + run_start, view[run_start:])


def _write_run(dst, offset: int, data) -> None:
    if data == bytes(len(data)):
        # only with a backing file: zeros over non-zero backing data
        dst.write_zeroes(offset, len(data), may_trim=True)
    else:
        dst.write(offset, data)
