"""Image subcommands: create, info, map, check, convert, commit.

They mirror the qemu-img commands of the same names for the formats
qcownbd serves (`qcow1`, which QEMU calls `qcow`, and `raw`), and open
images through the same `open_image` the server uses, so the backing-file
policy and the locks are the same too.
"""

import json
import os
import sys

from qcownbd.console import Progress, human_size, parse_size, setup_logging
from qcownbd.errors import ImageFormatError, UsageError
from qcownbd.image import formats
from qcownbd.image.commit import commit_overlay
from qcownbd.image.convert import convert_to_new
from qcownbd.image.formats import chain_map, chain_of, describe, normalise_format
from qcownbd.image.layout import merge_map
from qcownbd.image.locking import ImageInUse
from qcownbd.image.probe import open_backing_file, open_image

#: qemu-img's exit statuses for `check`
CHECK_CLEAN, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 2, 3, 63



def register(sub, common) -> None:
    """Add the image subcommands to the `qcownbd` parser."""
    _register_create(sub, common)
    _register_readers(sub, common)
    _register_convert(sub, common)
    _register_commit(sub, common)


def _register_create(sub, common) -> None:
    p = sub.add_parser("create", parents=[common],
                       help="create an empty QCOW1 (or raw) image, as qemu-img create does")
    p.add_argument("-f", "--format", default=formats.QCOW1.name, choices=formats.choices(),
                   help="format of IMAGE (default: qcow1, byte-identical to qemu-img "
                        "create -f qcow)")
    p.add_argument("-b", "--backing", metavar="BACKING",
                   help="backing file name, stored as given (relative to IMAGE's directory)")
    p.add_argument("-F", "--backing-format", choices=formats.choices(auto=True),
                   help="format of BACKING (default: probe QCOW1, else raw)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("size", metavar="SIZE", nargs="?",
                   help="virtual size in bytes or with K/M/G/T (default with -b: the backing's)")
    p.set_defaults(func=cmd_create)


def _register_readers(sub, common) -> None:
    helps = {"info": "show format, sizes and backing chain of an image",
             "map": "show where each part of the disk is stored (like qemu-img map)",
             "check": "scan QCOW1 metadata for corruption and leaks"}
    funcs = {"info": cmd_info, "map": cmd_map, "check": cmd_check}
    for name, text in helps.items():
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("-f", "--format", default="auto", choices=formats.choices(auto=True),
                       help="image format (default: probe)")
        if name == "check":
            p.add_argument("-r", "--repair", action="store_true",
                           help="drop bad pointers durably and report what was lost")
        else:
            p.add_argument("--json", action="store_true", help="JSON output")
            p.add_argument("-U", "--force-share", action="store_true",
                           help="open even if another process writes the image (may be stale)")
        p.add_argument("image", metavar="IMAGE")
        p.set_defaults(func=funcs[name])


