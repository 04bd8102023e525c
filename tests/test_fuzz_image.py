"""Image fuzzer: mutated QCOW1 headers, L1 and L2 tables through probe.open_image.

Seed images are made by qemu-img/qemu-io (plain, with a raw backing file,
compressed).  Mutants flip bytes and plant hostile u64 values (0, 1, bit 63,
bit 62, EOF, the header's or the L1's offset, another entry: aliasing) in
the header, L1 and L2 tables, truncate or extend the file; the §12 corpus of
hostile_qcow1 joins them.  A worker subprocess (image_fuzz_worker.py,
RLIMIT_AS capped, an alarm per image) opens each one read-only and
read-write, reads every allocated byte and, when the read-write open is
accepted, writes, reopens and reads back.  Proved: only ImageFormatError/ImageIOError ever escape
(with one-line messages), nothing hangs, the traced Python allocation per
image stays within a constant plus a few times the file size, and an image
that passed the read-write scan is still accepted, with our data, after we
wrote to it.
"""

import json
import os
import random
import resource
import shutil
import struct
import sys
from pathlib import Path

import pytest

from helpers import qcownbd_env, qemu_io, run
from hostile_qcow1 import MAPPINGS, OPEN_ERRORS

MiB = 1 << 20
HOSTILE_U64 = [0, 1, 512, 4096, 8193, 1 << 62, 1 << 63, (1 << 63) | 4096, (1 << 64) - 1,
               1 << 40, 48, 8]
WORKER = Path(__file__).with_name("image_fuzz_worker.py")


# ----------------------------------------------------------- seed images

def seed_images(work) -> dict[str, bytes]:
    """Valid images made by QEMU: plain, with backing, compressed."""
    plain = work / "plain.qcow"
    run(["qemu-img", "create", "-f", "qcow", plain, "6M"])
    qemu_io(plain, "write -P 0x11 0 70k", "write -P 0x22 2M 4k", "write -P 0x33 5M 100k")
    (work / "base.raw").write_bytes(random.Random(3).randbytes(3 * MiB))
    overlay = work / "overlay.qcow"
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", overlay, "4M"])
    qemu_io(overlay, "write -P 0x44 1000 5000", "write -P 0x55 3M 64k")
    src = work / "src.raw"
    src.write_bytes((b"compress me " * 50000)[:MiB] + random.Random(4).randbytes(MiB))
    packed = work / "packed.qcow"
    # qemu-img 7.2 exits 1 here yet leaves a complete image (qcow1.md §5): compare instead
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", src, packed], check=False)
    run(["qemu-img", "compare", "-f", "qcow", "-F", "raw", packed, src])
    return {p.stem: p.read_bytes() for p in (plain, overlay, packed)}


