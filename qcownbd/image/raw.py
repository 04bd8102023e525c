"""Raw images: regular files and block devices exported byte for byte.

Reads and writes go straight to the fd (os.preadv into the caller's buffer,
os.pwrite), flush is fdatasync, and the file's own sparseness is the
allocation map (SEEK_DATA/SEEK_HOLE).  Trim and zero writes use fallocate
(through ctypes: the stdlib has no binding) where the filesystem or device
supports it, and fall back to writing zeros otherwise.
"""

import errno
import fcntl
import os
import stat
import struct

from qcownbd.errors import ImageFormatError, ImageIOError
from qcownbd.image.backend import (
    PUNCH_HOLE, UNSUPPORTED, ZERO_RANGE, Backend, Extent, fallocate, pread_filling,
)
from qcownbd.image.faults import syscalls

BLKSSZGET = 0x1268        # _IO(0x12, 104): logical sector size of a block device
BLKDISCARD = 0x1277       # _IO(0x12, 119): discard a byte range

#: bound on the buffer used when zeros must really be written
ZERO_CHUNK = 1 << 20
#: most extents one block_status call returns (the client asks again for more)
MAX_EXTENTS = 1024

def _io_error(exc: OSError, path: str, what: str) -> ImageIOError:
    """The ImageIOError a backend raises for a failed system call."""
    return ImageIOError(exc.errno or errno.EIO, f"{path}: {what}: {exc.strerror or exc}")


