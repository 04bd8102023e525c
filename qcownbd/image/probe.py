"""Open an image as the right backend, and the policy for its backing chain.

Probing is deliberately narrow: the formats of the table in `formats`
(QCOW1 by its magic and version 1, raw as the fallback).  Other formats
that share a recognisable signature are named and refused instead of being
exported as raw bytes, and a configured format pin always wins (probing a
guest-writable raw image is the classic attack of qcow1.md §6).

Backing names come from inside an image, so they are hostile input: they
are resolved against the overlay's directory only, protocol syntax
(`json:`, `nbd:`...) and NUL bytes are refused, loops are caught by
(st_dev, st_ino), the depth is capped and the files are opened read-only.
"""

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from qcownbd.errors import ImageFormatError
from qcownbd.image import formats, locking
from qcownbd.image.backend import Backend
from qcownbd.image.formats import AUTO, FALLBACK_SCORE, OpenOptions, normalise_format
from qcownbd.image.qcow1_header import qcow_version

PROBE_BYTES = 512
#: backing files below an exported image, at most
MAX_BACKING_DEPTH = 16

#: (offset, signature, format name) of formats we recognise only to refuse
FOREIGN_SIGNATURES = (
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK (descriptor)"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VPC/VHD"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"QED\0", "QED"),
    (64, struct.pack("<I", 0xBEDA107F), "VDI"),
)


def identify(first_bytes: bytes) -> str:
    """Name the format of a file from its first sector: a format of the table
    ("qcow1", "raw") or the name of a foreign one."""
    score, fmt = formats.best_match(first_bytes)
    if score > FALLBACK_SCORE:
        return fmt.name
    return _foreign(first_bytes) or fmt.name


def _foreign(first_bytes: bytes) -> str | None:
    """The name of a format we recognise only to refuse, or None."""
    version = qcow_version(first_bytes)
    if version in (2, 3):
        return f"qcow2 (version {version})"
    if version is not None:
        return f"QCOW of unknown version {version}"
    for offset, signature, name in FOREIGN_SIGNATURES:
        if first_bytes[offset:offset + len(signature)] == signature:
            return name
    return None


def open_image(path, *, fmt: str = "auto", read_only: bool = False,
               backing_format: str | None = None, allowed_backing_dirs=None,
               max_backing_depth: int = MAX_BACKING_DEPTH,
               lock: bool = True, allow_corrupt: bool = False,
               lend_backing: Callable[[bytes], Backend] | None = None) -> Backend:
    """Open ``path`` as a Backend: raw or QCOW1 (with its backing chain).

    ``fmt`` pins the format ("raw" never probes).  ``backing_format`` pins the
    format of the image's direct backing file.  ``allow_corrupt`` opens a
    corrupt QCOW1 image read-write for `check(repair=True)` only.
    ``lend_backing(name)`` supplies the direct backing file instead of opening
    it (a fleet lends its golden image, open once, to every overlay).  Every
    failure is an ImageFormatError with a one-line message naming the file.
    """
    policy = BackingPolicy(
        backing_format=normalise_format(backing_format, "backing format"),
        allowed_dirs=[os.path.realpath(d) for d in allowed_backing_dirs or ()],
        max_depth=max_backing_depth, lock=lock,
        lend_backing=lend_backing)
    fmt = normalise_format(fmt, "format")
    return policy.open(os.path.abspath(os.fsdecode(path)), fmt, read_only, depth=0,
                       allow_corrupt=allow_corrupt)


def open_backing_file(image_path, name: str, backing_format: str | None = None) -> Backend:
    """The backing file ``name`` of a future image at ``image_path``, opened read-only
    under `open_image`'s policy (`qcownbd create -b` checks it before writing)."""
    policy = BackingPolicy(backing_format=normalise_format(backing_format, "backing format"),
                           allowed_dirs=[], max_depth=MAX_BACKING_DEPTH, lock=True)
    return policy.open_backing(os.path.abspath(image_path), os.fsencode(name), 1)


