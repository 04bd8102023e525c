"""A part of a disk served as a disk of its own: a byte range or a partition
(`serve --offset/--size`, `--partition`; qemu-nbd's -o and -P, nbdkit's offset
and partition filters).

Every offset shifts by the window's start, including the file ranges handed
out for sendfile; the server keeps requests inside the window's size, so
nothing outside it can be read or changed.
"""

from dataclasses import dataclass

from qcownbd.errors import ImageFormatError
from qcownbd.image.backend import Backend, Extent
from qcownbd.image.partitions import find_partition


@dataclass(frozen=True)
class WindowSpec:
    """Which part of a disk to serve: partition ``partition``, or ``size`` bytes (None:
    up to the end) from ``offset``."""

    offset: int = 0
    size: int | None = None
    partition: int | None = None

    def apply(self, disk: Backend) -> "Window":
        """``disk`` seen through this window; a window that does not fit closes
        ``disk`` and is an ImageFormatError (one line)."""
        try:
            if self.partition is not None:
                offset, size = find_partition(disk, self.partition)
                what = f"partition {self.partition}"
            else:
                offset = self.offset
                size = disk.size - offset if self.size is None else self.size
                what = "the window"
            if offset >= disk.size:
                raise ImageFormatError(f"{what} starts at byte {offset}, past the end of "
                                       f"the {disk.size}-byte disk")
            if size <= 0 or offset + size > disk.size:
                raise ImageFormatError(f"{what} (bytes {offset} to {offset + size}) does not "
                                       f"fit in the {disk.size}-byte disk")
        except BaseException:
            disk.close()
            raise
        return Window(disk, offset, size)

    def describe(self) -> str:
        """How the window was asked for, for the log."""
        if self.partition is not None:
            return f"partition {self.partition}"
        return f"offset {self.offset}" + ("" if self.size is None else f", size {self.size}")


class Window(Backend):
    """The bytes [offset, offset + size) of the open backend ``inner``, which it owns."""

    def __init__(self, inner: Backend, offset: int, size: int):
        self.inner, self.offset, self.size = inner, offset, size
        #: for log lines, like the formats' own backends
        self.path = getattr(inner, "path", "")
        self.present_as(inner)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Read from the disk at the window's start + ``offset``."""
        self.inner.read_into(self.offset + offset, buf)

    def write(self, offset: int, data) -> None:
        """Write at the window's start + ``offset``."""
        self.inner.write(self.offset + offset, data)

    def flush(self) -> None:
        """Flush the whole disk."""
        self.inner.flush()

    def trim(self, offset: int, length: int) -> None:
        """Trim the shifted range."""
        self.inner.trim(self.offset + offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Zero the shifted range."""
        self.inner.write_zeroes(self.offset + offset, length, may_trim, fast)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """The shifted range's extents (lengths need no shifting)."""
        return self.inner.block_status(self.offset + offset, length)

    def host_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """The file range of the shifted range, if it is stored as-is."""
        return self.inner.host_range(self.offset + offset, length)

    def cache(self, offset: int, length: int) -> None:
        """Pass the hint on, shifted."""
        self.inner.cache(self.offset + offset, length)

    @property
    def has_pending_metadata(self) -> bool:
        """The disk's."""
        return self.inner.has_pending_metadata

    def close(self) -> None:
        """Close the disk."""
        self.inner.close()