def tables(image: bytes) -> tuple[int, int, list[int], int]:
    """(L1 offset, L1 bytes, L2 table offsets, L2 table bytes) of a valid image."""
    size, cb, l2b = struct.unpack_from(">QBB", image, 24)
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    l1_bytes = 8 * -(-size // (1 << (cb + l2b)))
    l1 = struct.unpack_from(f">{l1_bytes // 8}Q", image, l1_offset)
    return l1_offset, l1_bytes, [e for e in l1 if e], 8 << l2b


def mutate(rnd, image: bytes) -> tuple[bytes, str]:
    """One mutant of a valid image and a description of what was done."""
    data = bytearray(image)
    l1_offset, l1_bytes, l2s, l2_bytes = tables(image)
    area, start, length = rnd.choice(
        [("header", 0, 48), ("L1", l1_offset, l1_bytes)]
        + [("L2", offset, l2_bytes) for offset in l2s] * 2)
    how = rnd.choice(["bytes", "u64", "u64", "truncate", "extend"])
    if how == "bytes":
        for _ in range(rnd.randint(1, 6)):
            data[start + rnd.randrange(length)] = rnd.randrange(256)
    elif how == "u64":
        pos = start + 8 * rnd.randrange(max(1, length // 8))
        if area == "header":
            pos = rnd.choice([8, 16, 24, 32, 36, 40]) - (4 if rnd.random() < 0.2 else 0)
        value = rnd.choice(HOSTILE_U64 + [len(image), len(image) - 4096, l1_offset]
                           + l2s + [rnd.randrange(1 << 64), rnd.randrange(len(image) + 1)])
        if area != "header":
            old = struct.unpack_from(">Q", data, pos)[0]
            value = rnd.choice([value, old + rnd.choice([-4096, -512, 1, 512, 4096]) & (2**64 - 1),
                                rnd.choice(l2s) if area == "L1" else value])
        struct.pack_into(">Q", data, pos, value)
    elif how == "truncate":
        del data[rnd.randrange(len(data)):]
    else:
        data += rnd.randbytes(rnd.randrange(1, 9000))
    return bytes(data), f"{how} in {area}"


def hostile_corpus() -> dict[str, bytes]:
    """The §12 images of hostile_qcow1 (open errors and hostile mappings)."""
    return {f"s12-{case[0]}": case[1] for case in OPEN_ERRORS + MAPPINGS}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_worker(directory, timeout: float, *per_image_seconds: int) -> list[dict]:
    """The worker in a subprocess with a 1 GiB address-space cap and a time bound."""
    count = len([n for n in os.listdir(directory) if n.endswith(".img")])
    proc = run([sys.executable, WORKER, directory, *map(str, per_image_seconds)],
               timeout=timeout, check=False, env=qcownbd_env(), preexec_fn=_limit_memory,
               cwd=directory)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(results) == count, \
        f"worker died ({proc.returncode}) after {len(results)} of {count}: {proc.stderr[-3000:]}"
    return results


def fuzz_images(tmp_path, mutants_per_seed: int, seed: int, timeout: float) -> None:
    """Write the corpus and the mutants, probe them all, report every BAD outcome."""
    work, corpus = tmp_path / "seeds", tmp_path / "corpus"
    work.mkdir()
    corpus.mkdir()
    seeds = seed_images(work)
    shutil.copy(work / "base.raw", corpus / "base.raw")
    described = {}
    rnd = random.Random(seed)
    for seed_name, image in seeds.items():
        (corpus / f"{seed_name}-valid.img").write_bytes(image)
        for number in range(mutants_per_seed):
            data, how = mutate(rnd, image)
            name = f"{seed_name}-{number:04d}.img"
            (corpus / name).write_bytes(data)
            described[name] = how
    for name, data in hostile_corpus().items():
        (corpus / f"{name}.img").write_bytes(data)
    results = run_worker(corpus, timeout)
    bad = [r | {"mutation": described.get(r["name"], "corpus")} for r in results
           if r["ro"].startswith("BAD") or r["rw"].startswith("BAD")]
    assert not bad, f"seed {seed}: {len(bad)} bad outcome(s):\n" + "\n".join(map(str, bad[:5]))
    for seed_name in seeds:
        valid = next(r for r in results if r["name"] == f"{seed_name}-valid.img")
        assert valid["ro"] == valid["rw"] == "ok", valid
    opened = sum(r["rw"] == "ok" for r in results)
    refused = sum(r["rw"].startswith("ImageFormatError") for r in results)
    assert opened > len(seeds) and refused > len(results) // 10, (opened, refused)


@pytest.mark.timeout(120)
def test_scan_of_garbage_tables_stays_within_file_size_memory(tmp_path):
    """1000 distinct L2 tables full of dangling entries (a 4 MiB file): the read-write
    open's metadata scan must not keep a message per bad entry (512,000 of them)."""
    tables_at, count = 16384, 1000
    image = bytearray(struct.pack(">IIQIIQBBHIQ", 0x514649FB, 1, 0, 0, 0, count * 2 * MiB,
                                  12, 9, 0, 0, 48))
    image += struct.pack(f">{count}Q", *[tables_at + 4096 * i for i in range(count)])
    image += bytes(tables_at - len(image))
    image += struct.pack(f">{512 * count}Q", *[(1 << 40) + 4096 * i for i in range(512 * count)])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "garbage-tables.img").write_bytes(image)
    # 512,000 bad entries, traced by tracemalloc: seconds of CPU, more on a loaded machine
    [result] = run_worker(corpus, 100, 60)
    assert not result["ro"].startswith("BAD") and not result["rw"].startswith("BAD"), result


@pytest.mark.timeout(120)
def test_image_fuzz(tmp_path):
    fuzz_images(tmp_path, mutants_per_seed=100, timeout=100,
                seed=int(os.environ.get("QCOWNBD_FUZZ_SEED", "7")))


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_image_fuzz_long(tmp_path):
    fuzz_images(tmp_path, mutants_per_seed=1500, timeout=1100,
                seed=int(os.environ.get("QCOWNBD_FUZZ_SEED", "8")))
