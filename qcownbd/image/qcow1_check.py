"""QCOW1 metadata validation: L1 checks, the full scan (qcow1.md §5.4), repair.

The scan reads every L2 table once, builds the list of byte ranges the image
uses (header, backing name, L1, L2 tables, data clusters, compressed runs)
and finds malformed entries, dangling pointers (target at/after EOF) and any
two ranges that overlap (aliasing, metadata written through by the guest).
Its ``max_end`` starts the allocator past everything referenced.
"""

import errno
import heapq
import logging
import os
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from ..errors import ImageIOError
from .qcow1_header import COMPRESSED, HEADER_SIZE, Qcow1Header, read_exact_at
from .qcow1_tables import BAD, Qcow1Tables, nonzero_indices, to_host_order

log = logging.getLogger(__name__)

# Range owners, in the order in which an overlap decides who loses the pointer.
_META, _TABLE, _DATA, _COMPRESSED = range(4)


#: problems and repairs described one by one; past this many they are only counted
MAX_MESSAGES = 100


@dataclass
class CheckReport:
    """Result of `Qcow1Image.check`.

    A hostile image can hold a bad pointer in every 8 bytes, so the report
    keeps a bounded number of messages and the pointers packed in arrays:
    its memory stays a small multiple of the file size.
    """

    #: the first MAX_MESSAGES problems; ``corruption_count`` counts them all
    corruptions: list[str] = field(default_factory=list)
    corruption_count: int = 0
    leaked_bytes: int = 0
    #: the first MAX_MESSAGES repairs; ``repaired_count`` counts them all
    repaired: list[str] = field(default_factory=list)
    repaired_count: int = 0
    #: largest end of any referenced range (the allocator starts past it)
    max_end: int = 0
    #: pointers to drop: L1 indices, and L2 entries as ``l1_index << 32 | position``
    bad_l1: array = field(default_factory=lambda: array("Q"))
    bad_l2: array = field(default_factory=lambda: array("Q"))
    #: the on-disk L1 table the scan used
    l1: object = None
    #: runs of whole clusters nothing references (the leaks, as `free_runs` yields them)
    free_starts: array = field(default_factory=lambda: array("Q"))
    free_ends: array = field(default_factory=lambda: array("Q"))
    #: (start, end) of every compressed run, for the count of runs per cluster
    compressed: list = field(default_factory=list)

    def add_corruption(self, message: str, pointer) -> None:
        """Record one problem and the pointer, ("l1", i) or ("l2", i, pos), a repair drops."""
        self.corruption_count += 1
        if len(self.corruptions) < MAX_MESSAGES:
            self.corruptions.append(message)
        if pointer[0] == "l1":
            self.bad_l1.append(pointer[1])
        else:
            self.bad_l2.append(pointer[1] << 32 | pointer[2])

    def add_repair(self, message: str) -> None:
        """Record one dropped pointer."""
        self.repaired_count += 1
        if len(self.repaired) < MAX_MESSAGES:
            self.repaired.append(message)

    @property
    def has_bad_pointers(self) -> bool:
        """True when a repair would drop something."""
        return bool(self.bad_l1 or self.bad_l2)


@dataclass(frozen=True)
class L1Problem:
    """One bad L1 entry. ``kind``: "malformed", "dangling", "overlap" or "truncated"."""

    index: int
    kind: str
    message: str


def fixed_ranges(hdr: Qcow1Header) -> list[tuple[int, int, str]]:
    """(start, end, name) of the header, backing name and L1 table."""
    ranges = [(0, HEADER_SIZE, "header"),
              (hdr.l1_table_offset, hdr.l1_table_offset + hdr.l1_bytes, "L1 table")]
    if hdr.backing_file_offset and hdr.backing_file_size:
        start = hdr.backing_file_offset
        ranges.append((start, start + hdr.backing_file_size, "backing file name"))
    return ranges


def _overlapping(start: int, end: int, ranges) -> str | None:
    for other_start, other_end, name in ranges:
        if start < other_end and other_start < end:
            return name
    return None


def l1_problems(hdr: Qcow1Header, l1, used, file_size: int) -> list[L1Problem]:
    """Check every used L1 entry against the header geometry and each other."""
    problems, tables = [], []
    fixed = fixed_ranges(hdr)
    size = hdr.l2_table_bytes
    for index in used:
        offset = l1[index]
        where = f"L1[{index}] = {offset:#x}"
        if offset >> 63 or offset % hdr.cluster_size:
            problems.append(L1Problem(index, "malformed", f"{where}: not a cluster-aligned offset"))
        elif offset >= file_size:
            problems.append(L1Problem(index, "dangling", f"{where}: L2 table past end of file"))
        elif (name := _overlapping(offset, offset + size, fixed)) is not None:
            problems.append(L1Problem(index, "overlap", f"{where}: L2 table overlaps the {name}"))
        else:
            if offset + size > file_size:
                problems.append(L1Problem(index, "truncated",
                                          f"{where}: L2 table extends past end of file"))
            tables.append((offset, index))
    tables.sort()
    for (prev_offset, prev_index), (offset, index) in zip(tables, tables[1:]):
        if offset < prev_offset + size:
            problems.append(L1Problem(index, "overlap",
                                      f"L1[{index}] = {offset:#x}: L2 table overlaps the one of "
                                      f"L1[{prev_index}]"))
    return problems


