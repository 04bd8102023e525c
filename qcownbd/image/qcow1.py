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
from .backend import Backend, Extent, append_extent, pread_filling
from .qcow1_check import CheckReport, drop_pointers, scan, validate_lazily
from .qcow1_header import (COMPRESSED, DEFAULT_MAX_L1_ENTRIES, Qcow1Header, create_qcow1,
                           is_qcow1, read_exact_at, read_header)
from .qcow1_free import (CompressedClusters, FreeClusters, cluster_pointers, released_runs,
                          scatter)
from .metadata_cache import MetadataCache
from .qcow1_map import DATA, INVALID, PACKED, UNALLOCATED, ClusterMap
from .qcow1_tables import BAD, Qcow1Tables, pwrite_all, to_big_endian

__all__ = ["Qcow1Image", "Qcow1Header", "CheckReport", "create_qcow1", "is_qcow1"]

_ZEROS = memoryview(bytes(1 << 20))
INFLATED_CACHE_CLUSTERS = 16
#: block_status stops after this many extents (the map bounds the tables it reads)
MAX_STATUS_EXTENTS = 4096


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
    ``metadata_cache`` holds its L2 tables (default: the process's shared one).
    """

    format_name = "qcow1"

    def __init__(self, fd: int, path, *, read_only: bool, backing_opener=None,
                 metadata_cache: MetadataCache | None = None,
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
        self._tables = Qcow1Tables(fd, path, hdr, cache=metadata_cache)
        self._map = ClusterMap(hdr, self._tables)
        self._inflated: OrderedDict[int, bytes] = OrderedDict()
        self._corrupt = False
        try:
            if read_only:
                validate_lazily(self.path, hdr, self._tables, file_size)
            else:
                self._scan_for_writing(file_size, allow_corrupt)
            self.backing_name = os.fsdecode(name) if name else None
            self.backing = None
            if name:
                if backing_opener is None:
                    raise ImageFormatError(
                        f"{path}: has a backing file but no backing opener was given")
                self.backing = backing_opener(name)
        except BaseException:
            self._tables.close()
            raise
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
        mask, tables = self._cluster_mask, self._tables
        tables.next_free = (max(file_size, report.max_end) + mask) & ~mask
        # what the scan found unreferenced is free: no durable pointer reaches it
        tables.free = FreeClusters(self.cluster_size)
        for start, end in zip(report.free_starts, report.free_ends):
            tables.free.add(start, end)
        tables.compressed = CompressedClusters.from_runs(self.cluster_size, report.compressed)

    # -- reading --------------------------------------------------------

    def read_into(self, offset: int, buf) -> None:
        """Fill ``buf`` with the disk bytes at ``offset`` (physically contiguous runs in one read)."""
        view = _byte_view(buf)
        host = self._map.data_run(offset, len(view))
        if host is not None:
            self._pread(view, host)
            return
        for kind, start, length, host in self._map.runs(offset, len(view)):
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
        """(fd, file offset) when the range is one host-contiguous run of data clusters,
        or is left wholly to a backing file that stores it as-is (a fleet overlay's
        reads of its golden image go out by sendfile too)."""
        host = self._map.data_run(offset, length)
        if host is not None:
            return self.fd, host
        if self.backing is None or offset + length > self.backing.size \
                or not self._map.unallocated(offset, length):
            return None
        return self.backing.host_range(offset, length)

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
        host = self._map.data_run(offset, len(src))
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
        for kind, start, length, host in list(self._map.runs(offset, len(src))):
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
        runs = tables.reserve_runs(count * self.cluster_size)
        self._write_runs(runs, self._cluster_buffers(pos, data, entries))
        # a compressed cluster rewritten leaves its old bytes to the free clusters
        tables.set_entries(index, first, cluster_pointers(runs, self.cluster_size), freed=self._released(entries))
        return True

    def _allocate_with_table(self, pos: int, data: memoryview, entries: array) -> None:
        """New clusters and the new L2 table mapping them (in one write when both come
        from the end of the file, back to back)."""
        hdr, tables = self.header, self._tables
        index, first = pos >> hdr.l1_shift, (pos >> hdr.cluster_bits) & (hdr.l2_entries - 1)
        slot = -(-hdr.l2_table_bytes // self.cluster_size) * self.cluster_size
        end_of_file = tables.next_free
        table_offset = tables.reserve(slot)
        runs = tables.reserve_runs(len(entries) * self.cluster_size)
        table = array("Q", bytes(hdr.l2_table_bytes))
        pointers = cluster_pointers(runs, self.cluster_size)
        table[first:first + len(entries)] = pointers
        # unreachable until the commit links it in L1 behind a data barrier (§5.3)
        buffers = self._cluster_buffers(pos, data, entries)
        back_to_back = len(runs) == 1 and runs[0][0] == table_offset + slot
        if back_to_back and table_offset >= end_of_file:
            # a slot past the file's end reads as zeros, and the data written after it
            # keeps it inside the file: only the entries set need writing (the 32 KiB
            # table of an overlay's 512-byte clusters stays a hole)
            self._pwrite([to_big_endian(pointers)], table_offset + 8 * first)
            self._pwrite(buffers, runs[0][0])
            tables.link_new_table(index, table_offset, table)
            return
        head = [to_big_endian(table), _ZEROS[:slot - hdr.l2_table_bytes]]
        if back_to_back:
            self._pwrite(head + buffers, table_offset)
        else:
            self._pwrite(head, table_offset)
            self._write_runs(runs, buffers)
        tables.link_new_table(index, table_offset, table)

    def _write_runs(self, runs, buffers) -> None:
        """Write ``buffers`` (whole clusters, back to back) into the pieces ``runs``."""
        for offset, piece in scatter(runs, buffers):
            self._pwrite(piece, offset)

    def _released(self, entries) -> list[tuple[int, int]]:
        if not any(entries):        # the usual allocation: nothing mapped before
            return []
        return released_runs(entries, self.header.cluster_bits, self._tables.compressed)

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
                    entries = tables.table(index)[first:first + count]
                    if entries.count(0) != count:
                        tables.set_entries(index, first, array("Q", bytes(8 * count)),
                                           freed=self._released(entries))
            pos = stop

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Make the range read zeros: unmap whole clusters when allowed, write zeros otherwise."""
        self._check_writable()
        unmaps, writes = [], []
        for kind, start, run_length, _host in list(self._map.runs(offset, length)):
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

        Bounded work per call, whatever the range and the geometry (the map's
        bound, and one call into the backing file); the caller asks again for
        the rest.
        """
        extents: list[Extent] = []
        for allocated, start, stop in self._map.allocation(offset, length):
            if allocated:
                append_extent(extents, Extent(stop - start, False, False, 1))
            elif self._lower_status(start, stop - start, extents) < stop - start:
                break       # the backing file answered part: enough for one call
            if len(extents) >= MAX_STATUS_EXTENTS:
                break
        return extents

    def _lower_status(self, start: int, length: int, extents: list) -> int:
        """Append the status of an unallocated range; returns the bytes covered
        (one call into the backing file covers what it covers: its own bound)."""
        below = 0
        if self.backing is not None:
            below = max(0, min(length, self.backing.size - start))
        pos, end = start, start + below
        if pos < end:
            found = self.backing.block_status(pos, end - pos)
            if not found:
                raise ImageIOError(errno.EIO, f"{self.path}: backing file returned no extent")
            for ext in found:
                ext_length = min(ext.length, end - pos)
                append_extent(extents, Extent(ext_length, ext.hole, ext.zero,
                                        ext.depth + 1 if ext.depth else 0))
                pos += ext_length
        if pos == end and pos < start + length:
            # past a shorter backing file's end QEMU still reports the backing's depth
            depth = 2 if self.backing is not None else 0
            append_extent(extents, Extent(start + length - pos, True, True, depth))
            pos = start + length
        return pos - start

    def map_extents(self, offset: int = 0, length: int | None = None):
        """Yield (start, length, kind, host_offset, depth) of this image's own clusters:
        depth 1 where it stores them, 0 ("unallocated") where its backing file or zeros
        show through (`qcownbd.image.formats.chain_map` walks the chain)."""
        length = self.size - offset if length is None else length
        offset_mask = (1 << (63 - self.header.cluster_bits)) - 1
        for kind, start, run_length, host in self._map.runs(offset, length):
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
        return self._map.allocated_clusters() * self.cluster_size

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
            if repair and report.leaked_bytes:
                # leaked clusters are free: their bytes go back to the filesystem
                tables.reclaim(tables.free.runs())
                report.add_repair(f"gave {report.leaked_bytes} leaked bytes back to the file system")
            return report

    def drop_all(self) -> None:
        """Unmap every cluster durably (`qcownbd commit`, once they are copied down)."""
        self._check_writable()
        self._tables.drop_all()
        self._inflated.clear()

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
            self._tables.close()
            os.close(self.fd)
            if self.backing is not None:
                self.backing.close()

