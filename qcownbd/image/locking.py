"""Image locks QEMU understands, so QEMU tools and qcownbd keep off a live image.

QEMU's file driver (block/file-posix.c, "raw_apply_lock_bytes") expresses
its block-layer permissions as one-byte shared OFD locks: byte 100+bit for
each permission it holds and byte 200+bit for each permission it refuses to
share.  Before using a file it tests (F_OFD_GETLK) that nobody else holds
200+bit for a permission it wants, nor 100+bit for one it will not share.

Observed with `strace -e trace=fcntl` on QEMU 7.2:
  qemu-io -f qcow (read-write): holds 100,101,103   unshares 201,203
  qemu-io -r -f qcow:           holds 100           unshares 201,203
  qemu-img info -f qcow:        holds nothing       unshares 201,203
  qemu-io -f raw (read-write):  holds 100,101       unshares nothing
so a read-write qcownbd that holds write and refuses to share it (101 and
201) makes all of them fail with "Failed to get shared 'write' lock" /
"Failed to get 'write' lock", while `-U` (force share) still works.
"""

import errno
import fcntl
import struct

from qcownbd.errors import ImageFormatError

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

#: struct flock on Linux x86_64: short type, short whence, off_t start,
#: off_t len, pid_t pid, padded to 32 bytes
FLOCK = struct.Struct("@hhqqi4x")

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_RESIZE = 3
HELD_BASE = 100
UNSHARED_BASE = 200
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_RESIZE: "resize"}

#: a filesystem without OFD locks: QEMU's locking=auto quietly does without
NO_LOCK_SUPPORT = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})


class ImageInUse(ImageFormatError):
    """Another process's locks exclude us from the image (a command that can read
    it anyway, `info -U`, says so)."""


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on a one-byte range; returns the l_type the kernel hands back."""
    request = FLOCK.pack(kind, 0, byte, 1, 0)
    return FLOCK.unpack(fcntl.fcntl(fd, cmd, request))[0]


def _held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    return _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_permissions(writable: bool) -> tuple[list[int], list[int]]:
    """(permissions held, permissions not shared), as QEMU's bit numbers."""
    held = [PERM_CONSISTENT_READ] + ([PERM_WRITE, PERM_RESIZE] if writable else [])
    return held, [PERM_WRITE, PERM_RESIZE]


def lock_image(fd: int, writable: bool) -> bool:
    """Take QEMU's locks for a reader (or a writer) that lets nobody else write.

    Returns False when the filesystem has no OFD locks (nothing is locked
    then); raises ImageFormatError when another process conflicts.
    """
    held, unshared = lock_permissions(writable)
    our_bytes = [HELD_BASE + p for p in held] + [UNSHARED_BASE + p for p in unshared]
    try:
        for byte in our_bytes:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
        conflict = _find_conflict(fd, held, unshared)
    except OSError as exc:
        if exc.errno in NO_LOCK_SUPPORT:
            return False
        raise ImageFormatError(f"cannot lock image: {exc.strerror}") from None
    if conflict:
        unlock_image(fd)
        raise ImageInUse(f"image is in use by another process ({conflict})")
    return True


def _find_conflict(fd: int, held: list[int], unshared: list[int]) -> str:
    """Describe the first permission another process denies us, or ''."""
    for perm in held:
        if _held_by_other(fd, UNSHARED_BASE + perm):
            return f"it does not share '{PERM_NAMES[perm]}'"
    for perm in unshared:
        if _held_by_other(fd, HELD_BASE + perm):
            return f"it holds '{PERM_NAMES[perm]}'"
    return ""


def unlock_image(fd: int) -> None:
    """Drop every lock this open file description holds (closing the fd does too)."""
    for base in (HELD_BASE, UNSHARED_BASE):
        for perm in PERM_NAMES:
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, base + perm)
