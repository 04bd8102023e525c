"""QCOW1 header: parsing, the open-time validation of qcow1.md §3.2, creation.

Every rejection is an `ImageFormatError` whose one-line message names the
file.  Nothing here allocates memory in proportion to what a header claims:
the L1 table must lie inside the file before anyone reads it.
"""

import logging
import os
import struct
from dataclasses import dataclass

from ..console import human_size
from ..errors import ImageFormatError

log = logging.getLogger(__name__)

MAGIC = 0x514649FB
HEADER_FORMAT = ">IIQIIQBBHIQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 48
MAX_BACKING_NAME = 1023
#: flag bit of a compressed L2 entry
COMPRESSED = 1 << 63
#: QEMU's effective L1 limit: one read of the table is capped at 2 GiB - 512 (qcow1.md §3.1 #9)
QEMU_MAX_L1_ENTRIES = 268_435_392
#: default memory cap for the L1 table: 256 MiB = 64 TiB of disk at 2 MiB per entry
DEFAULT_MAX_L1_ENTRIES = 32 * 1024 * 1024


def qcow_version(first_bytes: bytes) -> int | None:
    """The version field of a file that starts with the QCOW magic; None for any other file."""
    if len(first_bytes) < 8:
        return None
    magic, version = struct.unpack_from(">II", first_bytes)
    return version if magic == MAGIC else None


def is_qcow1(first_bytes: bytes) -> bool:
    """True when the bytes start with a QCOW version 1 header."""
    return qcow_version(first_bytes) == 1


