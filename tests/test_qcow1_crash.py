"""Crash safety of QCOW1 writes, and of freeing and reusing clusters (qcow1.md §5.3).

Every pwrite/pwritev/fdatasync on the image fd is recorded, and the punches
(holes: zeros) and truncations that give freed clusters back.  The ordering
test replays the log on a simulated file and checks that each pointer write
(into the L1 table or into an L2 table the on-disk L1 already reaches) only
points at bytes written before an earlier fdatasync.  The power-loss test
rebuilds the file as it could be after a crash at every sync point (all
synced writes, plus random 512-byte pieces of the unsynced ones) and checks
that it opens read-write, passes check(), and holds every write acknowledged
before the last completed flush.
"""

import os
import random
import struct

import pytest

from helpers import make_qcow1, open_image, read_all
from qcownbd.image import backend

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


class IoLog:
    """Records the writes and syncs of one fd while letting them happen."""

    def __init__(self, monkeypatch, fd: int):
        self.fd, self.events = fd, []
        real_pwritev, real_pwrite, real_sync = os.pwritev, os.pwrite, os.fdatasync

        def pwritev(fd, buffers, offset, *rest):
            if fd == self.fd:
                self.events.append(("write", offset, b"".join(bytes(b) for b in buffers)))
            return real_pwritev(fd, buffers, offset, *rest)

        def pwrite(fd, data, offset):
            if fd == self.fd:
                self.events.append(("write", offset, bytes(data)))
            return real_pwrite(fd, data, offset)

        def fdatasync(fd):
            real_sync(fd)
            if fd == self.fd:
                self.events.append(("sync",))

        real_punch, real_truncate = backend.punch_hole, os.ftruncate

        def punch_hole(fd, offset, length):
            if fd == self.fd:
                self.events.append(("punch", offset, bytes(length)))
            return real_punch(fd, offset, length)

        def ftruncate(fd, length):
            if fd == self.fd:
                self.events.append(("truncate", length))
            return real_truncate(fd, length)

        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fdatasync)
        monkeypatch.setattr(backend, "punch_hole", punch_hole)
        monkeypatch.setattr(os, "ftruncate", ftruncate)

    def mark(self, label, payload=None):
        self.events.append(("mark", label, payload))


