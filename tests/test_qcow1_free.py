"""The free-space bookkeeping of QCOW1 writes, against a plain set-of-clusters model."""

import random

from qcownbd.image.qcow1_free import (CompressedClusters, FreeClusters, cluster_pointers,
                                      released_runs, scatter)
from qcownbd.image.qcow1_header import COMPRESSED

C = 4096


def clusters_of(runs) -> set[int]:
    return {cluster for start, end in runs for cluster in range(start, end, C)}


def check_shape(free: FreeClusters, model: set[int]) -> None:
    runs = free.runs()
    assert clusters_of(runs) == model
    assert free.total == len(model) * C
    for (_s1, e1), (s2, _e2) in zip(runs, runs[1:]):
        assert e1 < s2, "runs must be sorted and merged (no touching neighbours)"


def test_free_clusters_match_a_set_model_through_random_adds_and_takes():
    rng = random.Random(7)
    free, model = FreeClusters(C), set()
    for _round in range(3000):
        action = rng.random()
        if action < 0.5:
            start = rng.randrange(200) * C
            end = start + rng.randrange(1, 12) * C
            free.add(start, end)
            model |= set(range(start, end, C))
        elif action < 0.95:
            wanted = rng.randrange(1, 10) * C
            pieces = free.take(wanted)
            taken = clusters_of((offset, offset + length) for offset, length in pieces)
            assert taken <= model and len(taken) * C == sum(length for _o, length in pieces)
            assert sum(length for _o, length in pieces) == min(wanted, len(model) * C)
            if any(all(start + k * C in model for k in range(wanted // C)) for start in model):
                assert len(pieces) == 1, "a run long enough must be used whole"
            model -= taken
        else:
            file_end = (max(model) + C) if model else 0
            new_end = free.take_tail(file_end)
            tail = set(range(new_end, file_end, C))
            assert tail <= model and (new_end == file_end or new_end - C not in model)
            model -= tail
        check_shape(free, model)


def test_take_prefers_one_contiguous_piece_then_the_lowest_pieces():
    free = FreeClusters(C)
    free.add(0, C)
    free.add(4 * C, 7 * C)
    assert free.take(2 * C) == [(4 * C, 2 * C)]
    assert free.take(3 * C) == [(0, C), (6 * C, C)]
    assert free.total == 0 and free.take(C) == []


def test_a_cluster_shared_by_compressed_runs_is_free_only_after_the_last():
    refs = CompressedClusters.from_runs(C, [(100, 900), (900, C + 50), (C + 50, C + 700)])
    assert refs.release(100, 900) == []                 # cluster 0 still holds the second run
    assert refs.release(900, C + 50) == [0]             # cluster 1 still holds the third
    assert refs.release(C + 50, C + 700) == [C]
    assert refs.release(5 * C, 5 * C + 10) == []        # never counted: stays used


def test_released_runs_merges_data_clusters_and_frees_whole_compressed_clusters():
    bits = 12
    refs = CompressedClusters.from_runs(C, [(8 * C + 16, 8 * C + 116)])
    compressed = COMPRESSED | (100 << (63 - bits)) | (8 * C + 16)
    entries = [0, 2 * C, 3 * C, 0, 5 * C, compressed]
    assert released_runs(entries, bits, refs) == [(2 * C, 4 * C), (5 * C, 6 * C), (8 * C, 9 * C)]


def test_scatter_cuts_cluster_buffers_into_pieces_without_copying():
    data = bytearray(range(256)) * 64             # 4 clusters of 4 KiB
    buffers = [memoryview(data)[:C], memoryview(data)[C:]]
    pieces = scatter([(10 * C, 2 * C), (40 * C, 2 * C)], buffers)
    assert [(offset, b"".join(bytes(part) for part in parts)) for offset, parts in pieces] == [
        (10 * C, bytes(data[:2 * C])), (40 * C, bytes(data[2 * C:]))]
    data[C] ^= 0xFF                               # views, not copies
    assert pieces[0][1][1][0] == data[C]
    assert list(cluster_pointers([(10 * C, 2 * C), (40 * C, C)], C)) == [10 * C, 11 * C, 40 * C]