@dataclass(frozen=True)
class Qcow1Header:
    """The 48-byte header plus the geometry derived from it (qcow1.md §2)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    padding: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> "Qcow1Header":
        """Decode the fields of a 48-byte header (no validation)."""
        fields = struct.unpack(HEADER_FORMAT, data[:HEADER_SIZE])
        return cls(*fields[1:])

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l2_table_bytes(self) -> int:
        return 8 << self.l2_bits

    @property
    def l1_shift(self) -> int:
        return self.cluster_bits + self.l2_bits

    @property
    def l1_size(self) -> int:
        return -(-self.size // (1 << self.l1_shift))

    @property
    def l1_bytes(self) -> int:
        return 8 * self.l1_size

    @property
    def export_size(self) -> int:
        """The disk size QEMU exposes: the header size floored to 512."""
        return self.size & ~511


def _fail(path, message: str):
    raise ImageFormatError(f"{path}: {message}")


def _check_identity(path, data: bytes, file_size: int) -> None:
    if file_size < HEADER_SIZE:
        _fail(path, f"file too short for a QCOW header ({file_size} bytes)")
    version = qcow_version(data)
    if version is None:
        _fail(path, "not a QCOW image (bad magic)")
    if version in (2, 3):
        _fail(path, f"qcow{version} image: qcow2/qcow3 not supported, only QCOW version 1")
    if version != 1:
        _fail(path, f"unsupported qcow version {version}")


def _check_geometry(path, hdr: Qcow1Header, max_l1_entries: int) -> None:
    if hdr.size < 512:
        _fail(path, f"image size {hdr.size} is too small (must be at least 512 bytes)")
    if not 9 <= hdr.cluster_bits <= 16:
        _fail(path, f"cluster_bits {hdr.cluster_bits} invalid (cluster size must be 512..64k)")
    if not 6 <= hdr.l2_bits <= 13:
        _fail(path, f"l2_bits {hdr.l2_bits} invalid (L2 table size must be 512..64k)")
    if hdr.crypt_method == 1:
        _fail(path, "AES-encrypted QCOW1 not supported; decrypt with qemu-img convert "
                    "--object secret,id=s,data=PASSWORD --image-opts "
                    "driver=qcow,file.filename=IN,encrypt.key-secret=s -O qcow OUT")
    if hdr.crypt_method != 0:
        _fail(path, f"invalid encryption method {hdr.crypt_method} in qcow header")
    if hdr.size > (1 << 64) - 1 - (1 << hdr.l1_shift):
        _fail(path, f"image too large (size {hdr.size})")
    check_l1_size(path, hdr.l1_size, hdr.cluster_bits, hdr.l2_bits, max_l1_entries)


def check_l1_size(path, l1_size: int, cluster_bits: int, l2_bits: int,
                  max_l1_entries: int = DEFAULT_MAX_L1_ENTRIES) -> None:
    """Refuse an L1 table longer than an open allows: the one limit of `create`
    and of every open, so that no image is made that could not be served."""
    limit = min(QEMU_MAX_L1_ENTRIES, max_l1_entries)
    if l1_size > limit:
        _fail(path, f"image too large: L1 table of {l1_size} entries exceeds {limit} "
                    f"(at most {human_size(limit << (cluster_bits + l2_bits))} with "
                    f"{1 << cluster_bits}-byte clusters)")


def _overlaps(a_start: int, a_len: int, b_start: int, b_len: int) -> bool:
    return a_start < b_start + b_len and b_start < a_start + a_len


def _check_l1_placement(path, hdr: Qcow1Header, file_size: int) -> None:
    l1o, l1b = hdr.l1_table_offset, hdr.l1_bytes
    if l1o < HEADER_SIZE:
        _fail(path, f"L1 table at {l1o} overlaps the header")
    if l1o + l1b > file_size:
        _fail(path, f"L1 table ({l1b} bytes at {l1o}) is not inside the file ({file_size} bytes)")


def _check_backing_name(path, hdr: Qcow1Header, file_size: int) -> bool:
    """Validate the backing-name field; return whether the image has a backing file."""
    bfo, bfs = hdr.backing_file_offset, hdr.backing_file_size
    if bfo == 0:
        return False
    if bfs == 0:
        log.warning("%s: backing file offset set but name length 0: no backing file", path)
        return False
    if bfs > MAX_BACKING_NAME:
        _fail(path, f"backing file name too long ({bfs} bytes, max {MAX_BACKING_NAME})")
    if bfo + bfs > file_size:
        _fail(path, f"backing file name ({bfs} bytes at {bfo}) is not inside the file")
    if bfo < HEADER_SIZE:
        _fail(path, f"backing file name at {bfo} overlaps the header")
    if _overlaps(bfo, bfs, hdr.l1_table_offset, hdr.l1_bytes):
        _fail(path, "backing file name overlaps the L1 table")
    return True


def read_exact_at(fd: int, length: int, offset: int) -> bytes:
    """pread that loops over short reads; stops early only at EOF."""
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header(fd: int, path, file_size: int,
                max_l1_entries: int = DEFAULT_MAX_L1_ENTRIES) -> tuple[Qcow1Header, bytes | None]:
    """Read, validate (qcow1.md §3.2 rules 1-8) and return (header, backing name or None)."""
    try:
        data = read_exact_at(fd, HEADER_SIZE, 0)
    except OSError as exc:
        _fail(path, f"cannot read header: {exc.strerror}")
    _check_identity(path, data, file_size)
    hdr = Qcow1Header.unpack(data)
    _check_geometry(path, hdr, max_l1_entries)
    _check_l1_placement(path, hdr, file_size)
    if hdr.size % 512:
        log.warning("%s: size %d is not a multiple of 512; exporting %d bytes",
                    path, hdr.size, hdr.export_size)
    if not _check_backing_name(path, hdr, file_size):
        return hdr, None
    name = read_exact_at(fd, hdr.backing_file_size, hdr.backing_file_offset)
    if b"\0" in name:
        _fail(path, "backing file name contains a NUL byte")
    return hdr, name


def create_qcow1(path, size: int, backing_name=None, *, overwrite: bool = False) -> None:
    """Create an empty QCOW1 image byte-identical to `qemu-img create -f qcow`.

    ``backing_name`` (str or bytes) is stored exactly as given, like ``-b``.
    Refuses an existing file unless ``overwrite``.
    """
    if isinstance(backing_name, str):
        backing_name = os.fsencode(backing_name)
    name = backing_name or b""
    if len(name) > MAX_BACKING_NAME:
        raise ImageFormatError(f"{path}: backing file name too long ({len(name)} bytes, "
                               f"max {MAX_BACKING_NAME})")
    size = -(-size // 512) * 512
    if size <= 0:
        raise ImageFormatError(f"{path}: image size must be positive (cannot be zero length)")
    # qemu-img's geometry: 512-byte clusters when a backing file exists so that
    # every QEMU request covers whole clusters (QEMU does no copy-on-write).
    cluster_bits, l2_bits = (9, 12) if backing_name else (12, 9)
    if name == b"fat:":  # QEMU's vvfat quirk: geometry kept, name not stored
        name = b""
    l1_offset = (HEADER_SIZE + len(name) + 7) & ~7
    l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    check_l1_size(path, l1_size, cluster_bits, l2_bits)
    header = struct.pack(HEADER_FORMAT, MAGIC, 1, HEADER_SIZE if name else 0, len(name), 0,
                         size, cluster_bits, l2_bits, 0, 0, l1_offset)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.write(fd, header + name)
        # The L1 table is zeros up to a multiple of 512: leave them sparse.
        os.ftruncate(fd, l1_offset + 512 * -(-8 * l1_size // 512))
        os.fsync(fd)
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        os.close(fd)
