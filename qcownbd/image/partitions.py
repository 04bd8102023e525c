"""Where a partition lies on a disk: its MBR's primary partitions, or its GPT's.

The tables are guest-written bytes, so they are checked before use: the MBR
boot signature, the GPT header's and entry array's CRC32s, entry sizes and
counts within bounds, every read inside the disk.  Sectors are 512 bytes.
"""

import struct
import zlib

from qcownbd.errors import ImageFormatError
from qcownbd.image.backend import Backend

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES_AT = 446
#: an MBR entry: status, CHS start, type, CHS end, first LBA, sectors
MBR_ENTRY = struct.Struct("<B3sB3sII")
#: the MBR partition type that says "the real table is a GPT"
GPT_PROTECTIVE = 0xEE
#: the GPT header up to the entry array's CRC (UEFI 2.10 §5.3.2)
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_SIGNATURE = b"EFI PART"
#: an entry: type GUID, partition GUID, first LBA, last LBA (inclusive)
GPT_ENTRY = struct.Struct("<16s16sQQ")
#: bounds on a hostile header: entries are 128 * 2**n bytes; the array is read whole
MAX_GPT_ENTRY_SIZE = 4096
MAX_GPT_ARRAY = 1 << 20


def find_partition(disk: Backend, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition ``number`` (1, 2, ...) of ``disk``: a
    primary partition of its MBR, or an entry of its GPT (behind a protective MBR).
    ImageFormatError (one line) when there is no such partition."""
    mbr = _read(disk, 0, SECTOR)
    if mbr[510:512] != MBR_SIGNATURE:
        raise ImageFormatError("no partition table (no MBR boot signature)")
    entries = [MBR_ENTRY.unpack_from(mbr, MBR_ENTRIES_AT + 16 * index) for index in range(4)]
    if any(entry[2] == GPT_PROTECTIVE for entry in entries):
        return _gpt_partition(disk, number)
    if not 1 <= number <= 4:
        raise ImageFormatError(f"partition {number}: an MBR has primary partitions 1 to 4 "
                               "(logical partitions are not supported)")
    _status, _chs, kind, _chs_end, first, sectors = entries[number - 1]
    if kind == 0 or sectors == 0:
        raise ImageFormatError(f"partition {number}: unused in the MBR")
    return first * SECTOR, sectors * SECTOR


def _gpt_partition(disk: Backend, number: int) -> tuple[int, int]:
    header = _read(disk, SECTOR, SECTOR)
    (signature, _revision, header_size, header_crc, _reserved, _mine, _alternate, _first_usable,
     _last_usable, _guid, array_lba, count, entry_size, array_crc) = GPT_HEADER.unpack_from(header)
    if signature != GPT_SIGNATURE:
        raise ImageFormatError("a protective MBR but no GPT header at sector 1")
    if not GPT_HEADER.size <= header_size <= SECTOR:
        raise ImageFormatError(f"GPT header size {header_size} is out of bounds")
    zeroed = header[:16] + bytes(4) + header[20:header_size]
    if zlib.crc32(zeroed) != header_crc:
        raise ImageFormatError("GPT header checksum mismatch (a corrupt table)")
    if entry_size < GPT_ENTRY.size or entry_size > MAX_GPT_ENTRY_SIZE or entry_size % 8 \
            or count * entry_size > MAX_GPT_ARRAY:
        raise ImageFormatError(f"GPT entries of {entry_size} bytes x {count} are out of bounds")
    if not 1 <= number <= count:
        raise ImageFormatError(f"partition {number}: the GPT has entries 1 to {count}")
    array = _read(disk, array_lba * SECTOR, count * entry_size)
    if zlib.crc32(array) != array_crc:
        raise ImageFormatError("GPT entry array checksum mismatch (a corrupt table)")
    kind, _guid, first, last = GPT_ENTRY.unpack_from(array, (number - 1) * entry_size)
    if kind == bytes(16):
        raise ImageFormatError(f"partition {number}: unused in the GPT")
    if last < first:
        raise ImageFormatError(f"partition {number}: ends (LBA {last}) before it starts "
                               f"(LBA {first})")
    return first * SECTOR, (last - first + 1) * SECTOR


def _read(disk: Backend, offset: int, length: int) -> bytes:
    """``length`` bytes of ``disk`` at ``offset``, which must lie inside it."""
    if offset + length > disk.size:
        raise ImageFormatError(f"the partition table reaches past the end of the disk "
                               f"({offset + length} > {disk.size} bytes)")
    buf = bytearray(length)
    disk.read_into(offset, memoryview(buf))
    return bytes(buf)
