"""The free clusters of a QCOW1 file: the free-space map QCOW1 does not have.

QCOW1 keeps no record of which clusters are in use, so QEMU never reuses
one.  A read-write open scans all metadata anyway (qcow1.md §5.4), which
tells which clusters nothing references; clusters freed later (TRIM, zero
writes that unmap, a compressed cluster rewritten) join them once the
pointer change that freed them is durable, so that after a crash no stale
pointer and no new one can reach the same bytes (§5.3).

`FreeClusters` holds cluster-aligned runs, merged and sorted: a fragmented
disk costs a run per gap, not an entry per cluster.  `CompressedClusters`
counts the compressed runs touching each cluster, since several share one:
a cluster is free only when the last of them is gone.
"""

from array import array
from bisect import bisect_left, bisect_right
from itertools import chain

from .qcow1_header import COMPRESSED


class FreeClusters:
    """Sorted, merged ``[start, end)`` runs of free cluster-aligned bytes."""

    def __init__(self, cluster_size: int):
        self.cluster_size = cluster_size
        self._starts: list[int] = []
        self._ends: list[int] = []
        #: free bytes (kept as runs change: allocations ask for it every time)
        self.total = 0

    def __len__(self) -> int:
        return len(self._starts)

    def runs(self) -> list[tuple[int, int]]:
        """The runs, in order."""
        return list(zip(self._starts, self._ends))

    def add(self, start: int, end: int) -> None:
        """Mark ``[start, end)`` free, merging it with the runs it touches."""
        if start >= end:
            return
        first = bisect_left(self._ends, start)       # first run ending at or after start
        last = bisect_right(self._starts, end)       # runs starting at or before end
        if first < last:
            self.total -= sum(self._ends[first:last]) - sum(self._starts[first:last])
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self.total += end - start
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def take(self, nbytes: int) -> list[tuple[int, int]]:
        """``nbytes`` of free clusters as (offset, length) pieces, marked used: one
        contiguous piece when a run is long enough, else the lowest pieces; what the
        map cannot give is missing from the result (the caller grows the file)."""
        for index, (start, end) in enumerate(zip(self._starts, self._ends)):
            if end - start >= nbytes:
                self._cut(index, start + nbytes)
                return [(start, nbytes)]
        pieces, wanted = [], nbytes
        while wanted and self._starts:
            start, end = self._starts[0], self._ends[0]
            length = min(wanted, end - start)
            pieces.append((start, length))
            self._cut(0, start + length)
            wanted -= length
        return pieces

    def _cut(self, index: int, new_start: int) -> None:
        self.total -= min(new_start, self._ends[index]) - self._starts[index]
        if new_start >= self._ends[index]:
            del self._starts[index], self._ends[index]
        else:
            self._starts[index] = new_start

    def take_tail(self, file_end: int) -> int:
        """If a run ends at ``file_end``, drop it and return its start (the file can
        shrink to it); else return ``file_end``."""
        if self._ends and self._ends[-1] == file_end:
            start = self._starts[-1]
            self.total -= file_end - start
            del self._starts[-1], self._ends[-1]
            return start
        return file_end


class CompressedClusters:
    """How many compressed runs touch each cluster (clusters no run touches: none)."""

    def __init__(self, cluster_size: int):
        self.cluster_size = cluster_size
        self._clusters = array("Q")         # sorted cluster offsets
        self._counts = array("L")

    @classmethod
    def from_runs(cls, cluster_size: int, runs) -> "CompressedClusters":
        """Build from the (start, end) byte runs of every compressed entry."""
        counts: dict[int, int] = {}
        for start, end in runs:
            for cluster in cls._touched(cluster_size, start, end):
                counts[cluster] = counts.get(cluster, 0) + 1
        built = cls(cluster_size)
        for cluster in sorted(counts):
            built._clusters.append(cluster)
            built._counts.append(counts[cluster])
        return built

    @staticmethod
    def _touched(cluster_size: int, start: int, end: int) -> range:
        first = start - start % cluster_size
        return range(first, end, cluster_size)

    def release(self, start: int, end: int) -> list[int]:
        """One compressed run ``[start, end)`` is gone: the clusters it leaves unused."""
        freed = []
        for cluster in self._touched(self.cluster_size, start, end):
            index = bisect_left(self._clusters, cluster)
            if index == len(self._clusters) or self._clusters[index] != cluster:
                continue        # not counted (the scan refused to track it): keep it used
            self._counts[index] -= 1
            if not self._counts[index]:
                del self._clusters[index], self._counts[index]
                freed.append(cluster)
        return freed


def cluster_pointers(runs, cluster_size: int) -> array:
    """L2 entries of the clusters of ``runs`` ((offset, length) pieces), in order."""
    return array("Q", chain.from_iterable(range(offset, offset + length, cluster_size)
                                          for offset, length in runs))


def scatter(runs, buffers) -> list[tuple[int, list]]:
    """Cut ``buffers`` (whole clusters, back to back) into the pieces ``runs``:
    (offset, buffers) per piece, without copying."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    pieces = []
    for offset, length in runs:
        piece = []
        while length:
            view = views[0]
            if len(view) <= length:
                piece.append(views.pop(0))
                length -= len(view)
            else:
                piece.append(view[:length])
                views[0], length = view[length:], 0
        pieces.append((offset, piece))
    return pieces


def released_runs(entries, cluster_bits: int, compressed: CompressedClusters) -> list[tuple[int, int]]:
    """The (start, end) cluster runs that dropping the L2 ``entries`` leaves
    unreferenced: data clusters, and the clusters of compressed runs no other
    entry shares."""
    size, freed = 1 << cluster_bits, []
    offset_mask = (1 << (63 - cluster_bits)) - 1
    for entry in entries:
        if not entry:
            continue
        if entry & COMPRESSED:
            start = entry & offset_mask
            clusters = compressed.release(start, start + ((entry >> (63 - cluster_bits)) & (size - 1)))
        else:
            clusters = (entry,)
        for cluster in clusters:
            if freed and freed[-1][1] == cluster:
                freed[-1] = (freed[-1][0], cluster + size)
            else:
                freed.append((cluster, cluster + size))
    return freed
