"""QCOW1 metadata validation: L1 checks, the full scan (qcow1.md §5.4), repair.

The scan reads every L2 table once, builds the list of byte ranges the image
uses (header, backing name, L1, L2 tables, data clusters, compressed runs)
and finds malformed entries, dangling pointers (target at/after EOF) and any
two ranges that overlap (aliasing, metadata written through by the guest).
Its ``max_end`` starts the allocator past everything referenced.
"""

import logging
import os
from bisect import bisect_left
from dataclasses import dataclass, field

from ..errors import ImageIOError
from .qcow1_header import HEADER_SIZE, Qcow1Header, read_exact_at
from .qcow1_tables import BAD, COMPRESSED, Qcow1Tables, nonzero_indices, to_host_order

log = logging.getLogger(__name__)

# Range owners, in the order in which an overlap decides who loses the pointer.
_META, _TABLE, _DATA, _COMPRESSED = range(4)


@dataclass
class CheckReport:
    """Result of `Qcow1Image.check`."""

    corruptions: list[str] = field(default_factory=list)
    leaked_bytes: int = 0
    repaired: list[str] = field(default_factory=list)
    #: largest end of any referenced range (the allocator starts past it)
    max_end: int = 0
    #: pointers to drop: ("l1", index) or ("l2", index, position)
    bad_pointers: list[tuple] = field(default_factory=list)
    #: the on-disk L1 table the scan used
    l1: object = None


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


def scan(fd: int, hdr: Qcow1Header, file_size: int) -> CheckReport:
    """Full metadata scan of the image as it is on disk."""
    try:
        raw = read_exact_at(fd, hdr.l1_bytes, hdr.l1_table_offset).ljust(hdr.l1_bytes, b"\0")
    except OSError as exc:
        raise ImageIOError(exc.errno, "cannot read L1 table") from None
    l1, used = to_host_order(raw), nonzero_indices(raw)
    report = CheckReport(l1=l1)
    ranges = [(start, end, _META, name) for start, end, name in fixed_ranges(hdr)]
    skip = set()
    for problem in l1_problems(hdr, l1, used, file_size):
        report.corruptions.append(problem.message)
        report.bad_pointers.append(("l1", problem.index))
        skip.add(problem.index)
    for index in used:
        if index in skip:
            continue
        offset = l1[index]
        ranges.append((offset, offset + hdr.l2_table_bytes, _TABLE, ("l1", index)))
        _scan_table(fd, hdr, index, offset, file_size, report, ranges)
    _find_overlaps(ranges, report, hdr)
    report.max_end = max(end for _start, end, _kind, _owner in ranges)
    report.leaked_bytes = _leaked(hdr, ranges, file_size)
    return report


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
            report.corruptions.append(f"guest {guest:#x}: L2 entry {entry:#x}: {found}")
            report.bad_pointers.append(("l2", index, pos))
        else:
            ranges.append((found[0], found[1], found[2], ("l2", index, pos)))


def _describe(owner, hdr: Qcow1Header) -> str:
    if isinstance(owner, str):
        return f"the {owner}"
    if owner[0] == "l1":
        return f"the L2 table of L1[{owner[1]}]"
    guest = (owner[1] << hdr.l1_shift) + (owner[2] << hdr.cluster_bits)
    return f"the cluster of guest {guest:#x}"


def _find_overlaps(ranges, report: CheckReport, hdr: Qcow1Header) -> None:
    """Sweep the ranges by start; any range starting before the furthest end so far overlaps."""
    ranges.sort(key=lambda r: (r[0], r[2]))
    widest = None
    for current in ranges:
        if widest is not None and current[0] < widest[1]:
            # shared compressed runs are never written in place; the header
            # checks already refused overlapping fixed ranges
            if current[2] != widest[2] or current[2] not in (_COMPRESSED, _META):
                loser = _loser(widest, current)
                report.corruptions.append(
                    f"{_describe(current[3], hdr)} overlaps {_describe(widest[3], hdr)} "
                    f"at {current[0]:#x}")
                report.bad_pointers.append(loser[3])
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


def _leaked(hdr: Qcow1Header, ranges, file_size: int) -> int:
    """File bytes in clusters that no range touches (alignment padding is not a leak)."""
    size = hdr.cluster_size
    # qemu-img writes the L1 table padded with zeros to a multiple of 512 bytes: not a leak
    padded_l1 = (hdr.l1_table_offset, hdr.l1_table_offset + -(-hdr.l1_bytes // 512) * 512)
    spans = [(start, end) for start, end, _kind, _owner in ranges] + [padded_l1]
    units = sorted((start // size, -(-end // size)) for start, end in spans)
    covered, reach = 0, 0
    for first, stop in units:
        first = max(first, reach)
        if stop > first:
            covered += min(stop * size, file_size) - min(first * size, file_size)
        reach = max(reach, stop)
    return max(0, file_size - covered)


def drop_pointers(fd: int, hdr: Qcow1Header, report: CheckReport) -> None:
    """Zero the bad pointers on disk, durably, and say what was lost."""
    zero, l1 = bytes(8), report.l1
    done = set()
    for pointer in report.bad_pointers:
        if pointer in done:
            continue
        done.add(pointer)
        if pointer[0] == "l1":
            os.pwrite(fd, zero, hdr.l1_table_offset + 8 * pointer[1])
            report.repaired.append(f"dropped L1[{pointer[1]}] (guest range from "
                                   f"{pointer[1] << hdr.l1_shift:#x} now unallocated)")
        else:
            _kind, index, pos = pointer
            os.pwrite(fd, zero, l1[index] + 8 * pos)
            report.repaired.append(f"dropped {_describe(pointer, hdr)} (now unallocated)")
    os.fdatasync(fd)


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
        for pos in nonzero_indices(table.tobytes()):
            if not entry_ok(table[pos]):
                table[pos] = BAD

    tables.on_load = sanitize