class RawImage(Backend):
    """A regular file or block device exported as a flat disk.

    Owns ``fd`` (closed by `close`).  The disk size is the file size at open.
    """

    format_name = "raw"

    def __init__(self, fd: int, path: str, *, read_only: bool):
        self.fd = fd
        self.path = str(path)
        self.read_only = read_only
        self._closed = False
        st = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            self.size = os.lseek(fd, 0, os.SEEK_END)
            # fallocate and discard on a device need sector-aligned ranges
            self._align = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            self.preferred_block_size = max(self._align, 4096)
        else:
            self.size = st.st_size
            self._align = 1
            self.preferred_block_size = st.st_blksize or 4096
        writable = not read_only
        self._can_punch = writable
        self._can_zero_range = writable
        self._can_seek_data = not self.is_block_device
        self.can_trim = writable
        self.can_fast_zero = writable

    # -- reads and writes -------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; bytes past the file's current end read as zeros."""
        try:
            pread_filling(self.fd, memoryview(buf).cast("B"), offset)
        except OSError as exc:
            raise _io_error(exc, self.path, "read") from None

    def host_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """The image's own bytes, where they are."""
        return self.fd, offset

    def write(self, offset: int, data) -> None:
        """Write all of ``data`` at ``offset``."""
        self._check_writable()
        view = memoryview(data).cast("B")
        try:
            self._pwrite_all(view, offset)
        except OSError as exc:
            raise _io_error(exc, self.path, "write") from None

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += syscalls.pwrite(self.fd, view[done:], offset + done)

    def flush(self) -> None:
        """fdatasync: a plain syscall on the fd, safe beside reads and writes."""
        if self.read_only or self._closed:
            return
        try:
            syscalls.fdatasync(self.fd)
        except OSError as exc:
            raise _io_error(exc, self.path, "flush") from None

    def cache(self, offset: int, length: int) -> None:
        """Ask the kernel to read the range ahead."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass    # only a hint; failing to give it changes nothing

    # -- trim and zeroes --------------------------------------------------

    def trim(self, offset: int, length: int) -> None:
        """Punch a hole (files) or discard (devices); a no-op where neither works."""
        self._check_writable()
        start, end = self._aligned_inside(offset, length)
        if start >= end or not self.can_trim:
            return
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", start, end - start))
            else:
                fallocate(self.fd, PUNCH_HOLE, start, end - start)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise _io_error(exc, self.path, "trim") from None
            self.can_trim = False

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Zero the range: punch, then ZERO_RANGE, then (unless ``fast``) real writes."""
        self._check_writable()
        start, end = self._aligned_inside(offset, length)
        if start < end and self._zero_cheaply(start, end - start, may_trim):
            self._write_zero_bytes(offset, start - offset)
            self._write_zero_bytes(end, offset + length - end)
            return
        if fast:
            raise ImageIOError(errno.ENOTSUP, f"{self.path}: no cheap way to write zeroes")
        self._write_zero_bytes(offset, length)

    def _zero_cheaply(self, offset: int, length: int, may_trim: bool) -> bool:
        """Try the fallocate modes that zero without writing data; True when one worked."""
        # on a block device PUNCH_HOLE means "zero out, unmapping if the device can,
        # never by writing" (BLKDEV_ZERO_NOFALLBACK), so it is the cheap path there too
        if may_trim and self._can_punch:
            if self._try_fallocate(PUNCH_HOLE, offset, length):
                return True
            self._can_punch = False
        if self._can_zero_range and not self.is_block_device:
            # a device's ZERO_RANGE may fall back to writing zeros: not "cheap"
            if self._try_fallocate(ZERO_RANGE, offset, length):
                return True
            self._can_zero_range = False
        self.can_fast_zero = self._can_punch or self._can_zero_range
        return False

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate; False when the mode is unsupported, ImageIOError on real failure."""
        try:
            fallocate(self.fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return False
            raise _io_error(exc, self.path, "write zeroes") from None

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        """Write real zeros, one bounded buffer at a time."""
        if length <= 0:
            return
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        try:
            while length > 0:
                step = min(length, len(zeros))
                self._pwrite_all(zeros[:step], offset)
                offset += step
                length -= step
        except OSError as exc:
            raise _io_error(exc, self.path, "write zeroes") from None

    def _aligned_inside(self, offset: int, length: int) -> tuple[int, int]:
        """The largest device-sector-aligned range inside [offset, offset+length)."""
        start = -(-offset // self._align) * self._align
        end = (offset + length) // self._align * self._align
        return start, max(start, end)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageIOError(errno.EROFS, f"{self.path}: image is read-only")

    # -- allocation map ---------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Data and hole (zero) runs from SEEK_DATA/SEEK_HOLE.

        Depth is 1 everywhere, holes included: QEMU counts every byte of a raw
        image as allocated in it (qemu-nbd -A says "local").
        """
        end = offset + length
        if not self._can_seek_data or self._without_holes():
            return [Extent(length, False, False, 1)]
        extents: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(extents) < MAX_EXTENTS:
                data_at = self._seek(pos, os.SEEK_DATA, end)
                if data_at > pos:
                    extents.append(Extent(data_at - pos, True, True, 1))
                    pos = data_at
                    continue
                hole_at = self._seek(pos, os.SEEK_HOLE, end)
                extents.append(Extent(hole_at - pos, False, False, 1))
                pos = hole_at
        except OSError as exc:
            if exc.errno not in UNSUPPORTED or extents:
                raise _io_error(exc, self.path, "block status") from None
            self._can_seek_data = False
            return [Extent(length, False, False, 1)]
        return extents

    def _without_holes(self) -> bool:
        """True when the file's blocks cover its size, so it has no hole to look for.

        One fstat instead of SEEK_DATA/SEEK_HOLE: on tmpfs each SEEK_HOLE walks
        the page cache up to the next hole (the end of a fully written file),
        about 1 ms per call for 256 MiB.  Blocks counted beyond the data (a
        filesystem's own metadata or preallocation) can only hide a hole, which
        then reads as data: never a wrong "zero".
        """
        st = os.fstat(self.fd)
        return st.st_blocks * 512 >= st.st_size

    def _seek(self, pos: int, whence: int, end: int) -> int:
        """lseek clamped to ``end``; ENXIO (nothing more of that kind) gives ``end``."""
        try:
            return min(os.lseek(self.fd, pos, whence), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return end
            raise

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Close the fd (which also drops its OFD locks); idempotent."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)


def create_raw(path: str, size: int) -> None:
    """Create an empty raw image: a sparse file of ``size`` bytes (refuses an existing file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
