"""QCOW1 mapping tables: the in-memory L1, the L2 tables (held in the server's
one `MetadataCache`), the allocator and the pending pointer updates with
their crash-safe commit.

Pointer updates (new L2 entries, new L1 entries, unmapped entries) change the
in-memory tables at once, so reads see them, but reach the file only in
`commit`: fdatasync (the data and fresh tables they point at are durable) →
pending L2 entries → pending L1 entries → fdatasync (qcow1.md §5.3).  Every
pointer reachable from the on-disk L1 therefore points at durable bytes.

The allocator takes free clusters (`qcow1_free`) before growing the file.  A
cluster whose pointer was dropped becomes free only after the commit that
wrote the dropping is complete, and after its bytes were punched out of the
file: a crash can then never leave a stale pointer and a new one at the
same bytes.  A free run at the file's end is cut off.

Threading: the event-loop thread reads and changes the tables; `commit` may
run in a worker thread.  It only touches the pending maps (under
`_pending_lock`) and the file; commits are serialised by `_commit_lock`.
A table with pending entries is pinned in the cache until its commit, and
referenced by them too, so a commit never needs the cache and a reload
never loses them.
"""

import re
import sys
import threading
from array import array
from bisect import bisect_left, insort

import os

from ..errors import ImageIOError
from . import backend
from .faults import syscalls
from .metadata_cache import SHARED, MetadataCache
from .qcow1_free import CompressedClusters, FreeClusters
from .qcow1_header import Qcow1Header, read_exact_at

#: in-memory sentinel for an entry that failed validation (read-only images):
#: never a real entry (odd, no flag), every access gives EIO
BAD = 1
_NONZERO_BYTE = re.compile(rb"[^\0]")


def to_host_order(data) -> array:
    """Big-endian u64 table bytes → array('Q') in host byte order."""
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def to_big_endian(values) -> bytes:
    """u64 values → big-endian bytes."""
    table = array("Q", values)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


def nonzero_indices(data) -> array:
    """Indices of the non-zero u64 words of ``data``, found with a C-speed scan."""
    found = array("Q")
    pos = 0
    while (match := _NONZERO_BYTE.search(data, pos)) is not None:
        index = match.start() // 8
        found.append(index)
        pos = (index + 1) * 8
    return found


