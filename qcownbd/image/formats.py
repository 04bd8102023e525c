"""The one table of image formats, shaped after QEMU's BlockDriver list.

One entry per format: its names, a probe that scores a file's first bytes,
how to open and to create it, whether it can have a backing file, and what
it reports to `info`, `map` and `check`.  Every list of formats (argparse
choices, the config's, the fleet's) and every per-format decision comes
from here: a new format is one module plus one line in `FORMATS`.
"""

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qcownbd.errors import ImageFormatError
from qcownbd.image import layout
from qcownbd.image.backend import Backend
from qcownbd.image.qcow1 import Qcow1Image, create_qcow1, is_qcow1
from qcownbd.image.raw import RawImage, create_raw

#: the choice that asks for probing instead of naming a format
AUTO = "auto"
#: a probe score that takes any bytes: such a format wins only when no other matches
FALLBACK_SCORE = 1


@dataclass(frozen=True)
class OpenOptions:
    """What `ImageFormat.open` needs beyond the fd and the path."""

    read_only: bool
    #: opens the backing file named inside the image (formats with backing files)
    backing_opener: Callable[[bytes], Backend] | None = None
    #: open a corrupt image read-write, for `check` repairs only
    allow_corrupt: bool = False


@dataclass(frozen=True)
class ImageFormat:
    """One format's entry in the table."""

    name: str
    #: other names operators may use (QEMU's "qcow" for qcow1)
    aliases: tuple[str, ...]
    #: score of a file's first bytes: 0 not this format, higher wins
    probe: Callable[[bytes], int]
    #: the backend over an open fd (which it owns once it returns)
    open: Callable[[int, str, OpenOptions], Backend]
    #: create an empty image: (path, size, backing file name or None)
    create: Callable[[str, int, str | None], None]
    supports_backing: bool
    #: `info` keys of the image itself, qemu-img's JSON names
    describe: Callable[[Backend], dict]
    #: `map` entries of the image itself: (image, start, length, depth)
    map: Callable[[Backend, int, int, int], Iterator[dict]]
    #: the metadata scan of `check` (image, repair=, progress=); None: no metadata
    check: Callable | None = None


def _open_raw(fd: int, path: str, options: OpenOptions) -> Backend:
    return RawImage(fd, path, read_only=options.read_only)


def _create_raw(path: str, size: int, backing_name: str | None) -> None:
    # callers name a backing file only for formats whose supports_backing says so
    create_raw(path, size)


def _open_qcow1(fd: int, path: str, options: OpenOptions) -> Backend:
    return Qcow1Image(fd, path, read_only=options.read_only,
                      backing_opener=options.backing_opener,
                      allow_corrupt=options.allow_corrupt)


RAW = ImageFormat(
    name="raw", aliases=(), probe=lambda first_bytes: FALLBACK_SCORE, open=_open_raw,
    create=_create_raw, supports_backing=False, describe=layout.raw_facts, map=layout.raw_map)
QCOW1 = ImageFormat(
    name="qcow1", aliases=("qcow",), probe=lambda first_bytes: 100 * is_qcow1(first_bytes),
    open=_open_qcow1, create=create_qcow1, supports_backing=True,
    describe=layout.qcow1_facts, map=layout.qcow1_map, check=Qcow1Image.check)

FORMATS: dict[str, ImageFormat] = {fmt.name: fmt for fmt in (RAW, QCOW1)}
_BY_NAME = {alias: fmt for fmt in FORMATS.values() for alias in (fmt.name, *fmt.aliases)}


def choices(auto: bool = False) -> list[str]:
    """Every name and alias, for argparse and config checks; ``auto`` puts "auto" first."""
    return ([AUTO] if auto else []) + list(_BY_NAME)


def lookup(name: str) -> ImageFormat | None:
    """The format called ``name`` (or one of its aliases); None for anything else."""
    return _BY_NAME.get(name)


def normalise_format(fmt: str | None, what: str) -> str | None:
    """A format name given by the operator, aliases resolved; "auto" stays "auto"."""
    if fmt is None or fmt == AUTO:
        return fmt
    found = lookup(fmt)
    if found is None:
        raise ImageFormatError(
            f"unknown {what} {fmt!r} (use one of: {', '.join([AUTO, *FORMATS])})")
    return found.name


def with_backing() -> list[str]:
    """The names of the formats that can have a backing file."""
    return [fmt.name for fmt in FORMATS.values() if fmt.supports_backing]


def of(img: Backend) -> ImageFormat:
    """The table entry of an open image."""
    return FORMATS[img.format_name]


def best_match(first_bytes: bytes) -> tuple[int, ImageFormat]:
    """(score, format) of the format that scores a file's first bytes highest."""
    return max(((fmt.probe(first_bytes), fmt) for fmt in FORMATS.values()),
               key=lambda scored: scored[0])


# -- what `info` and `map` show, down the backing chain -------------------------

def chain_of(img: Backend) -> list[Backend]:
    """The image and every backing file under it, top first."""
    chain = [img]
    while chain[-1].backing is not None:
        chain.append(chain[-1].backing)
    return chain


def describe(img: Backend) -> dict:
    """The info of one image, with qemu-img's JSON keys where they exist."""
    st = os.stat(img.path)
    return {"filename": img.path, "format": img.format_name, "virtual-size": img.size,
            "actual-size": st.st_blocks * 512, **of(img).describe(img)}


def chain_map(img: Backend, start: int, length: int, depth: int = 0):
    """Yield map entries covering [start, start+length) of ``img`` and its backing chain."""
    for entry in of(img).map(img, start, length, depth):
        if entry["present"] or img.backing is None:
            yield entry
        else:
            yield from _below(img, entry["start"], entry["length"], depth)


def _below(img: Backend, start: int, length: int, depth: int):
    """Entries for a run ``img`` does not store: its backing file's, past its end none."""
    backing = img.backing
    inside = max(0, min(length, backing.size - start))
    if inside:
        yield from chain_map(backing, start, inside, depth + 1)
    if inside < length:
        yield layout.map_entry(start + inside, length - inside, 0, False, True, False, img.path)
