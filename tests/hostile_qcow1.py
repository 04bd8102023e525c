"""The hostile and edge QCOW1 images of qcow1.md §12, as bytes (no tests here).

Crafted with the §14 header packer.  test_qcow1_hostile opens and reads each
one and checks the behaviour the table wants; test_fuzz_image adds them all
to its corpus.
"""

import random
import zlib

from helpers import be64, compressed_entry, hdr

MiB = 1 << 20
TEXT = (b"hostile images, friendly errors. " * 200)[:4096]


def deflate(data: bytes, wbits: int = -12) -> bytes:
    """Raw deflate the way QEMU writes compressed clusters."""
    comp = zlib.compressobj(6, zlib.DEFLATED, wbits, 9)
    return comp.compress(data) + comp.flush()


def layout(entries=None, payload=None, *, cb=12, l2b=9, l1=None, size=MiB, **fields):
    """header | L1 at 48 (default: L1[0] = table at one cluster) | L2 table | payload."""
    cs = 1 << cb
    l1 = [cs] if l1 is None else l1
    image = bytearray(hdr(size=size, cb=cb, l2b=l2b, **fields))
    parts = {48: be64(*l1)}
    if entries is not None:
        table = [0] * (1 << l2b)
        for pos, value in entries.items():
            table[pos] = value
        parts[cs] = be64(*table)
    parts.update(payload or {})
    for offset, data in parts.items():
        image[len(image):offset + len(data)] = bytes(max(0, offset + len(data) - len(image)))
        image[offset:offset + len(data)] = data
    return bytes(image)


def one_cluster(entry_value=None, data=TEXT):
    """A valid 4 KiB-cluster image with guest cluster 0 at host 8192 (or entry_value)."""
    return layout({0: 8192 if entry_value is None else entry_value}, {8192: data})


# (id, image bytes, want):  want = ("error", msg) | ("eio", guest) | ("reads", guest, bytes, rw_ok)
OPEN_ERRORS = [
    ("1-empty", b"", "too short"),
    ("1-20-bytes", hdr()[:20], "too short"),
    ("2-magic", layout(magic=0x514649FC), "bad magic"),
    ("3-version0", layout(version=0), "unsupported qcow version 0"),
    ("3-version2", layout(version=2), "qcow2 image: qcow2/qcow3 not supported"),
    ("3-version3", layout(version=3), "qcow3 image"),
    ("4-size0", layout(size=0), "too small"),
    ("4-size1", layout(size=1), "too small"),
    ("5-size2", layout(size=2), "too small"),
    ("5-size511", layout(size=511), "too small"),
    ("7-cb8", layout(cb=8), "cluster_bits 8"),
    ("7-cb17", layout(cb=17, l2b=9, l1=[0]), "cluster_bits 17"),
    ("7-cbFF", hdr(cb=0xFF) + bytes(8), "cluster_bits 255"),
    ("8-l2b5", layout(l2b=5), "l2_bits 5"),
    ("8-l2b14", hdr(l2b=14) + bytes(8), "l2_bits 14"),
    ("8-l2b1B", hdr(l2b=0x1B) + bytes(8), "l2_bits 27"),
    ("9-size-EE", hdr(size=0xEEEEEEEEEEEEEEEE) + bytes(8), "too large"),
    ("9-size-max", hdr(size=2**64 - 1) + bytes(8), "too large"),
    ("9-size-2^63-1", hdr(size=2**63 - 1) + bytes(8), "too large"),
    ("10-l1-past-int-max", hdr(size=2**28 * 2 * MiB) + bytes(8), "too large"),
    ("11-1GiB-L1-in-48-bytes", hdr(size=2**27 * 2 * MiB), "too large"),
    ("11-2GiB-L1", hdr(size=(2**28 - 1) * 2 * MiB), "too large"),
    ("11-L1-past-eof", hdr(size=2**20 * 2 * MiB), "not inside the file"),
    ("12-L1-partly-in-file", hdr(size=16 * MiB) + bytes(16), "not inside the file"),
    ("13-L1-at-1GiB", hdr(l1o=1 << 30) + bytes(8), "not inside the file"),
    ("14-L1-at-0", layout(l1o=0), "overlaps the header"),
    ("14-L1-at-8", layout(l1o=8), "overlaps the header"),
    ("15-L1-over-name", hdr(bfo=48, bfs=16, l1o=56) + b"base.raw" + bytes(16),
     "name overlaps the L1"),
    ("16-aes", layout(crypt=1), "AES-encrypted QCOW1 not supported; decrypt with qemu-img convert"),
    ("17-crypt2", layout(crypt=2), "invalid encryption method 2"),
    ("17-cryptFF", layout(crypt=0xFFFFFFFF), "invalid encryption method 4294967295"),
    ("19-name-1024", hdr(bfo=48, bfs=1024, l1o=2048) + bytes(2048), "name too long"),
    ("19-name-7FFFFFFF", hdr(bfo=48, bfs=0x7FFFFFFF, l1o=56) + bytes(16), "name too long"),
    ("19-name-FFFFFFFF", hdr(bfo=48, bfs=0xFFFFFFFF, l1o=56) + bytes(16), "name too long"),
    ("22-name-past-eof", hdr(bfo=4096, bfs=8, l1o=48) + bytes(8), "name (8 bytes at 4096) is not"),
    ("23-name-with-nul", hdr(bfo=48, bfs=13, l1o=64) + b"base.raw\0junk" + bytes(11), "NUL"),
]


