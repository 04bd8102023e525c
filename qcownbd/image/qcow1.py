"""QCOW1 backend: reads, copy-on-write allocation, crash-safe pointer commits.

Section numbers (§) refer to qcow1.md, the team's format reference verified
against QEMU 7.2.  Header parsing lives in `qcow1_header`; the tables,
allocator and commit order in `qcow1_tables`; the metadata scan in `qcow1_check`.
"""

import errno
import os
import zlib
from array import array
from collections import OrderedDict

from ..errors import ImageFormatError, ImageIOError
from .backend import Backend, Extent, pread_filling
from .faults import syscalls
from .qcow1_check import CheckReport, drop_pointers, scan, validate_lazily
from .qcow1_header import (DEFAULT_MAX_L1_ENTRIES, Qcow1Header, create_qcow1, is_qcow1,
                           read_exact_at, read_header)
from .qcow1_tables import BAD, COMPRESSED, Qcow1Tables, pwrite_all, to_big_endian

__all__ = ["Qcow1Image", "Qcow1Header", "CheckReport", "create_qcow1", "is_qcow1"]

UNALLOCATED, DATA, PACKED, INVALID = "unallocated", "data", "compressed", "invalid"
_ZEROS = memoryview(bytes(1 << 20))
INFLATED_CACHE_CLUSTERS = 16
#: block_status stops after this many extents, L2 entries looked at or L2 tables
#: read from the file (the client asks again for the rest): a bound on the work
#: of one call, whatever the image's geometry
MAX_STATUS_EXTENTS = 4096
MAX_STATUS_ENTRIES = 16384
MAX_STATUS_LOADS = 1


def zero_fill(view: memoryview) -> None:
    """Overwrite a writable byte view with zeros without allocating."""
    for pos in range(0, len(view), len(_ZEROS)):
        chunk = view[pos:pos + len(_ZEROS)]
        chunk[:] = _ZEROS[:len(chunk)]