def entry_range(hdr: Qcow1Header, entry: int, file_size: int, *, cluster_aligned=True):
    """(start, end, kind) of the bytes an L2 entry maps, or an error string.

    ``cluster_aligned``: refuse 512-aligned but not cluster-aligned data
    clusters (QEMU reads them but never makes one; read-write refuses them).
    """
    if entry & COMPRESSED:
        csize = (entry >> (63 - hdr.cluster_bits)) & (hdr.cluster_size - 1)
        coff = entry & ((1 << (63 - hdr.cluster_bits)) - 1)
        if csize == 0:
            return "compressed entry with size 0"
        if coff + csize > file_size:
            return f"compressed run {coff:#x}+{csize} past end of file"
        return coff, coff + csize, _COMPRESSED
    if entry % 512:
        return "not a multiple of 512"
    if entry >= file_size:
        return "data cluster past end of file"
    if cluster_aligned and entry % hdr.cluster_size:
        return "data cluster not cluster-aligned"
    return entry, entry + hdr.cluster_size, _DATA


def scan(fd: int, hdr: Qcow1Header, file_size: int, progress=None) -> CheckReport:
    """Full metadata scan of the image as it is on disk.

    ``progress(done, total)``, if given, is called after each L2 table.
    """
    try:
        raw = read_exact_at(fd, hdr.l1_bytes, hdr.l1_table_offset).ljust(hdr.l1_bytes, b"\0")
    except OSError as exc:
        raise ImageIOError(exc.errno, "cannot read L1 table") from None
    l1, used = to_host_order(raw), nonzero_indices(raw)
    report = CheckReport(l1=l1)
    ranges = _Ranges(hdr.cluster_size)
    for start, end, name in fixed_ranges(hdr):
        ranges.add(start, end, _META, name)
    skip = set()
    for problem in l1_problems(hdr, l1, used, file_size):
        report.add_corruption(problem.message, ("l1", problem.index))
        skip.add(problem.index)
    for done, index in enumerate(used, 1):
        if index in skip:
            continue
        offset = l1[index]
        ranges.add(offset, offset + hdr.l2_table_bytes, _TABLE, ("l1", index))
        _scan_table(fd, hdr, index, offset, file_size, report, ranges)
        if progress is not None:
            progress(done, len(used))
        if not done % _TABLES_PER_PAUSE and threading.current_thread() is not _MAIN_THREAD:
            time.sleep(_PAUSE)
    _find_overlaps(ranges.in_order(), report, hdr)
    report.max_end = ranges.max_end()
    for start, end in free_runs(hdr, ranges.in_order(), file_size):
        report.free_starts.append(start)
        report.free_ends.append(end)
        report.leaked_bytes += _stored_bytes(fd, start, min(end, file_size))
    for start, end, kind, _owner in ranges.others:
        if kind == _COMPRESSED:
            report.compressed.append((start, end))
    return report


def _start_and_kind(found) -> tuple[int, int]:
    return found[0], found[2]


class _Ranges:
    """The byte ranges an image uses, as (start, end, kind, owner).

    Data clusters, nearly all of them, are kept packed in arrays (16 bytes
    each instead of a few hundred as tuples): the scan of a large image must
    not need more memory than serving it does.
    """

    def __init__(self, cluster_size: int):
        self.cluster_size = cluster_size
        self.others: list[tuple] = []
        self.data_starts = array("Q")
        self.data_owners = array("Q")       # L1 index << 32 | L2 position
        self._order = None

    def add(self, start: int, end: int, kind: int, owner) -> None:
        """Record one range (data clusters are one cluster long, owned by an L2 entry)."""
        if kind == _DATA:
            self.data_starts.append(start)
            self.data_owners.append(owner[1] << 32 | owner[2])
        else:
            self.others.append((start, end, kind, owner))

    def in_order(self):
        """Every range, sorted by (start, kind); stable, as one sort of them all would be."""
        if self._order is None:
            self.others.sort(key=_start_and_kind)
            self._order = _order_of(self.data_starts)
        starts, owners, size = self.data_starts, self.data_owners, self.cluster_size
        data = ((starts[i], starts[i] + size, _DATA, ("l2", owners[i] >> 32, owners[i] & 0xFFFFFFFF))
                for i in self._order)
        return heapq.merge(self.others, data, key=_start_and_kind)

    def max_end(self) -> int:
        """The largest end of any range."""
        ends = [end for _start, end, _kind, _owner in self.others]
        if self.data_starts:
            ends.append(max(self.data_starts) + self.cluster_size)
        return max(ends)