def _stream(data, wbits=-12):
    return deflate(data, wbits)


ZSTREAM = _stream(TEXT)
LONG = random.Random(47).randbytes(5000)
BIG_CLUSTER = (LONG * 14)[:65536]
BIG_STREAM = _stream(BIG_CLUSTER, -15)
C = lambda off, n: compressed_entry(off, n, 12)  # noqa: E731

MAPPINGS = [
    # (id, image, guest offset, want): want = bytes (read OK) or "eio"; rw: "refused" or "ok"
    ("31-L1-unaligned", layout({0: 8192}, {8192: TEXT}, l1=[4100, 0], size=4 * MiB), 0, "eio", "refused"),
    ("32-L1-past-eof", layout(None, {8192: TEXT}, l1=[1 << 40]), 0, bytes(4096), "refused"),
    ("33-L1-bit63", layout({0: 8192}, {8192: TEXT}, l1=[(1 << 63) | 4096, 0],
                               size=4 * MiB), 0, "eio", "refused"),
    ("34-two-L1-same-L2", layout({0: 12288}, {12288: TEXT}, l1=[4096, 4096], size=4 * MiB),
     2 * MiB, "eio", "refused"),
    ("35-L2-8193", layout({0: 8193}, {8192: TEXT + TEXT}), 0, "eio", "refused"),
    ("36-L2-512-aligned", layout({0: 8704}, {8192: TEXT + TEXT}), 0, (TEXT + TEXT)[512:4608],
     "refused"),
    ("37-L2-past-eof", one_cluster(1 << 30), 0, "eio", "refused"),
    ("37-L2-bit62", one_cluster((1 << 62) | 8192), 0, "eio", "refused"),
    ("38-L2-into-L2-table", one_cluster(4096), 0, "eio", "refused"),
    ("39-two-L2-same-data", layout({0: 8192, 1: 8192}, {8192: TEXT}), 4096, TEXT, "refused"),
    ("41-csize0", one_cluster(C(8192, 0)), 0, "eio", "refused"),
    ("41-bare-flag", one_cluster(1 << 63), 0, "eio", "refused"),
    ("42-truncated", layout({0: C(8192, len(ZSTREAM) // 2)}, {8192: ZSTREAM}), 0, "eio", "ok"),
    ("43-trailing-garbage", layout({0: C(8192, len(ZSTREAM) + 30)}, {8192: ZSTREAM + b"\xa5" * 30}),
     0, TEXT, "ok"),
    ("44-inflates-short", layout({0: C(8192, len(_stream(TEXT[:3000])))},
                                 {8192: _stream(TEXT[:3000])}), 0, "eio", "ok"),
    ("45-inflates-long", layout({0: C(8192, len(_stream(TEXT * 2)))}, {8192: _stream(TEXT * 2)}),
     0, TEXT, "ok"),
    ("46-zlib-wrapped", layout({0: C(8192, len(zlib.compress(TEXT)))}, {8192: zlib.compress(TEXT)}),
     0, "eio", "ok"),
    ("47-64k-window15", layout({0: compressed_entry(131072, len(BIG_STREAM), 16)},
                               {131072: BIG_STREAM}, cb=16, l2b=6), 0, BIG_CLUSTER, "ok"),
    ("48-odd-offset", layout({0: C(8193, len(ZSTREAM))}, {8193: ZSTREAM}), 0, TEXT, "ok"),
    ("49-offset-past-eof", one_cluster(C(1 << 20, 40)), 0, "eio", "refused"),
    ("49-run-past-eof", layout({0: C(8192, len(ZSTREAM) + 100)}, {8192: ZSTREAM}), 0, "eio",
     "refused"),
    ("50-run-over-L2", layout({0: C(4096 + 8, 100)}, {8192: bytes(4096)}), 0, "eio", "refused"),
    ("56-cluster-past-eof", layout({0: 8192}, {8192: TEXT[:1000]}), 0,
     TEXT[:1000] + bytes(3096), "ok"),
]