def _byte_view(data) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Qcow1Image(Backend):
    """An open QCOW1 image (see `Backend`).

    ``fd`` belongs to the image once the constructor returns (closed by
    `close`); on a constructor error the caller still owns it.
    ``backing_opener(name: bytes) -> Backend`` opens the backing file under
    the caller's policy.  ``allow_corrupt`` opens a read-write image whose
    scan failed, for `check(repair=True)` only: writes fail until repaired.
    """

    format_name = "qcow1"

    def __init__(self, fd: int, path, *, read_only: bool, backing_opener=None,
                 l2_cache_tables: int | None = None,
                 max_l1_entries: int = DEFAULT_MAX_L1_ENTRIES, allow_corrupt: bool = False):
        self.fd, self.path, self.read_only = fd, path, read_only
        self._closed = False
        file_size = os.fstat(fd).st_size
        self.header, name = read_header(fd, path, file_size, max_l1_entries)
        hdr = self.header
        if not read_only and hdr.l1_table_offset % 8:
            raise ImageFormatError(f"{path}: L1 table offset {hdr.l1_table_offset} not 8-aligned; "
                                   "refusing read-write (pointer writes could tear)")
        self.size = hdr.export_size
        self.cluster_size = self.preferred_block_size = hdr.cluster_size
        self._cluster_mask = hdr.cluster_size - 1
        self._tables = Qcow1Tables(fd, path, hdr, cache_tables=l2_cache_tables)
        self._inflated: OrderedDict[int, bytes] = OrderedDict()
        self._corrupt = False
        if read_only:
            validate_lazily(self.path, hdr, self._tables, file_size)
        else:
            self._scan_for_writing(file_size, allow_corrupt)
        self.backing_name = os.fsdecode(name) if name else None
        self.backing = None
        if name:
            if backing_opener is None:
                raise ImageFormatError(f"{path}: has a backing file but no backing opener was given")
            self.backing = backing_opener(name)
        self.can_trim = not read_only and self.backing is None
        self.can_fast_zero = self.can_trim

    # -- open-time validation -------------------------------------------

    def _scan_for_writing(self, file_size: int, allow_corrupt: bool) -> None:
        report = scan(self.fd, self.header, file_size)
        if report.corruptions and not allow_corrupt:
            raise ImageFormatError(
                f"{self.path}: corrupt metadata, refusing read-write: {report.corruptions[0]} "
                f"({report.corruption_count} problem(s); 'qcownbd check --repair' drops bad pointers)")
        self._corrupt = bool(report.corruption_count)
        mask = self._cluster_mask
        self._tables.next_free = (max(file_size, report.max_end) + mask) & ~mask

    # -- mapping --------------------------------------------------------

    def _pieces(self, offset: int, end: int):
        """Yield (kind, start, stop, host) per cluster; an empty L1 range is one piece."""
        hdr, tables = self.header, self._tables
        cb, shift, l2_mask, mask = hdr.cluster_bits, hdr.l1_shift, hdr.l2_entries - 1, self._cluster_mask
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
            while pos < table_end:
                entry = table[(pos >> cb) & l2_mask]
                stop = min(table_end, (pos | mask) + 1)
                if entry == 0:
                    yield UNALLOCATED, pos, stop, 0
                elif entry & COMPRESSED:
                    yield PACKED, pos, stop, entry
                elif entry == BAD:
                    yield INVALID, pos, stop, 0
                else:
                    yield DATA, pos, stop, entry + (pos & mask)
                pos = stop

    def _runs(self, offset: int, length: int):
        """Yield (kind, start, length, host): data runs host-contiguous, compressed per cluster."""
        run = None
        for kind, start, stop, host in self._pieces(offset, offset + length):
            if run is not None and run[0] == kind != PACKED and (
                    kind != DATA or run[3] + (start - run[1]) == host):
                run[2] = stop
                continue
            if run is not None:
                yield run[0], run[1], run[2] - run[1], run[3]
            run = [kind, start, stop, host]
        if run is not None:
            yield run[0], run[1], run[2] - run[1], run[3]

    # -- reading --------------------------------------------------------

    def read_into(self, offset: int, buf) -> None:
        """Fill ``buf`` with the disk bytes at ``offset`` (physically contiguous runs in one read)."""
        view = _byte_view(buf)
        host = self._data_run(offset, len(view))
        if host is not None:
            self._pread(view, host)
            return
        for kind, start, length, host in self._runs(offset, len(view)):
            dest = view[start - offset:start - offset + length]
            if kind == DATA:
                self._pread(dest, host)
            elif kind == UNALLOCATED:
                self._read_lower(start, dest)
            elif kind == PACKED:
                within = start & self._cluster_mask
                dest[:] = self._inflate(host)[within:within + length]
            else:
                raise ImageIOError(errno.EIO, f"{self.path}: bad mapping at guest {start:#x}")

    def host_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, host offset) when the range is one host-contiguous run of data clusters."""
        if syscalls is not os:
            return None     # reads must go through the fault injection
        host = self._data_run(offset, length)
        return None if host is None else (self.fd, host)

    def _data_run(self, offset: int, length: int) -> int | None:
        """The host offset of the range when it is one host-contiguous run of data clusters
        inside one L2 table: the common case, served without walking cluster by cluster."""
        hdr, tables = self.header, self._tables
        index = offset >> hdr.l1_shift
        if index != (offset + length - 1) >> hdr.l1_shift or tables.l1[index] in (0, BAD):
            return None
        table, cb, l2_mask = tables.table(index), hdr.cluster_bits, hdr.l2_entries - 1
        first, last = (offset >> cb) & l2_mask, ((offset + length - 1) >> cb) & l2_mask
        entry = table[first]
        if entry in (0, BAD) or entry & COMPRESSED:
            return None
        # one C-speed comparison instead of a Python step per cluster
        size = self.cluster_size
        if last > first and table[first:last + 1] != array(
                "Q", range(entry, entry + (last - first + 1) * size, size)):
            return None
        return entry + (offset & self._cluster_mask)

    def _pread(self, dest: memoryview, host: int) -> None:
        try:
            pread_filling(self.fd, dest, host)
        except OSError as exc:
            raise ImageIOError(exc.errno, f"{self.path}: read failed: {exc.strerror}") from None

    def _read_lower(self, start: int, dest: memoryview) -> None:
        """Bytes of an unallocated range: the backing file's, zeros past its end or without one."""
        below = 0
        if self.backing is not None:
            below = max(0, min(len(dest), self.backing.size - start))
            if below:
                self.backing.read_into(start, dest[:below])
        zero_fill(dest[below:])

    def _inflate(self, entry: int) -> bytes:
        """The cluster of a compressed entry (qcow1.md §4.1), from a small LRU."""
        cluster = self._inflated.get(entry)
        if cluster is not None:
            self._inflated.move_to_end(entry)
            return cluster
        cb, size = self.header.cluster_bits, self.cluster_size
        csize = (entry >> (63 - cb)) & (size - 1)
        coff = entry & ((1 << (63 - cb)) - 1)
        try:
            data = read_exact_at(self.fd, csize, coff)
            # windowBits -15: QEMU inflates into one buffer, so back-references
            # may reach further than the -12 window it compresses with
            cluster = zlib.decompressobj(-15).decompress(data, size)
        except OSError as exc:
            raise ImageIOError(exc.errno, f"{self.path}: read failed: {exc.strerror}") from None
        except zlib.error:
            cluster = b""
        if csize == 0 or len(cluster) != size:
            raise ImageIOError(errno.EIO, f"{self.path}: bad compressed cluster at {coff:#x}")
        self._inflated[entry] = cluster
        if len(self._inflated) > INFLATED_CACHE_CLUSTERS:
            self._inflated.popitem(last=False)
        return cluster

    # -- writing --------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageIOError(errno.EROFS, f"{self.path}: image is read-only")
        if self._corrupt:
            raise ImageIOError(errno.EIO, f"{self.path}: corrupt metadata, repair first")

    def write(self, offset: int, data) -> None:
        """Write ``data`` at ``offset``; allocations copy-on-write whole clusters."""
        self._check_writable()
        src = _byte_view(data)
        host = self._data_run(offset, len(src))
        if host is not None:
            self._pwrite([src], host)   # all of it overwrites allocated clusters in place
            return
        shift = self.header.l1_shift
        if offset >> shift == (offset + len(src) - 1) >> shift:
            # the common allocating write: one L2 table, nothing mapped yet, no per-cluster walk
            with self._tables.alloc_lock:
                if self._try_allocate(offset, src):
                    return
        # materialised first: allocations below change the tables being walked
        for kind, start, length, host in list(self._runs(offset, len(src))):
            piece = src[start - offset:start - offset + length]
            if kind == DATA:
                self._pwrite([piece], host)
            elif kind == INVALID:
                raise ImageIOError(errno.EIO, f"{self.path}: bad mapping at guest {start:#x}")
            else:
                self._allocating_write(start, piece)

    def _pwrite(self, buffers, host: int) -> None:
        try:
            pwrite_all(self.fd, buffers, host)
        except OSError as exc:
            raise ImageIOError(exc.errno, f"{self.path}: write failed: {exc.strerror}") from None

    def _allocating_write(self, start: int, data: memoryview) -> None:
        """Write into unallocated/compressed clusters, one L2 table's range at a time."""
        shift, end, pos = self.header.l1_shift, start + len(data), start
        while pos < end:
            stop = min(end, ((pos >> shift) + 1) << shift)
            with self._tables.alloc_lock:
                self._allocate_in_table(pos, data[pos - start:stop - start])
            pos = stop

    def _allocate_in_table(self, pos: int, data: memoryview) -> None:
        if self._try_allocate(pos, data):
            return
        # another writer mapped some of these clusters since we looked: redo per cluster
        for offset in range(0, len(data), self.cluster_size):
            cut = min(len(data), ((pos + offset) | self._cluster_mask) + 1 - pos)
            self.write(pos + offset, data[offset:cut])

    def _try_allocate(self, pos: int, data: memoryview) -> bool:
        """Allocate all clusters under ``data`` (inside one L2 table) if none maps data yet.

        False, with nothing done, when one does.  Caller holds alloc_lock.
        """
        hdr, tables = self.header, self._tables
        index, first = pos >> hdr.l1_shift, (pos >> hdr.cluster_bits) & (hdr.l2_entries - 1)
        count = ((pos + len(data) - 1) >> hdr.cluster_bits) - (pos >> hdr.cluster_bits) + 1
        l2_offset = tables.l1[index]
        if l2_offset == BAD:
            return False
        if not l2_offset:
            self._allocate_with_table(pos, data, array("Q", bytes(8 * count)))
            return True
        table = tables.table(index)
        entries = table[first:first + count]
        # count(0) is the C-speed answer for the usual all-unallocated range
        if entries.count(0) != count and any(
                entry and not entry & COMPRESSED for entry in entries):
            return False
        host = tables.reserve(count * self.cluster_size)
        self._pwrite(self._cluster_buffers(pos, data, entries), host)
        tables.set_entries(index, first, self._pointers(host, count))
        return True

    def _allocate_with_table(self, pos: int, data: memoryview, entries: array) -> None:
        """New clusters and the new L2 table mapping them, back to back in one write."""
        hdr, tables = self.header, self._tables
        index, first = pos >> hdr.l1_shift, (pos >> hdr.cluster_bits) & (hdr.l2_entries - 1)
        slot = -(-hdr.l2_table_bytes // self.cluster_size) * self.cluster_size
        table_offset = tables.reserve(slot + len(entries) * self.cluster_size)
        table = array("Q", bytes(hdr.l2_table_bytes))
        table[first:first + len(entries)] = self._pointers(table_offset + slot, len(entries))
        # unreachable until the commit links it in L1 behind a data barrier (§5.3)
        self._pwrite([to_big_endian(table), _ZEROS[:slot - hdr.l2_table_bytes],
                      *self._cluster_buffers(pos, data, entries)], table_offset)
        tables.link_new_table(index, table_offset, table)

    def _pointers(self, host: int, count: int) -> array:
        """L2 entries of ``count`` clusters allocated back to back from ``host``."""
        size = self.cluster_size
        return array("Q", range(host, host + count * size, size))

    def _cluster_buffers(self, pos: int, data: memoryview, entries) -> list:
        """Whole clusters covering ``data``: partial ends merged with their old contents."""
        size, end = self.cluster_size, pos + len(data)
        first_start = pos & ~self._cluster_mask
        last_start = (end - 1) & ~self._cluster_mask
        head, tail = pos - first_start, last_start + size - end
        if first_start == last_start:
            if not (head or tail):
                return [data]
            cluster = self._old_cluster(first_start, entries[0])
            cluster[head:head + len(data)] = data
            return [cluster]
        buffers, body_start, body_end = [], 0, len(data)
        if head:
            cluster = self._old_cluster(first_start, entries[0])
            body_start = size - head
            cluster[head:] = data[:body_start]
            buffers.append(cluster)
        tail_cluster = None
        if tail:
            tail_cluster = self._old_cluster(last_start, entries[-1])
            body_end = len(data) - (size - tail)
            tail_cluster[:size - tail] = data[body_end:]
        buffers.append(data[body_start:body_end])
        if tail_cluster is not None:
            buffers.append(tail_cluster)
        return buffers

    def _old_cluster(self, start: int, entry: int) -> bytearray:
        """What a cluster reads as before its allocation: inflated, backing or zeros."""
        if entry & COMPRESSED:
            return bytearray(self._inflate(entry))
        cluster = bytearray(self.cluster_size)
        if self.backing is not None:
            self._read_lower(start, memoryview(cluster))
        return cluster

    # -- trim and zeroes ------------------------------------------------

    def _whole_clusters(self, start: int, end: int) -> tuple[int, int]:
        """The cluster-aligned part of [start, end); the disk's last partial cluster counts whole."""
        mask = self._cluster_mask
        aligned_end = (end + mask) & ~mask if end == self.size else end & ~mask
        return (start + mask) & ~mask, aligned_end

    def trim(self, offset: int, length: int) -> None:
        """Unmap the whole clusters of the range when no backing file could show through."""
        self._check_writable()
        if self.backing is None:
            self._unmap(*self._whole_clusters(offset, offset + length))

    def _unmap(self, start: int, end: int) -> None:
        """Set the L2 entries of the whole clusters in [start, end) to 0 (pending commit),
        a table's range at a time."""
        hdr, tables = self.header, self._tables
        shift, cb, l2_mask = hdr.l1_shift, hdr.cluster_bits, hdr.l2_entries - 1
        pos = start
        while pos < end:
            index = pos >> shift
            if tables.l1[index] == 0:
                pos = min(end, tables.next_used(index) << shift)
                continue
            stop = min(end, (index + 1) << shift)
            if tables.l1[index] != BAD:
                first = (pos >> cb) & l2_mask
                count = ((stop - 1) >> cb) - (pos >> cb) + 1
                with tables.alloc_lock:
                    if tables.table(index)[first:first + count].count(0) != count:
                        tables.set_entries(index, first, array("Q", bytes(8 * count)))
            pos = stop

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Make the range read zeros: unmap whole clusters when allowed, write zeros otherwise."""
        self._check_writable()
        unmaps, writes = [], []
        for kind, start, run_length, _host in list(self._runs(offset, length)):
            end = start + run_length
            if kind == UNALLOCATED and self.backing is None:
                continue
            whole_start, whole_end = self._whole_clusters(start, end)
            if may_trim and self.backing is None and whole_start < whole_end:
                unmaps.append((whole_start, whole_end))
                writes += [(start, whole_start), (whole_end, end)]
            else:
                writes.append((start, end))
        writes = [(start, end) for start, end in writes if start < end]
        if fast and writes:
            raise ImageIOError(errno.ENOTSUP, "zeroing this range needs data writes")
        for start, end in unmaps:
            self._unmap(start, end)
        for start, end in writes:
            for pos in range(start, end, len(_ZEROS)):
                self.write(pos, _ZEROS[:min(len(_ZEROS), end - pos)])

    # -- allocation reports -----------------------------------------------

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation from the in-memory tables; unallocated ranges ask the backing file.

        Bounded work per call, whatever the range and the geometry (see
        `MAX_STATUS_ENTRIES`), and one call into the backing file; the caller
        asks again for the rest.  A table's range whose entries are all set (or
        all unset) is one extent, found at C speed.
        """
        hdr, tables = self.header, self._tables
        shift, cb, l2_mask = hdr.l1_shift, hdr.cluster_bits, hdr.l2_entries - 1
        extents: list[Extent] = []
        pos, end, budget = offset, offset + length, MAX_STATUS_ENTRIES
        loads_allowed = tables.loads + MAX_STATUS_LOADS
        while pos < end and budget > 0 and tables.loads < loads_allowed \
                and len(extents) < MAX_STATUS_EXTENTS:
            index = pos >> shift
            l2_offset = tables.l1[index]
            if l2_offset == 0:
                stop = min(end, tables.next_used(index) << shift)
                pos += self._lower_status(pos, stop - pos, extents)
                if pos < stop:
                    break       # the backing file answered part: enough for one call
                continue
            stop = min(end, (index + 1) << shift)
            if l2_offset == BAD:
                _append(extents, Extent(stop - pos, False, False, 1))
                pos = stop
                continue
            first, last = (pos >> cb) & l2_mask, ((stop - 1) >> cb) & l2_mask
            last = min(last, first + budget - 1)
            stop = min(stop, ((pos >> cb) + last - first + 1) << cb)
            budget -= last - first + 1
            entries = tables.table(index)[first:last + 1]
            unset = entries.count(0)
            if not unset:
                _append(extents, Extent(stop - pos, False, False, 1))
            elif unset == len(entries):
                covered = self._lower_status(pos, stop - pos, extents)
                if covered < stop - pos:
                    break
            else:
                self._mixed_table_status(pos, stop, entries, extents)
            pos = stop
        return extents

    def _mixed_table_status(self, pos: int, stop: int, entries, extents: list) -> None:
        """Extents of one table's range whose clusters are partly allocated, a run of
        equally (un)allocated clusters at a time."""
        base, size, count, index = pos & ~self._cluster_mask, self.cluster_size, len(entries), 0
        while index < count:
            allocated = entries[index] != 0
            after = index + 1
            while after < count and (entries[after] != 0) == allocated:
                after += 1
            run_end = min(stop, base + after * size)
            if allocated:
                _append(extents, Extent(run_end - pos, False, False, 1))
            else:
                self._lower_status(pos, run_end - pos, extents, whole=True)
            pos, index = run_end, after

    def _lower_status(self, start: int, length: int, extents: list, whole: bool = False) -> int:
        """Append the status of an unallocated range; returns the bytes covered.

        One call into the backing file covers what it covers (its own bound);
        ``whole``: call it until the range is covered (a range of one cluster).
        """
        below = 0
        if self.backing is not None:
            below = max(0, min(length, self.backing.size - start))
        pos, end = start, start + below
        while pos < end:
            found = self.backing.block_status(pos, end - pos)
            if not found:
                raise ImageIOError(errno.EIO, f"{self.path}: backing file returned no extent")
            for ext in found:
                ext_length = min(ext.length, end - pos)
                _append(extents, Extent(ext_length, ext.hole, ext.zero,
                                        ext.depth + 1 if ext.depth else 0))
                pos += ext_length
            if not whole:
                break
        if pos == end and pos < start + length:
            # past a shorter backing file's end QEMU still reports the backing's depth
            depth = 2 if self.backing is not None else 0
            _append(extents, Extent(start + length - pos, True, True, depth))
            pos = start + length
        return pos - start

    def map_extents(self, offset: int = 0, length: int | None = None):
        """Yield (start, length, kind, host_offset, depth) of this image's own clusters:
        depth 1 where it stores them, 0 ("unallocated") where its backing file or zeros
        show through (`qcownbd.image.formats.chain_map` walks the chain)."""
        length = self.size - offset if length is None else length
        offset_mask = (1 << (63 - self.header.cluster_bits)) - 1
        for kind, start, run_length, host in self._runs(offset, length):
            if kind == DATA:
                yield start, run_length, "data", host, 1
            elif kind == PACKED:
                yield start, run_length, "compressed", host & offset_mask, 1
            elif kind == INVALID:
                yield start, run_length, "data", None, 1
            else:
                yield start, run_length, "unallocated", None, 0

    def allocated_bytes(self) -> int:
        """Guest bytes this image (not its backing files) maps: clusters with an entry."""
        tables, count = self._tables, 0
        for index in list(tables.l1_used):
            if tables.l1[index] != BAD:
                count += sum(1 for entry in tables.table(index) if entry)
        return count * self.cluster_size

    def check(self, repair: bool = False, progress=None) -> CheckReport:
        """Full metadata scan; ``repair`` drops dangling and aliased pointers durably.

        ``progress(done, total)`` is called as the scan goes through the L2 tables.
        """
        if repair and self.read_only:
            raise ImageIOError(errno.EROFS, f"{self.path}: image is read-only, cannot repair")
        tables = self._tables
        with tables.alloc_lock:
            if not self.read_only:
                tables.commit()
            file_size = os.fstat(self.fd).st_size
            report = scan(self.fd, self.header, file_size, progress)
            if repair and report.has_bad_pointers:
                try:
                    drop_pointers(self.fd, self.header, report)
                except OSError as exc:
                    raise ImageIOError(exc.errno, f"{self.path}: repair failed") from None
                tables.reload()
                self._inflated.clear()
                self._scan_for_writing(file_size, allow_corrupt=True)
            return report

    # -- durability -----------------------------------------------------

    @property
    def has_pending_metadata(self) -> bool:
        """True while pointer updates wait for a commit (the server flushes on a timer)."""
        return not self.read_only and self._tables.has_pending

    def flush(self) -> None:
        """Commit pending pointers (data barrier first), or just fdatasync if none."""
        if not self.read_only and not self._closed:
            self._tables.commit()

    def close(self) -> None:
        """Commit pending pointers, close the file and the backing chain (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            os.close(self.fd)
            if self.backing is not None:
                self.backing.close()


def _append(extents: list, extent: Extent) -> None:
    """Append, merging with the previous extent when the state is equal."""
    if extents and (extents[-1].hole, extents[-1].zero, extents[-1].depth) == (
            extent.hole, extent.zero, extent.depth):
        last = extents.pop()
        extent = Extent(last.length + extent.length, extent.hole, extent.zero, extent.depth)
    extents.append(extent)
