"""`qcownbd commit`: an overlay's writes go down into its backing file, crash-safe.

QEMU is the oracle throughout: qemu-io writes the overlay, `qemu-img
compare` says what the backing file and the chain read afterwards, and a
commit killed at random moments must leave the chain reading the same.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import time

import pytest

from helpers import (QcownbdServer, open_image, qcownbd_check, qcownbd_cmd, qcownbd_env,
                     qemu_compare, qemu_io, qemu_raw, read_all, run)
from qcownbd.image import backend
from qcownbd.image.commit import commit_overlay

MiB = 1 << 20


def overlay_over(tmp_path, base_format: str, size: int = 8 * MiB, writes: int = 40,
                 seed: int = 5):
    """A base image full of a pattern, a QEMU-made overlay of it with random writes;
    (overlay path, base path, what the chain reads)."""
    base = tmp_path / f"base.{base_format}"
    run(["qemu-img", "create", "-q", "-f", base_format, base, str(size)])
    qemu_io(base, f"write -P 0x11 0 {size}", fmt=base_format)
    overlay = tmp_path / "overlay.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", base.name, "-F", base_format,
         overlay])
    rnd = random.Random(seed)
    commands = []
    for n in range(writes):
        length = rnd.choice([512, 4096, 65536, 3 * 512])
        offset = rnd.randrange(0, size - length, 512)
        commands.append(f"write -P {0x20 + n % 200} {offset} {length}")
    qemu_io(overlay, *commands)
    expected = qemu_raw(overlay, tmp_path / "expected.raw")
    return overlay, base, expected


def commit(*args, **kwargs) -> subprocess.CompletedProcess:
    return run(qcownbd_cmd("commit", *map(str, args)), check=False, env=qcownbd_env(),
               **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("base_format", ["qcow", "raw"])
def test_commit_writes_the_overlay_down_and_empties_it(tmp_path, base_format):
    overlay, base, _expected = overlay_over(tmp_path, base_format)
    result = commit(*(["-F", "raw"] if base_format == "raw" else []), overlay)
    assert result.returncode == 0, result.stderr
    assert "Image committed" in result.stdout and result.stderr == ""
    # the backing file now reads what the chain read, and so does the chain
    assert qemu_compare(base, tmp_path / "expected.raw", fmt=base_format).returncode == 0
    assert qemu_compare(overlay, tmp_path / "expected.raw").returncode == 0
    extents = json.loads(run(["qemu-img", "map", "-f", "qcow", "--output=json", overlay]).stdout)
    assert not [e for e in extents if e["data"] and e["depth"] == 0], "the overlay maps nothing"
    assert overlay.stat().st_size < 4096, "the overlay's clusters are given back"
    if base_format == "qcow":
        qcownbd_check(base)
    qcownbd_check(overlay)
    # QEMU goes on writing both
    qemu_io(overlay, "write -P 0x77 0 64k", "read -P 0x77 0 64k")
    qemu_io(base, "write -P 0x78 1M 64k", "read -P 0x78 1M 64k", fmt=base_format)


@pytest.mark.timeout(120)
def test_commit_is_refused_while_someone_else_holds_the_backing_file(tmp_path):
    overlay, base, _expected = overlay_over(tmp_path, "qcow")
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    # a second overlay of the same base, served: the server reads the base
    other = tmp_path / "other.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", base.name, "-F", "qcow", other])
    server = QcownbdServer(f"other={other}")
    try:
        result = commit(overlay)
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # QEMU holding it for writing: refused as well
    qemu = subprocess.Popen(["qemu-nbd", "-f", "qcow", "-p", "0", "--persistent",
                             "-k", str(tmp_path / "q.sock"), str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "q.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = commit(overlay)
    finally:
        qemu.send_signal(signal.SIGTERM)
        qemu.wait(10)
    assert result.returncode == 1 and "in use" in result.stderr, result.stderr
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before, "nothing was written"
    # and once nobody holds it, the commit goes through
    assert commit(overlay).returncode == 0


@pytest.mark.timeout(120)
def test_commit_refuses_what_it_cannot_do_in_one_line(tmp_path):
    lone = tmp_path / "lone.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", lone, "1M"])
    result = commit(lone)
    assert result.returncode == 1 and "no backing file" in result.stderr
    # an overlay larger than its backing file, with data past the backing's end
    (tmp_path / "small.raw").write_bytes(bytes(MiB))
    big = tmp_path / "big.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "small.raw", "-F", "raw", big, "2M"])
    qemu_io(big, "write -P 0x42 1536k 4k")
    before = big.read_bytes()
    result = commit("-F", "raw", big)
    assert result.returncode == 1 and "past the end" in result.stderr, result.stderr
    assert big.read_bytes() == before and (tmp_path / "small.raw").read_bytes() == bytes(MiB)
    for output in (result.stderr for result in [commit(tmp_path / "missing.qcow")]):
        assert output.count("\n") == 1 and "Traceback" not in output


@pytest.mark.timeout(300)
def test_a_commit_killed_at_any_moment_leaves_the_chain_reading_the_same(tmp_path):
    overlay, base, expected = overlay_over(tmp_path, "qcow", size=32 * MiB, writes=1500)
    rnd = random.Random(3)
    killed = 0
    for _round in range(6):
        proc = subprocess.Popen(qcownbd_cmd("commit", overlay), env=qcownbd_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rnd.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        status = proc.wait(30)
        proc.stderr.close()
        killed += status == -signal.SIGKILL
        # whatever the moment: the chain reads what it read, and both files are sound
        assert qemu_compare(overlay, tmp_path / "expected.raw").returncode == 0
        qcownbd_check(base)
        qcownbd_check(overlay)
        if status == 0:
            break
    assert killed, "no commit was killed half-way: make the overlay bigger"
    assert commit(overlay).returncode == 0    # running it again finishes the job
    assert qemu_compare(base, tmp_path / "expected.raw").returncode == 0
    assert qemu_compare(overlay, tmp_path / "expected.raw").returncode == 0
    assert len(expected) == 32 * MiB


class TwoFileLog:
    """Records the writes, syncs, punches and truncations of every file, in order,
    by path (the commit opens both files itself)."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real = {name: getattr(os, name) for name in ("pwritev", "pwrite", "fdatasync",
                                                      "ftruncate")}
        real_punch = backend.punch_hole

        def path(fd):
            return os.readlink(f"/proc/self/fd/{fd}")

        def pwritev(fd, buffers, offset, *rest):
            self.events.append((path(fd), "write", offset, b"".join(map(bytes, buffers))))
            return real["pwritev"](fd, buffers, offset, *rest)

        def pwrite(fd, data, offset):
            self.events.append((path(fd), "write", offset, bytes(data)))
            return real["pwrite"](fd, data, offset)

        def fdatasync(fd):
            real["fdatasync"](fd)
            self.events.append((path(fd), "sync"))

        def ftruncate(fd, length):
            self.events.append((path(fd), "truncate", length))
            return real["ftruncate"](fd, length)

        def punch_hole(fd, offset, length):
            self.events.append((path(fd), "write", offset, bytes(length)))
            return real_punch(fd, offset, length)

        for name, fake in (("pwritev", pwritev), ("pwrite", pwrite), ("fdatasync", fdatasync),
                           ("fsync", fdatasync), ("ftruncate", ftruncate)):
            monkeypatch.setattr(os, name, fake)
        monkeypatch.setattr(backend, "punch_hole", punch_hole)