@dataclass
class BackingPolicy:
    """How one export's chain is opened; one instance per `open_image` call."""

    backing_format: str | None
    allowed_dirs: list[str]
    max_depth: int
    lock: bool
    #: supplies the exported image's own backing file, instead of `open_backing`
    lend_backing: Callable[[bytes], Backend] | None = None
    #: (st_dev, st_ino) of every file already in the chain
    chain: set = field(default_factory=set)

    def open(self, path: str, fmt: str, read_only: bool, depth: int,
             allow_corrupt: bool = False) -> Backend:
        """Open one image of the chain (depth 0 is the exported image)."""
        fd = open_fd(path, read_only)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in self.chain:
                raise ImageFormatError(f"{path}: backing loop: the file is already in the chain")
            self.chain.add((st.st_dev, st.st_ino))
            if self.lock:
                lock_or_explain(fd, path, not read_only)
            if fmt == AUTO:
                fmt = probe_format(fd, path)
            return self._backend(fd, path, fmt, read_only, depth, allow_corrupt)
        except BaseException:
            os.close(fd)
            raise

    def _backend(self, fd: int, path: str, fmt: str, read_only: bool, depth: int,
                 allow_corrupt: bool) -> Backend:
        """Build the backend object, which owns ``fd`` from then on."""
        def backing_opener(name: bytes) -> Backend:
            if depth == 0 and self.lend_backing is not None:
                return self.lend_backing(name)
            return self.open_backing(path, name, depth + 1)

        return formats.FORMATS[fmt].open(fd, path, OpenOptions(
            read_only=read_only, backing_opener=backing_opener,
            allow_corrupt=allow_corrupt))

    def open_backing(self, overlay: str, name: bytes, depth: int) -> Backend:
        """Open the backing file ``name`` stored in ``overlay``, read-only, per policy."""
        try:
            resolved = self.resolve(overlay, name, depth)
        except ImageFormatError as exc:
            raise ImageFormatError(f"{overlay}: {exc}") from None
        fmt = self.backing_format if depth == 1 and self.backing_format else AUTO
        try:
            return self.open(resolved, fmt, True, depth)
        except ImageFormatError as exc:
            # the same class: a backing file in use is still an image in use
            raise type(exc)(f"{overlay}: backing file: {exc}") from None

    def resolve(self, overlay: str, name: bytes, depth: int) -> str:
        """The path ``name`` designates, or ImageFormatError when the policy refuses it."""
        shown = repr(name.decode("utf-8", "backslashreplace"))
        if depth > self.max_depth:
            raise ImageFormatError(f"backing chain deeper than {self.max_depth} at {shown}")
        if not name:
            raise ImageFormatError("empty backing file name")
        if b"\0" in name:
            raise ImageFormatError(f"backing file name {shown} contains a NUL byte")
        colon, slash = name.find(b":"), name.find(b"/")
        if colon != -1 and (slash == -1 or colon < slash):
            raise ImageFormatError(
                f"backing file name {shown} uses protocol syntax (json:, nbd:...); "
                "only plain file names are allowed (write ./name for a colon in a name)")
        resolved = os.path.join(os.path.dirname(overlay), os.fsdecode(name))
        if self.allowed_dirs:
            # open the checked real path, so a symlink swapped later cannot escape
            resolved = os.path.realpath(resolved)
            if not self._inside_allowed(resolved):
                raise ImageFormatError(f"backing file {shown} is outside the allowed directories")
        return resolved

    def _inside_allowed(self, real: str) -> bool:
        return any(os.path.commonpath([real, d]) == d for d in self.allowed_dirs)


def open_fd(path: str, read_only: bool) -> int:
    """Open a regular file or block device; one-line errors for everything else."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        # O_NONBLOCK so a FIFO cannot hang the open; cleared again below
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageFormatError(f"{path}: {open_error_text(exc)}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file or block device"
        raise ImageFormatError(f"{path}: {kind}")
    os.set_blocking(fd, True)
    return fd


def open_error_text(exc: OSError) -> str:
    """A short reason for a failed open."""
    texts = {FileNotFoundError: "no such file", PermissionError: "permission denied",
             IsADirectoryError: "a directory"}
    return texts.get(type(exc), exc.strerror or str(exc))


def lock_or_explain(fd: int, path: str, writable: bool) -> None:
    """lock_image, with the file named in the error and the way out suggested."""
    try:
        locking.lock_image(fd, writable)
    except locking.ImageInUse as exc:
        raise locking.ImageInUse(f"{path}: {exc}; stop the other user first") from None
    except ImageFormatError as exc:
        raise ImageFormatError(f"{path}: {exc}") from None


def probe_format(fd: int, path: str) -> str:
    """The table's name for a file's format; other known formats are refused."""
    try:
        first = os.pread(fd, PROBE_BYTES, 0)
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot read: {exc.strerror}") from None
    name = identify(first)
    if name in formats.FORMATS:
        return name
    raise ImageFormatError(
        f"{path}: is a {name} image; qcownbd serves only QCOW1 and raw "
        "(convert it with qemu-img, or pin the format to raw to export its bytes as they are)")