#: a scan in a worker thread (a reload) pauses this long after this many tables: a
#: thread that releases the GIL only around short reads takes it straight back
#: each time, and the event loop's thread, waiting for it, would starve for seconds
_TABLES_PER_PAUSE = 32
_PAUSE = 0.0005
_MAIN_THREAD = threading.main_thread()
#: elements one C-level sort or comparison handles at a time (see `_order_of`)
_SORT_RUN = 1 << 16


def _order_of(keys: array):
    """Indices of ``keys`` in ascending key order, in steps of `_SORT_RUN` elements.

    A reload opens images in a worker thread, and one C-level sort of millions
    of clusters would hold the GIL (and stall every client) for seconds; in
    steps, the event loop's thread gets its turns.  Clusters allocated in
    order, the usual case, need no sorting at all.
    """
    steps = range(0, len(keys), _SORT_RUN)
    if all(keys[start:start + _SORT_RUN] == array("Q", sorted(keys[start:start + _SORT_RUN]))
           and (not start or keys[start - 1] <= keys[start]) for start in steps):
        return range(len(keys))
    runs = [sorted(range(start, min(start + _SORT_RUN, len(keys))), key=keys.__getitem__)
            for start in steps]
    return list(heapq.merge(*runs, key=keys.__getitem__))


def _scan_table(fd, hdr, index, offset, file_size, report, ranges) -> None:
    try:
        data = read_exact_at(fd, hdr.l2_table_bytes, offset)
    except OSError as exc:
        raise ImageIOError(exc.errno, f"cannot read L2 table at {offset:#x}") from None
    data = data.ljust(hdr.l2_table_bytes, b"\0")
    table = to_host_order(data)
    base = index << hdr.l1_shift
    for pos in nonzero_indices(data):
        entry = table[pos]
        found = entry_range(hdr, entry, file_size)
        if isinstance(found, str):
            guest = base + (pos << hdr.cluster_bits)
            report.add_corruption(f"guest {guest:#x}: L2 entry {entry:#x}: {found}",
                                  ("l2", index, pos))
        else:
            ranges.add(found[0], found[1], found[2], ("l2", index, pos))


def _describe(owner, hdr: Qcow1Header) -> str:
    if isinstance(owner, str):
        return f"the {owner}"
    if owner[0] == "l1":
        return f"the L2 table of L1[{owner[1]}]"
    guest = (owner[1] << hdr.l1_shift) + (owner[2] << hdr.cluster_bits)
    return f"the cluster of guest {guest:#x}"


def _find_overlaps(ranges, report: CheckReport, hdr: Qcow1Header) -> None:
    """Sweep the ranges (sorted by start); any starting before the furthest end so far overlaps."""
    widest = None
    for current in ranges:
        if widest is not None and current[0] < widest[1]:
            # shared compressed runs are never written in place; the header
            # checks already refused overlapping fixed ranges
            if current[2] != widest[2] or current[2] not in (_COMPRESSED, _META):
                loser = _loser(widest, current)
                report.add_corruption(
                    f"{_describe(current[3], hdr)} overlaps {_describe(widest[3], hdr)} "
                    f"at {current[0]:#x}", loser[3])
                if loser is widest:
                    widest = current
                continue
        if widest is None or current[1] > widest[1]:
            widest = current


def _loser(first, second):
    """Of two overlapping ranges, the one whose pointer a repair drops (never metadata)."""
    if first[2] != second[2]:
        return first if first[2] > second[2] else second
    if first[2] == _META:
        return second
    return second if second[3] > first[3] else first