def _register_convert(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common],
                       help="copy an image to a new raw or QCOW1 image, skipping zeros")
    p.add_argument("-f", "--format", default="auto", choices=formats.choices(auto=True),
                   help="format of SRC (default: probe)")
    p.add_argument("-O", "--output-format", default="raw", choices=formats.choices(),
                   help="format of DST (default: raw)")
    p.add_argument("-B", "--backing", metavar="BACKING",
                   help="make DST a QCOW1 overlay of BACKING (name stored as given, "
                        "relative to DST's directory); only differences are copied")
    p.add_argument("-F", "--backing-format", choices=formats.choices(auto=True),
                   help="format of BACKING (default: probe QCOW1, else raw)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=cmd_convert)


def _register_commit(sub, common) -> None:
    p = sub.add_parser("commit", parents=[common],
                       help="write a QCOW1 overlay's data into its backing file, then empty "
                            "the overlay (as qemu-img commit does)")
    p.add_argument("-F", "--backing-format", choices=formats.choices(auto=True),
                   help="format of the backing file (default: probe QCOW1, else raw)")
    p.add_argument("image", metavar="OVERLAY")
    p.set_defaults(func=cmd_commit)


# -- create --------------------------------------------------------------------

def cmd_create(args) -> int:
    """`qcownbd create`: an empty image, a QCOW1 one optionally over a backing file."""
    setup_logging(args)
    fmt = formats.FORMATS[normalise_format(args.format, "format")]
    if args.backing is not None and not fmt.supports_backing:
        raise UsageError(f"create: -b needs -f {' or -f '.join(formats.with_backing())} "
                         f"(a {fmt.name} image has no backing file)")
    size = parse_size(args.size) if args.size is not None else None
    if args.backing is not None:
        backing_size = _backing_size(args.image, args.backing, args.backing_format)
        size = backing_size if size is None else size
    elif size is None:
        raise UsageError("create: SIZE is required without -b BACKING")
    if os.path.lexists(args.image):
        raise ImageFormatError(f"{args.image}: already exists")
    fmt.create(args.image, size, args.backing)
    return 0


def _backing_size(image: str, name: str, backing_format: str | None) -> int:
    """Open BACKING as the server later would (same policy), and return its size."""
    backing = open_backing_file(image, name, backing_format)
    try:
        return backing.size
    finally:
        backing.close()


# -- info ----------------------------------------------------------------------

def _open_for_reading(args):
    """Open IMAGE for info and map, which have -U for an image in use."""
    try:
        return open_image(args.image, fmt=args.format, read_only=True, lock=not args.force_share)
    except ImageInUse as exc:
        raise ImageInUse(f"{exc}, or add -U (--force-share) to read it anyway "
                         "(what it shows may be stale)") from None


def cmd_info(args) -> int:
    """`qcownbd info`: format, virtual size, cluster size, allocation, backing chain."""
    setup_logging(args)
    img = _open_for_reading(args)
    try:
        infos = [describe(level) for level in chain_of(img)]
    finally:
        img.close()
    top = dict(infos[0], **{"backing-chain": infos[1:]})
    if args.json:
        print(json.dumps(top, indent=4))
        return 0
    lines = [f"image: {top['filename']}", f"file format: {top['format']}",
             f"virtual size: {human_size(top['virtual-size'])} ({top['virtual-size']} bytes)",
             f"disk size: {human_size(top['actual-size'])}"]
    if "cluster-size" in top:
        lines.append(f"cluster_size: {top['cluster-size']}")
    lines.append(f"allocated: {human_size(top['allocated-bytes'])} "
                 f"({top['allocated-bytes']} bytes)")
    if "backing-filename" in top:
        lines.append(f"backing file: {top['backing-filename']} "
                     f"(actual path: {top['full-backing-filename']})")
        lines.append(f"backing file format: {top['backing-format']}")
    for depth, level in enumerate(infos[1:], 1):
        lines.append(f"backing chain {depth}: {level['filename']} ({level['format']}, "
                     f"{human_size(level['virtual-size'])})")
    print("\n".join(lines))
    return 0


# -- map -----------------------------------------------------------------------

def cmd_map(args) -> int:
    """`qcownbd map`: allocation of the whole disk across the chain."""
    setup_logging(args)
    img = _open_for_reading(args)
    try:
        entries = merge_map(chain_map(img, 0, img.size, 0))
    finally:
        img.close()
    if args.json:
        # qemu-img's exact layout, one entry per line, without our "file" key
        lines = ["{ " + json.dumps({k: v for k, v in e.items() if k != "file"})[1:-1] + "}"
                 for e in entries]
        print("[" + ",\n".join(lines) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if e["data"]:
            where = c_hex(e["offset"]) if "offset" in e else "compressed"
            print(f"{c_hex(e['start']):<16}{c_hex(e['length']):<16}{where:<16}{e['file']}")
    return 0


def c_hex(value: int) -> str:
    """printf's %#x, as qemu-img prints it: 0 rather than 0x0."""
    return f"{value:#x}" if value else "0"


# -- check ---------------------------------------------------------------------

def cmd_check(args) -> int:
    """`qcownbd check`: exit 0 clean, 2 corruption, 3 leaks only (qemu-img's codes)."""
    setup_logging(args)
    img = open_image(args.image, fmt=args.format, read_only=not args.repair,
                     allow_corrupt=args.repair)
    try:
        check = formats.of(img).check
        if check is None:
            print(f"qcownbd: {args.image}: {img.format_name} images have no metadata to check",
                  file=sys.stderr)
            return CHECK_UNSUPPORTED
        bar = Progress(100, sys.stderr.isatty() and not args.quiet)
        report = check(img, repair=args.repair,
                       progress=lambda done, total: bar.update(100 * done / total))
        bar.finish()
        _print_bounded("ERROR", report.corruptions, report.corruption_count)
        _print_bounded("Repaired", report.repaired, report.repaired_count)
        if args.repair and report.repaired_count:
            report = check(img, repair=False)
    finally:
        img.close()
    return _check_summary(report)


def _print_bounded(label: str, messages: list[str], count: int) -> None:
    for message in messages:
        print(f"{label}: {message}")
    if count > len(messages):
        print(f"{label}: ... and {count - len(messages)} more")


def _check_summary(report) -> int:
    if report.corruption_count:
        print(f"{report.corruption_count} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
        return CHECK_CORRUPT
    if report.leaked_bytes:
        print(f"{report.leaked_bytes} leaked bytes were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
        return CHECK_LEAKS
    print("No errors were found on the image.")
    return CHECK_CLEAN


# -- convert -------------------------------------------------------------------

def cmd_convert(args) -> int:
    """`qcownbd convert`: copy SRC into a new DST; a failed copy leaves no DST behind."""
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
        bar = Progress(src.size, sys.stderr.isatty() and not args.quiet)
        convert_to_new(src, args.dst, out_format, backing=args.backing,
                       backing_format=args.backing_format, progress=bar.update)
        bar.finish()
    finally:
        src.close()
    return 0


# -- commit --------------------------------------------------------------------

def cmd_commit(args) -> int:
    """`qcownbd commit`: the overlay's clusters into its backing file, crash-safe order."""
    setup_logging(args)
    enabled, bars = sys.stderr.isatty() and not args.quiet, []

    def show(done: int, total: int) -> None:
        if not bars:
            bars.append(Progress(total, enabled))
        bars[0].update(done)

    committed, backing = commit_overlay(args.image, backing_format=args.backing_format,
                                        progress=show)
    if bars:
        bars[0].finish()
    print(f"Image committed: {human_size(committed)} written into {backing}; "
          f"{args.image} is empty now.")
    return 0
