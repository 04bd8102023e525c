"""A minimal writer for the "newc" cpio format the kernel unpacks as initramfs.

Written in Python so that building an initramfs needs no host cpio and no
root rights (device nodes are only header fields here).
"""

import stat

_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioArchive:
    """Collects entries in memory; parent directories are added automatically."""

    def __init__(self):
        self._parts: list[bytes] = []
        self._paths: set[str] = set()
        self._inode = 0

    def _entry(self, path: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        path = path.strip("/")
        if path in self._paths:
            raise ValueError(f"duplicate initramfs entry {path}")
        self._add_parents(path)
        self._paths.add(path)
        self._inode += 1
        name = path.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._parts += [header, name, _pad4(len(header) + len(name)), data, _pad4(len(data))]

    def _add_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self._paths:
                self.add_dir(parent)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """A directory."""
        self._entry(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with the given contents."""
        self._entry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        """A symbolic link."""
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node (e.g. /dev/console, needed before devtmpfs is mounted)."""
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._paths

    def getvalue(self) -> bytes:
        """The archive bytes, trailer included."""
        tail = CpioArchive()
        tail._entry(_TRAILER, 0)
        return b"".join(self._parts + tail._parts)