def _workload(image, log, ref: bytearray, seed: int, ops: int):
    """Random writes, and (without a backing file) trims and zero writes that free clusters
    the writes after them reuse, with flushes; log marks "flushed" with a snapshot of the
    reference."""
    rnd = random.Random(seed)
    cluster = image.cluster_size
    for _ in range(ops):
        if rnd.random() < 0.15:
            image.flush()
            log.mark("flushed", bytes(ref))
            continue
        offset = rnd.choice([rnd.randrange(image.size),
                             rnd.randrange(image.size // cluster) * cluster])
        length = min(rnd.choice([1, 700, cluster, 3 * cluster + 5, 20000]), image.size - offset)
        if image.backing is None and rnd.random() < 0.3:
            if rnd.random() < 0.5:
                image.trim(offset, length)      # whole clusters read zeros after it
                start, end = -(-offset // cluster) * cluster, (offset + length) // cluster * cluster
                offset, length = start, max(0, end - start)
            else:
                image.write_zeroes(offset, length)
            data = bytes(length)
        else:
            data = rnd.randbytes(length)
            image.write(offset, data)
        ref[offset:offset + length] = data
        log.mark("wrote", (offset, data))


def _record(tmp_path, monkeypatch, backing: bool, seed: int, ops: int):
    # 4 MiB over a 3 MiB random base, or 5 MiB without one
    img, ref = make_qcow1(tmp_path, backing, 4 * MiB if backing else 5 * MiB, seed)
    initial = open(img, "rb").read()
    image = open_image(img, read_only=False)
    log = IoLog(monkeypatch, image.fd)
    log.mark("flushed", bytes(ref))
    try:
        _workload(image, log, ref, seed, ops)
        image.flush()
        log.mark("flushed", bytes(ref))
    finally:
        image.close()
        monkeypatch.undo()
    return img, initial, log.events, image.header


def _apply(file: bytearray, offset: int, data: bytes) -> None:
    if len(file) < offset:
        file.extend(bytes(offset - len(file)))
    file[offset:offset + len(data)] = data


def _apply_event(file: bytearray, event) -> None:
    """Apply a recorded write, punch (it reads zeros after) or truncation."""
    if event[0] == "truncate":
        del file[event[1]:]
    else:
        _apply(file, event[1], event[2])


def _u64s(data: bytes, first_offset: int):
    """(file offset, value) of the whole 8-byte words inside a write."""
    skip = -first_offset % 8
    for pos in range(skip, len(data) - 7, 8):
        yield first_offset + pos, struct.unpack_from(">Q", data, pos)[0]


@pytest.mark.parametrize("backing", [False, True])
def test_no_pointer_before_the_barrier_after_its_data(tmp_path, monkeypatch, backing):
    img, initial, events, hdr = _record(tmp_path, monkeypatch, backing, seed=3, ops=80)
    final = open(img, "rb").read()
    l1_start, l1_end = hdr.l1_table_offset, hdr.l1_table_offset + hdr.l1_bytes
    all_tables = {value for _o, value in _u64s(final[l1_start:l1_end], l1_start) if value}
    file = bytearray(initial)
    written_before_sync = []  # write extents made durable by some earlier sync
    pending = []              # data writes since the last sync
    pointer_writes = 0
    for event in events:
        if event[0] == "sync":
            written_before_sync += pending
            pending = []
            continue
        if event[0] in ("truncate", "punch"):
            _apply_event(file, event)
            continue
        if event[0] != "write":
            continue
        _kind, offset, data = event
        if offset > len(file):
            # a write past the end leaves zeros before it (a new table's untouched
            # entries): they are the file's once synced, like data
            pending.append((len(file), bytes(offset - len(file)), "data"))
        linked = {value for _o, value in _u64s(file[l1_start:l1_end], l1_start) if value}
        table = next((t for t in all_tables if t <= offset < t + hdr.l2_table_bytes), None)
        if l1_start <= offset < l1_end or table in linked:
            pointer_writes += 1
            assert not [w for w in pending if w[2] == "data"], \
                "pointer written with unsynced data before it (no barrier)"
            for _where, value in _u64s(data, offset):
                if value:
                    assert any(o <= value < o + len(d) for o, d, _k in written_before_sync), \
                        f"pointer {value:#x} at {offset:#x} targets bytes not yet durable"
        else:  # data, or a table nothing on disk reaches yet (§5.3 allows its entries early)
            pending.append((offset, data, "data" if table is None else "table"))
        _apply(file, offset, data)
    assert pointer_writes > 0
    last_write = max(i for i, event in enumerate(events) if event[0] == "write")
    assert ("sync",) in events[last_write:], "the final flush left writes unsynced"
    assert file == bytearray(final)


def _crash_states(initial: bytes, events, rnd, subsets: int):
    """Yield (file bytes, reference at the last completed flush, later writes) per crash."""
    durable = bytearray(initial)
    unsynced, flushed_ref, since_flush = [], None, []
    for event in events + [("sync",)]:
        if event[0] in ("write", "punch", "truncate"):
            unsynced.append(event)
            continue
        if event[0] == "mark":
            if event[1] == "flushed":
                flushed_ref, since_flush = event[2], []
            else:
                since_flush.append(event[2])
            continue
        # a crash between the previous sync and this one: any sector subset of unsynced writes
        for _ in range(subsets):
            state = bytearray(durable)
            for change in unsynced:
                if change[0] == "truncate":
                    if rnd.random() < 0.5:
                        _apply_event(state, change)
                    continue
                _kind, offset, data = change
                for pos in range(0, len(data), 512):
                    if rnd.random() < 0.5:
                        _apply(state, offset + pos, data[pos:pos + 512])
            yield bytes(state), flushed_ref, list(since_flush)
        for change in unsynced:
            _apply_event(durable, change)
        unsynced = []


def punched_before(events, index):
    """The (start, end) ranges punched before event ``index``."""
    return [(e[1], e[1] + len(e[2])) for e in events[:index] if e[0] == "punch"]


def _assert_holds_flushed_data(got: bytes, flushed_ref: bytes, later_writes):
    """Bytes untouched since the last flush equal it; touched ones are some written value."""
    allowed = {}
    for offset, data in later_writes:
        for i, byte in enumerate(data):
            allowed.setdefault(offset + i, {flushed_ref[offset + i]}).add(byte)
    untouched = bytearray(got)
    expected = bytearray(flushed_ref)
    for pos, values in allowed.items():
        assert got[pos] in values, pos
        untouched[pos] = expected[pos] = 0
    assert untouched == expected


@pytest.mark.parametrize("backing", [False, True])
def test_power_loss_at_every_sync_point(tmp_path, monkeypatch, backing):
    img, initial, events, _hdr = _record(tmp_path, monkeypatch, backing, seed=9, ops=60)
    if not backing:     # the workload did free clusters and write into them again
        punched = [(e[1], e[1] + len(e[2])) for e in events if e[0] == "punch"]
        reused = [e for i, e in enumerate(events) if e[0] == "write" and any(
            start <= e[1] < end for start, end in punched_before(events, i))]
        assert punched and reused
    rnd = random.Random(99)
    states = 0
    for state, flushed_ref, later in _crash_states(initial, events, rnd, subsets=3):
        states += 1
        with open(img, "wb") as f:
            f.write(state)
        image = open_image(img, read_only=False)  # the full scan refuses any corruption
        try:
            assert image.check().corruptions == []
            _assert_holds_flushed_data(read_all(image), flushed_ref, later)
        finally:
            image.close()
    assert states > 20


def _host_of(image, offset: int) -> int:
    """Where in the file guest ``offset``'s cluster lies."""
    [(_start, _length, kind, host, _depth)] = list(image.map_extents(offset, 1))
    assert kind == "data"
    return host


def test_a_freed_cluster_is_reused_only_after_the_commit_that_freed_it(tmp_path, monkeypatch):
    """Trim guest cluster A, then write B before any flush: B must not get A's cluster
    (a crash would leave A's durable pointer and B's data at the same bytes). After the
    flush that wrote A's freeing, the next allocation takes it; every crash state of
    the sequence opens clean and holds the flushed data."""
    img, ref = make_qcow1(tmp_path, False, MiB)
    initial = open(img, "rb").read()
    image = open_image(img, read_only=False)
    cluster = image.cluster_size
    log = IoLog(monkeypatch, image.fd)
    log.mark("flushed", bytes(ref))
    try:
        steps = [("write", 0, b"A" * cluster), ("flush",), ("trim", 0, cluster),
                 ("write", 8 * cluster, b"B" * cluster), ("flush",),
                 ("write", 16 * cluster, b"C" * cluster), ("flush",)]
        hosts = {}
        for step in steps:
            if step[0] == "flush":
                image.flush()
                log.mark("flushed", bytes(ref))
                continue
            offset, data = step[1], step[2]
            if step[0] == "trim":
                hosts["A"] = _host_of(image, offset)
                image.trim(offset, data)
                data = bytes(data)
            else:
                image.write(offset, data)
                hosts[chr(data[0])] = _host_of(image, offset)
            ref[offset:offset + len(data)] = data
            log.mark("wrote", (offset, data))
    finally:
        image.close()
        monkeypatch.undo()
    assert hosts["B"] != hosts["A"], "reused before the freeing was durable"
    assert hosts["C"] == hosts["A"], "not reused after the freeing was durable"
    for state, flushed_ref, later in _crash_states(initial, log.events, random.Random(5), 8):
        with open(img, "wb") as f:
            f.write(state)
        reopened = open_image(img, read_only=False)
        try:
            assert reopened.check().corruptions == []
            _assert_holds_flushed_data(read_all(reopened), flushed_ref, later)
        finally:
            reopened.close()