def free_runs(hdr: Qcow1Header, ranges, file_size: int):
    """Yield the (start, end) runs of whole clusters below the file's (cluster-aligned)
    end that no range (sorted by start) touches; L1 padding is not free."""
    size = hdr.cluster_size
    # qemu-img writes the L1 table padded with zeros to a multiple of 512 bytes
    padded_l1 = (hdr.l1_table_offset, hdr.l1_table_offset + -(-hdr.l1_bytes // 512) * 512)
    spans = heapq.merge(((start, end) for start, end, _kind, _owner in ranges), [padded_l1])
    reach, file_end = 0, -(-file_size // size) * size
    for start, end in spans:
        first = start // size * size
        if first > reach and reach < file_end:
            yield reach, min(first, file_end)
        reach = max(reach, -(-end // size) * size)
    if reach < file_end:
        yield reach, file_end


def _stored_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of [start, end) the file really stores: a punched-out range wastes nothing."""
    stored, pos = 0, start
    try:
        while pos < end:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            stored += hole - data
            pos = hole
    except OSError as exc:
        if exc.errno == errno.ENXIO:       # no data after pos
            return stored
        return end - start                  # no SEEK_DATA here: count it all
    return stored


def drop_pointers(fd: int, hdr: Qcow1Header, report: CheckReport) -> None:
    """Zero the bad pointers on disk, durably, and say what was lost."""
    zero, l1 = bytes(8), report.l1
    dropped_l1 = set(report.bad_l1)
    for index in sorted(dropped_l1):
        os.pwrite(fd, zero, hdr.l1_table_offset + 8 * index)
        report.add_repair(f"dropped L1[{index}] (guest range from "
                          f"{index << hdr.l1_shift:#x} now unallocated)")
    previous = None
    for packed in sorted(report.bad_l2):
        index, pos = packed >> 32, packed & 0xFFFFFFFF
        if packed == previous or index in dropped_l1:
            continue        # a duplicate, or its whole L2 table is gone already
        previous = packed
        os.pwrite(fd, zero, l1[index] + 8 * pos)
        report.add_repair(f"dropped {_describe(('l2', index, pos), hdr)} (now unallocated)")
    os.fdatasync(fd)


#: bytes.translate table: 0 for even bytes, 1 for odd ones
_ODD = bytes(value & 1 for value in range(256))
#: where the two low bytes of a u64 lie in a host-order table's bytes
_LOW, _SECOND = (0, 1) if sys.byteorder == "little" else (7, 6)


def _plain_and_clear(table, cluster_size: int, file_size: int, starts, ends) -> bool:
    """True when every entry of ``table`` is provably valid, checked at C speed: no
    compressed entry, all multiples of 512 inside the file, none mapping metadata.

    False means "look at each entry" (the exact, slower check), not "invalid".
    """
    count = len(table)
    high = max(table)
    if high & COMPRESSED or high >= file_size:
        return False
    data = table.tobytes()
    # a multiple of 512: the low byte is 0 and the next one even
    if data[_LOW::8].count(0) != count or data[_SECOND::8].translate(_ODD).count(0) != count:
        return False
    entries = sorted(set(table))
    if entries[0] == 0:
        del entries[0]
    if not entries:
        return True
    # metadata ranges [start, end) that a cluster [e, e + cluster_size) could overlap
    first = bisect_right(ends, entries[0])
    last = bisect_left(starts, entries[-1] + cluster_size)
    for start, end in zip(starts[first:last], ends[first:last]):
        pos = bisect_right(entries, start - cluster_size)
        if pos < len(entries) and entries[pos] < end:
            return False
    return True


def validate_lazily(path, hdr: Qcow1Header, tables: Qcow1Tables, file_size: int) -> None:
    """Read-only images: fix bad L1 entries in memory now, check L2 tables as they load.

    A dangling L1 entry reads as unallocated (QEMU parity); any other bad
    pointer becomes BAD, so only reads through it fail (EIO).
    """
    for problem in l1_problems(hdr, tables.l1, tables.l1_used, file_size):
        if problem.kind == "dangling":
            log.warning("%s: %s; treating as unallocated", path, problem.message)
            tables.set_l1_in_memory(problem.index, 0)
        elif problem.kind != "truncated":  # a truncated table's tail reads as zeros
            log.warning("%s: %s; reads there fail", path, problem.message)
            tables.set_l1_in_memory(problem.index, BAD)
    meta = [(start, end) for start, end, _name in fixed_ranges(hdr)]
    meta += [(tables.l1[i], tables.l1[i] + hdr.l2_table_bytes)
             for i in tables.l1_used if tables.l1[i] != BAD]
    meta.sort()  # disjoint: overlapping tables were marked BAD above
    starts, ends = [start for start, _end in meta], [end for _start, end in meta]

    def entry_ok(entry: int) -> bool:
        found = entry_range(hdr, entry, file_size, cluster_aligned=False)
        if isinstance(found, str):
            return False
        j = bisect_left(starts, found[1]) - 1
        return j < 0 or ends[j] <= found[0]

    def sanitize(table, _index: int) -> None:
        if _plain_and_clear(table, hdr.cluster_size, file_size, starts, ends):
            return
        for pos in nonzero_indices(table.tobytes()):
            if not entry_ok(table[pos]):
                table[pos] = BAD

    tables.on_load = sanitize
