"""The one interface between the NBD server and an image format.

The server knows nothing of formats; a backend knows nothing of NBD.
Offsets and lengths are bytes, any alignment, always inside ``size``
(the server checks ranges before calling).  Failures raise
`ImageIOError(errno)`; nothing else escapes a backend method.

Threading: every method is called from the event-loop thread, except
`flush`, which the server may run in a worker thread while the loop thread
goes on reading and writing.  Implementations make that one overlap safe.
"""

import ctypes
import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .faults import syscalls

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
#: errnos that mean "this kind of fallocate/ioctl is not available here"
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS,
                         errno.ENOTTY, errno.EINVAL})

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate64 = _libc.fallocate64
_fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate64.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (the standard library has no binding); raises OSError with its errno."""
    if _fallocate64(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the range's blocks back to the filesystem (it reads zeros after);
    False where the filesystem cannot, which changes nothing."""
    try:
        fallocate(fd, PUNCH_HOLE, offset, length)
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return False
        raise
    return True


def pread_filling(fd: int, view: memoryview, offset: int) -> None:
    """Fill the byte view ``view`` from ``fd`` at ``offset``; bytes past the file's
    end read as zeros (QEMU parity: a file that shrank, a cluster past EOF).

    Raises the OSError of a failed read; callers say what was being read.
    """
    done = 0
    while done < len(view):
        got = syscalls.preadv(fd, [view[done:]], offset + done)
        if not got:
            view[done:] = bytes(len(view) - done)
            return
        done += got


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk with one allocation state.

    ``hole``: no image in the chain stores these bytes (NBD_STATE_HOLE).
    ``zero``: the bytes read as zeros (NBD_STATE_ZERO).
    ``depth``: qemu:allocation-depth: 0 unallocated everywhere, 1 this image,
    2 its backing file, and so on.
    """

    length: int
    hole: bool
    zero: bool
    depth: int


def append_extent(extents: list, extent: Extent) -> None:
    """Append, merging with the previous extent when the state is equal."""
    if extents and (extents[-1].hole, extents[-1].zero, extents[-1].depth) == (
            extent.hole, extent.zero, extent.depth):
        last = extents.pop()
        extent = Extent(last.length + extent.length, extent.hole, extent.zero, extent.depth)
    extents.append(extent)


class Backend(ABC):
    """An open image exported as a flat disk of ``size`` bytes."""

    #: short format name for logs and `info` ("raw", "qcow1")
    format_name: str = ""
    #: virtual disk size in bytes
    size: int = 0
    #: True when writes, trims and zero writes are refused
    read_only: bool = True
    #: the I/O size the format prefers (the cluster size for QCOW1)
    preferred_block_size: int = 4096
    #: whether trim actually frees anything (else the server may still accept it as a no-op)
    can_trim: bool = False
    #: whether write_zeroes(fast=True) can ever succeed
    can_fast_zero: bool = False
    #: the open backing file whose bytes show where this image stores none
    backing: "Backend | None" = None

    #: what a backend standing in front of another (a window, a shared handle) shows
    #: as its own: the inner backend's format and capabilities
    PRESENTED = ("format_name", "read_only", "preferred_block_size", "can_trim",
                 "can_fast_zero")

    def present_as(self, inner: "Backend") -> None:
        """Show ``inner``'s format and capabilities (`PRESENTED`) as this backend's."""
        for name in self.PRESENTED:
            setattr(self, name, getattr(inner, name))

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the disk's bytes starting at ``offset``."""

    @abstractmethod
    def write(self, offset: int, data) -> None:
        """Write the bytes-like ``data`` at ``offset`` (durable only after `flush`)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write that completed before this call durable."""

    @abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """Say that the range's contents are no longer needed (may do nothing)."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Make the range read as zeros.

        ``may_trim``: holes are acceptable (NBD's NO_HOLE clear).
        ``fast``: raise ImageIOError(ENOTSUP) at once, writing nothing, when
        zeroing would cost real data writes (NBD_CMD_FLAG_FAST_ZERO).
        """

    @abstractmethod
    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe the allocation of the range as contiguous extents from ``offset``.

        The extents cover at least one byte and at most ``length`` bytes;
        adjacent extents with equal state should be merged.
        """

    def host_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) when the range is stored as-is, contiguously, in one
        file (the server may then sendfile it); None otherwise.  Reads made that
        way bypass `faults`: the server does not ask while faults are injected."""
        return None

    def cache(self, offset: int, length: int) -> None:
        """Hint that the range will be read soon (NBD_CMD_CACHE)."""

    @property
    def has_pending_metadata(self) -> bool:
        """True when a `flush` would commit metadata; the server flushes then on a timer."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Commit what is pending and release the image (idempotent)."""