def pwrite_all(fd: int, buffers, offset: int) -> None:
    """Write every buffer back to back at ``offset``, retrying short writes."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        done = syscalls.pwritev(fd, views, offset)
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


class Qcow1Tables:
    """L1 + L2 tables + allocator + pending pointers of one open image; its L2 tables
    live in ``cache`` (the process's shared one by default) until `close`."""

    def __init__(self, fd: int, path, header: Qcow1Header, *, cache: MetadataCache | None = None):
        self.fd = fd
        self.path = path
        self.header = header
        self.cache = SHARED if cache is None else cache
        self._token = self.cache.register(self)
        #: called with (table, l1_index) for every table read from disk (read-only validation)
        self.on_load = None
        #: next free byte of the file for allocations (set after the open scan)
        self.next_free = 0
        #: free clusters below next_free (the open scan's leaks, then freed ones)
        self.free = FreeClusters(header.cluster_size)
        #: compressed runs per cluster (set after the open scan)
        self.compressed = CompressedClusters(header.cluster_size)
        #: past this file size a pending commit is taken before growing (`make_room`)
        self.growth_limit = self._growth_limit()
        #: tables read from the file so far (work bounds count them: a load costs)
        self.loads = 0
        self.alloc_lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        #: table index -> [first, stop, table]: the span of its entries changed since the
        #: last commit (their values are the table's: a span, not a copy, keeps this small)
        self._pending_l2: dict[int, list] = {}
        self._pending_l1: dict[int, int] = {}
        #: (start, end) runs whose pointers the pending updates drop: free after the commit
        self._pending_free: list[tuple[int, int]] = []
        #: table index -> table, for the tables a commit is writing
        self._committing: dict[int, array] = {}
        self.reload()

    def reload(self) -> None:
        """(Re)read the L1 table from the file and drop every cached L2 table."""
        hdr = self.header
        try:
            raw = read_exact_at(self.fd, hdr.l1_bytes, hdr.l1_table_offset)
        except OSError as exc:
            raise ImageIOError(exc.errno, f"{self.path}: cannot read L1 table") from None
        raw = raw.ljust(hdr.l1_bytes, b"\0")
        self.l1 = to_host_order(raw)
        #: sorted indices of non-zero L1 entries: lets block status skip empty ranges
        self.l1_used = nonzero_indices(raw)
        self.cache.drop(self._token)

    def close(self) -> None:
        """The image closed: its tables leave the cache."""
        self.cache.forget(self._token)

    def set_l1_in_memory(self, index: int, value: int) -> None:
        """Replace an L1 entry in memory only (read-only sanitising, not a pointer update)."""
        self.l1[index] = value
        pos = bisect_left(self.l1_used, index)
        present = pos < len(self.l1_used) and self.l1_used[pos] == index
        if value and not present:
            self.l1_used.insert(pos, index)
        elif not value and present:
            del self.l1_used[pos]

    def next_used(self, index: int) -> int:
        """The first index ≥ ``index`` with a non-zero L1 entry (len(l1) if none)."""
        pos = bisect_left(self.l1_used, index)
        return self.l1_used[pos] if pos < len(self.l1_used) else len(self.l1)

    # -- L2 tables ------------------------------------------------------

    def table(self, index: int) -> array:
        """The L2 table of L1 slot ``index`` (its L1 entry must be a valid offset)."""
        table = self.cache.get(self._token, index)
        if table is not None:
            return table
        table = self._pending_table(index)
        if table is not None:
            self.cache.put(self._token, index, table)
            with self._pending_lock:
                if index in self._pending_l2:
                    self.cache.pin(self._token, index)
            return table
        table = self._read_table(self.l1[index])
        self.loads += 1
        if self.on_load is not None:
            self.on_load(table, index)
        self.cache.put(self._token, index, table)
        return table

    def _pending_table(self, index: int) -> array | None:
        """The table with pending entries at ``index``, if the cache let it go (a
        reload from the file would lose them)."""
        with self._pending_lock:
            pending = self._pending_l2.get(index)
            return pending[2] if pending is not None else self._committing.get(index)

    def _read_table(self, offset: int) -> array:
        size = self.header.l2_table_bytes
        try:
            data = read_exact_at(self.fd, size, offset)
        except OSError as exc:
            raise ImageIOError(exc.errno, f"{self.path}: cannot read L2 table") from None
        # a table whose tail lies past EOF reads zeros there (QEMU parity,
        # read-only only: the read-write scan refuses such tables)
        return to_host_order(data.ljust(size, b"\0"))

    # -- allocation and pending pointers --------------------------------

    def reserve(self, nbytes: int) -> int:
        """``nbytes`` (rounded up to clusters) in one piece: a free run long enough, else
        the end of the file; caller holds alloc_lock."""
        nbytes = self._whole(nbytes)
        self.make_room(nbytes)
        pieces = self.free.take(nbytes)
        if len(pieces) == 1 and pieces[0][1] == nbytes:
            return pieces[0][0]
        for start, length in pieces:        # not one piece: give them back
            self.free.add(start, start + length)
        return self._grow(nbytes)

    def reserve_runs(self, nbytes: int) -> list[tuple[int, int]]:
        """``nbytes`` (rounded up to clusters) as (offset, length) pieces: free clusters
        first (one piece if a run is long enough), then the end of the file; caller
        holds alloc_lock."""
        nbytes = self._whole(nbytes)
        if self.free.total < nbytes:
            self.make_room(nbytes)
        pieces = self.free.take(nbytes)
        missing = nbytes - sum(length for _start, length in pieces)
        if missing:
            pieces.append((self._grow(missing), missing))
        return pieces

    def _whole(self, nbytes: int) -> int:
        cluster = self.header.cluster_size
        return -(-nbytes // cluster) * cluster

    def _grow(self, nbytes: int) -> int:
        offset = self.next_free
        self.next_free += nbytes
        return offset

    def _growth_limit(self) -> int:
        """The file size that holds every cluster and table the disk can need: header
        and L1 table, a slot per L2 table, a cluster per guest cluster."""
        hdr = self.header
        slot = self._whole(hdr.l2_table_bytes)
        return (self._whole(hdr.l1_table_offset + hdr.l1_bytes) + hdr.l1_size * slot
                + self._whole(hdr.size))

    def make_room(self, nbytes: int) -> None:
        """Before growing the file past ``growth_limit``: commit now, so the clusters that
        pending updates free can be taken instead (a guest that discards and rewrites
        faster than the commit timer runs must not grow the file without bound).
        Caller holds alloc_lock."""
        if self.next_free + nbytes > self.growth_limit and self._pending_free:
            self.commit()

    def set_entries(self, index: int, first: int, values, freed=()) -> None:
        """Point L2 entries ``first..`` of table ``index`` at new values (pending until
        commit); ``freed``: the (start, end) runs nothing references once they are."""
        table, values = self.table(index), array("Q", values)
        stop = first + len(values)
        with self._pending_lock:
            table[first:stop] = values
            span = self._pending_l2.get(index)
            if span is None:
                self._pending_l2[index] = [first, stop, table]
                self.cache.pin(self._token, index)
            else:
                span[0], span[1] = min(span[0], first), max(span[1], stop)
            # in the same step as the entries: a commit takes both or neither
            self._pending_free.extend(freed)

    def link_new_table(self, index: int, offset: int, table: array) -> None:
        """Enter a freshly written L2 table at L1 slot ``index`` (pending until commit)."""
        with self._pending_lock:
            self._pending_l1[index] = offset
        self.l1[index] = offset
        insort(self.l1_used, index)
        self.cache.put(self._token, index, table)

    def is_dirty(self, index: int) -> bool:
        """Whether table ``index`` has entries not yet written to the file."""
        with self._pending_lock:
            return index in self._pending_l2 or index in self._committing

    @property
    def has_pending(self) -> bool:
        """True when pointer updates (or the clusters they free) wait for a commit."""
        return bool(self._pending_l2 or self._pending_l1 or self._pending_free)

    def commit(self) -> None:
        """Make everything written so far durable, then the pending pointers (§5.3).

        The pending spans' values are copied from the cached tables before the
        first fdatasync: every pointer in a table at that moment points at bytes
        already written (data is written before its pointer is set), so that
        barrier makes them durable before the pointers are written.  A dirty
        table stays referenced by its pending span until it is written.
        """
        with self._commit_lock:
            with self._pending_lock:
                spans, l1, freed = self._pending_l2, self._pending_l1, self._pending_free
                self._pending_l2, self._pending_l1, self._pending_free = {}, {}, []
                self._committing = {index: table for index, (_f, _s, table) in spans.items()}
                l2 = {index: (first, table[first:stop])
                      for index, (first, stop, table) in spans.items()}
            try:
                syscalls.fdatasync(self.fd)
                if l2 or l1:
                    self._write_pointers(l2, l1)
                    syscalls.fdatasync(self.fd)
            except OSError as exc:
                self._restore_pending(spans, l1, freed)
                raise ImageIOError(exc.errno, f"{self.path}: flush failed: {exc.strerror}") from None
            finally:
                with self._pending_lock:
                    # what changed again meanwhile (or failed) stays pinned
                    self.cache.unpin(self._token, [index for index in self._committing
                                                   if index not in self._pending_l2])
                    self._committing = {}
        # outside the commit lock: a commit of the loop's thread may wait for it while
        # holding the allocation lock, which this takes
        self.reclaim(freed)

    def reclaim(self, runs) -> None:
        """Make ``runs``, referenced by no durable pointer, free: their bytes punched out
        first (nobody can have reused them yet), then the file's free end cut off."""
        for start, end in runs:
            try:
                backend.punch_hole(self.fd, start, end - start)
            except OSError:
                pass    # the blocks stay allocated: space, not data, is what is lost
        with self.alloc_lock:
            for start, end in runs:
                self.free.add(start, end)
            end = self.free.take_tail(self.next_free)
            if end < self.next_free:
                try:
                    os.ftruncate(self.fd, end)
                except OSError:
                    self.free.add(end, self.next_free)
                    return
                self.next_free = end

    def drop_all(self) -> None:
        """Unmap every cluster, durably: the zeroed L1 table is synced before the file is
        cut back to header and L1 table, so a crash in between leaves leaks, never a
        pointer to a cut-off cluster."""
        hdr, zeros = self.header, bytes(1 << 20)
        with self.alloc_lock:
            self.commit()
            end = hdr.l1_table_offset + -(-hdr.l1_bytes // 512) * 512   # qemu-img create's size
            try:
                for pos in range(0, hdr.l1_bytes, len(zeros)):
                    pwrite_all(self.fd, [zeros[:hdr.l1_bytes - pos]], hdr.l1_table_offset + pos)
                syscalls.fdatasync(self.fd)
                os.ftruncate(self.fd, end)
                syscalls.fdatasync(self.fd)
            except OSError as exc:
                raise ImageIOError(exc.errno, f"{self.path}: emptying failed: {exc.strerror}") \
                    from None
            self.reload()
            self.free = FreeClusters(hdr.cluster_size)
            self.compressed = CompressedClusters(hdr.cluster_size)
            self.next_free = -(-end // hdr.cluster_size) * hdr.cluster_size

    def _write_pointers(self, l2: dict, l1: dict) -> None:
        for index in sorted(l2):
            table_offset = l1.get(index) or self.l1[index]
            first, values = l2[index]
            pwrite_all(self.fd, [to_big_endian(values)], table_offset + 8 * first)
        for first, values in _runs(l1):
            pwrite_all(self.fd, [to_big_endian(values)], self.header.l1_table_offset + 8 * first)

    def _restore_pending(self, spans: dict, l1: dict, freed: list) -> None:
        """Put back what a failed commit took (the tables hold the newest values)."""
        with self._pending_lock:
            self._pending_free[:0] = freed
            for index, (first, stop, table) in spans.items():
                span = self._pending_l2.setdefault(index, [first, stop, table])
                span[0], span[1] = min(span[0], first), max(span[1], stop)
            for index, value in l1.items():
                self._pending_l1.setdefault(index, value)


def _runs(entries: dict[int, int]):
    """Group {position: value} into (first position, [values]) runs of consecutive positions."""
    positions = sorted(entries)
    if positions and positions[-1] - positions[0] == len(positions) - 1:
        # the usual case (sequential allocation): one run, built without a step per entry
        yield positions[0], list(map(entries.__getitem__, positions))
        return
    run_start, values = None, []
    for pos in positions:
        if values and pos == run_start + len(values):
            values.append(entries[pos])
            continue
        if values:
            yield run_start, values
        run_start, values = pos, [entries[pos]]
    if values:
        yield run_start, values
