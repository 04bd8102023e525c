"""Where the guest clusters of a QCOW1 image lie: its L1 and L2 tables read as runs.

`ClusterMap` knows the tables' layout and nothing of backing files or
file I/O: `Qcow1Image` asks it which ranges are data (and where in the
file), compressed, unallocated or invalid, and fills the unallocated ones
from its backing file.
"""

from array import array

from .qcow1_header import COMPRESSED, Qcow1Header
from .qcow1_tables import BAD, Qcow1Tables

UNALLOCATED, DATA, PACKED, INVALID = "unallocated", "data", "compressed", "invalid"
#: `ClusterMap.allocation` stops after this many L2 entries looked at, or this many
#: L2 tables read from the file: a bound on the work of one block status call,
#: whatever the image's geometry (the client asks again for the rest)
MAX_STATUS_ENTRIES = 16384
MAX_STATUS_LOADS = 1


def _zero_entries(table, start: int, stop: int) -> int:
    """How many of the entries ``table[start:stop]`` in a row from ``start`` are 0."""
    raw = memoryview(table)[start:stop].tobytes()
    return (len(raw) - len(raw.lstrip(b"\0"))) // 8


class ClusterMap:
    """The guest-to-file mapping of one image, from its `Qcow1Tables`."""

    def __init__(self, header: Qcow1Header, tables: Qcow1Tables):
        self.header = header
        self.tables = tables
        self.cluster_mask = header.cluster_size - 1

    def pieces(self, offset: int, end: int):
        """Yield (kind, start, stop, host) per cluster; unallocated clusters in a row, and an
        empty L1 range, are one piece."""
        hdr, tables = self.header, self.tables
        cb, shift, mask = hdr.cluster_bits, hdr.l1_shift, self.cluster_mask
        l2_mask = hdr.l2_entries - 1
        pos = offset
        while pos < end:
            index = pos >> shift
            table_end = min(end, (index + 1) << shift)
            l2_offset = tables.l1[index]
            if l2_offset == 0:
                stop = min(end, tables.next_used(index) << shift)
                yield UNALLOCATED, pos, stop, 0
                pos = stop
                continue
            if l2_offset == BAD:
                yield INVALID, pos, table_end, 0
                pos = table_end
                continue
            table = tables.table(index)
            last = ((table_end - 1) >> cb) & l2_mask
            while pos < table_end:
                slot = (pos >> cb) & l2_mask
                entry = table[slot]
                if entry == 0:
                    # a run of unallocated clusters is one piece, found at C speed (an
                    # overlay's 512-byte clusters make a 1 MiB read 2048 of them)
                    zeros = _zero_entries(table, slot, last + 1)
                    stop = min(table_end, ((pos >> cb) + zeros) << cb)
                    yield UNALLOCATED, pos, stop, 0
                    pos = stop
                    continue
                stop = min(table_end, (pos | mask) + 1)
                if entry & COMPRESSED:
                    yield PACKED, pos, stop, entry
                elif entry == BAD:
                    yield INVALID, pos, stop, 0
                else:
                    yield DATA, pos, stop, entry + (pos & mask)
                pos = stop

    def runs(self, offset: int, length: int):
        """Yield (kind, start, length, host): data runs host-contiguous, compressed per cluster."""
        run = None
        for kind, start, stop, host in self.pieces(offset, offset + length):
            if run is not None and run[0] == kind != PACKED and (
                    kind != DATA or run[3] + (start - run[1]) == host):
                run[2] = stop
                continue
            if run is not None:
                yield run[0], run[1], run[2] - run[1], run[3]
            run = [kind, start, stop, host]
        if run is not None:
            yield run[0], run[1], run[2] - run[1], run[3]

    def data_run(self, offset: int, length: int) -> int | None:
        """The host offset of the range when it is one host-contiguous run of data clusters
        inside one L2 table: the common case, served without walking cluster by cluster."""
        hdr, tables = self.header, self.tables
        index = offset >> hdr.l1_shift
        if index != (offset + length - 1) >> hdr.l1_shift or tables.l1[index] in (0, BAD):
            return None
        table, cb, l2_mask = tables.table(index), hdr.cluster_bits, hdr.l2_entries - 1
        first, last = (offset >> cb) & l2_mask, ((offset + length - 1) >> cb) & l2_mask
        entry = table[first]
        if entry in (0, BAD) or entry & COMPRESSED:
            return None
        # one C-speed comparison instead of a Python step per cluster
        size = hdr.cluster_size
        if last > first and table[first:last + 1] != array(
                "Q", range(entry, entry + (last - first + 1) * size, size)):
            return None
        return entry + (offset & self.cluster_mask)

    def unallocated(self, offset: int, length: int) -> bool:
        """True when no cluster of the range is mapped (found with bounded work;
        False when that was not enough to tell)."""
        end = offset + length
        for allocated, _start, stop in self.allocation(offset, length):
            if allocated:
                return False
            if stop >= end:
                return True
        return False

    def allocation(self, offset: int, length: int):
        """Yield (allocated, start, stop) runs from ``offset``, covering at most
        ``length`` and at least one run, with bounded work: a table range whose
        entries are all set (or all unset) is one run, found at C speed."""
        hdr, tables = self.header, self.tables
        shift, cb, l2_mask = hdr.l1_shift, hdr.cluster_bits, hdr.l2_entries - 1
        pos, end, budget = offset, offset + length, MAX_STATUS_ENTRIES
        loads_allowed = tables.loads + MAX_STATUS_LOADS
        while pos < end and budget > 0 and tables.loads < loads_allowed:
            index = pos >> shift
            l2_offset = tables.l1[index]
            if l2_offset == 0:
                stop = min(end, tables.next_used(index) << shift)
                yield False, pos, stop
                pos = stop
                continue
            stop = min(end, (index + 1) << shift)
            if l2_offset == BAD:
                yield True, pos, stop
                pos = stop
                continue
            first, last = (pos >> cb) & l2_mask, ((stop - 1) >> cb) & l2_mask
            last = min(last, first + budget - 1)
            stop = min(stop, ((pos >> cb) + last - first + 1) << cb)
            budget -= last - first + 1
            entries = tables.table(index)[first:last + 1]
            unset = entries.count(0)
            if unset in (0, len(entries)):
                yield not unset, pos, stop
            else:
                yield from self._mixed(pos, stop, entries)
            pos = stop

    def _mixed(self, pos: int, stop: int, entries):
        """The runs of one table's range whose clusters are partly allocated."""
        base, size = pos & ~self.cluster_mask, self.header.cluster_size
        count, index = len(entries), 0
        while index < count:
            allocated = entries[index] != 0
            if allocated:
                after = index + 1
                while after < count and entries[after] != 0:
                    after += 1
            else:
                after = index + _zero_entries(entries, index, count)
            run_end = min(stop, base + after * size)
            yield allocated, pos, run_end
            pos, index = run_end, after

    def allocated_clusters(self) -> int:
        """Clusters this image maps (entries set), its backing files not counted."""
        tables, count = self.tables, 0
        for index in list(tables.l1_used):
            if tables.l1[index] != BAD:
                table = tables.table(index)
                count += len(table) - table.count(0)
        return count