def _change(file: bytearray, event, rnd=None) -> None:
    """Apply a write or truncation; with ``rnd``, only a random part of it (unsynced)."""
    if event[1] == "truncate":
        if rnd is None or rnd.random() < 0.5:
            del file[event[2]:]
        return
    offset, data = event[2], event[3]
    for pos in range(0, len(data), 512):
        if rnd is None or rnd.random() < 0.5:
            end = offset + pos + len(data[pos:pos + 512])
            if len(file) < end:
                file.extend(bytes(end - len(file)))
            file[offset + pos:end] = data[pos:pos + 512]


def crash_states(initial: dict, events, rnd, subsets: int = 8):
    """Both files as a power loss could leave them just before each sync: what each
    file synced, plus random 512-byte pieces of its unsynced changes."""
    durable = {path: bytearray(data) for path, data in initial.items()}
    unsynced = {path: [] for path in initial}
    for event in events + [(path, "sync") for path in initial]:
        path = event[0]
        if event[1] != "sync":
            unsynced[path].append(event)
            continue
        for _ in range(subsets):
            states = {}
            for name, data in durable.items():
                states[name] = bytearray(data)
                for change in unsynced[name]:
                    _change(states[name], change, rnd)
            yield states
        for change in unsynced[path]:
            _change(durable[path], change)
        unsynced[path] = []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("base_format", ["qcow", "raw"])
def test_power_loss_during_a_commit_never_changes_what_the_chain_reads(
        tmp_path, monkeypatch, base_format):
    overlay, base, expected = overlay_over(tmp_path, base_format, size=2 * MiB, writes=30)
    paths = {os.path.realpath(overlay): overlay, os.path.realpath(base): base}
    initial = {path: open(path, "rb").read() for path in paths}
    log = TwoFileLog(monkeypatch)
    commit_overlay(overlay, backing_format=base_format)
    monkeypatch.undo()
    events = [event for event in log.events if event[0] in paths]
    assert any(e[1] == "write" and e[0] == os.path.realpath(base) for e in events)
    assert any(e[1] == "truncate" and e[0] == os.path.realpath(overlay) for e in events)
    states = 0
    for state in crash_states(initial, events, random.Random(7)):
        states += 1
        for path, data in state.items():
            paths[path].write_bytes(data)
        chain = open_image(overlay)
        try:
            assert read_all(chain) == expected, "the chain reads something else"
        finally:
            chain.close()
        for image_path, fmt in ((overlay, "qcow"), (base, base_format)):
            if fmt == "qcow":   # the read-write open scans all metadata, refusing corruption
                image = open_image(image_path, read_only=False)
                try:
                    assert image.check().corruptions == []
                finally:
                    image.close()
    assert states > 6
