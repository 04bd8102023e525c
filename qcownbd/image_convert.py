"""`qcownbd convert`: copy a disk into a new raw or QCOW1 image, keeping it sparse.

Runs the source reports as zero are never read, zero blocks of what is read
are never written (so a raw output keeps its holes and a QCOW1 output
allocates no cluster for them), and with -B only the blocks that differ
from the new image's backing file are written.
"""

import os
import sys

from qcownbd.cli import setup_logging
from qcownbd.errors import ImageFormatError, UsageError
from qcownbd.image import formats
from qcownbd.image.formats import normalise_format
from qcownbd.image.probe import open_image

#: bytes read and compared per step
CHUNK = 1 << 20


def register_convert(sub, common) -> None:
    """Add `convert` to the `qcownbd` parser."""
    p = sub.add_parser("convert", parents=[common],
                       help="copy an image to a new raw or QCOW1 image, skipping zeros")
    p.add_argument("-f", "--format", default="auto", choices=formats.choices(auto=True),
                   help="format of SRC (default: probe)")
    p.add_argument("-O", "--output-format", default="raw", choices=formats.choices(),
                   help="format of DST (default: raw)")
    p.add_argument("-B", "--backing", metavar="BACKING",
                   help="make DST a QCOW1 overlay of BACKING (name stored as given, "
                        "relative to DST's directory); only differences are copied")
    p.add_argument("-F", "--backing-format", choices=formats.choices(),
                   help="format of BACKING (default: probe QCOW1, else raw)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    """Copy SRC into a new DST; a failed copy leaves no DST behind."""
    setup_logging(args)
    out_format = normalise_format(args.output_format, "output format")
    if args.backing is not None and not formats.FORMATS[out_format].supports_backing:
        needed = " or -O ".join(formats.with_backing())
        raise UsageError(f"convert: -B needs -O {needed} (a {out_format} image has no "
                         "backing file)")
    if os.path.lexists(args.dst):
        raise ImageFormatError(f"{args.dst}: already exists")
    src = open_image(args.src, fmt=args.format, read_only=True)
    try:
        convert_to_new(src, args.dst, out_format, backing=args.backing,
                       backing_format=args.backing_format, progress=not args.quiet)
    finally:
        src.close()
    return 0


def convert_to_new(src, dst_path: str, out_format: str, *, backing=None, backing_format=None,
                   progress: bool = True) -> None:
    """Copy the open backend ``src`` into the new image ``dst_path`` (removed on failure).

    Also used by `qcownbd fleet commit`, which opens its source itself.
    """
    if os.path.lexists(dst_path):
        raise ImageFormatError(f"{dst_path}: already exists")
    dst = _create(dst_path, out_format, src.size, backing, backing_format)
    try:
        bar = Progress(src.size, sys.stderr.isatty() and progress)
        copy_image(src, dst, backing is not None, bar)
        dst.flush()
        bar.finish()
    except BaseException:
        dst.close()
        os.unlink(dst_path)
        raise
    dst.close()


def _create(path: str, out_format: str, size: int, backing, backing_format):
    """Create the image empty and open it read-write."""
    formats.FORMATS[out_format].create(path, size, backing)
    try:
        return open_image(path, fmt=out_format, backing_format=backing_format)
    except BaseException:
        os.unlink(path)
        raise


def copy_image(src, dst, backed: bool, progress) -> None:
    """Copy every byte of ``src`` that ``dst`` does not already read the same."""
    buf = memoryview(bytearray(CHUNK))
    old = memoryview(bytearray(CHUNK)) if backed else None
    pos = 0
    while pos < src.size:
        for extent in src.block_status(pos, src.size - pos):
            if not (extent.zero and not backed):
                _copy_run(src, dst, pos, extent.length, extent.zero, buf, old)
            pos += extent.length
            progress.update(pos)


def _copy_run(src, dst, offset: int, length: int, zero: bool, buf, old) -> None:
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


class Progress:
    """qemu-img's "    (45.00/100%)" line on stderr, when it is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total = max(total, 1)
        self.enabled = enabled
        self.shown = -1

    def update(self, done: int) -> None:
        percent = int(10000 * done / self.total)
        if self.enabled and percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\r    ({percent / 100:.2f}/100%)")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total)
            sys.stderr.write("\n")
