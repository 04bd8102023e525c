"""Helpers shared by the QCOW1 tests (no tests here).

`open_qcow1` builds a Qcow1Image straight from an fd with a minimal backing
opener (names resolved against the overlay's directory, QCOW1 recognised by
magic, everything else raw, always read-only), so these tests depend on the
QCOW1 backend alone.  `hdr` is the header packer of qcow1.md §14.
"""

import os
import struct
import subprocess

from qcownbd.image.qcow1 import Qcow1Image, is_qcow1
from qcownbd.image.raw import RawImage


def hdr(magic=0x514649FB, version=1, bfo=0, bfs=0, mtime=0, size=1 << 20,
        cb=12, l2b=9, pad=0, crypt=0, l1o=48) -> bytes:
    """A 48-byte QCOW1 header with the given fields (qcow1.md §14)."""
    return struct.pack(">IIQIIQBBHIQ", magic, version, bfo, bfs, mtime,
                       size, cb, l2b, pad, crypt, l1o)


def be64(*values) -> bytes:
    """Big-endian u64s."""
    return struct.pack(">%dQ" % len(values), *values)


def compressed_entry(offset: int, csize: int, cluster_bits: int) -> int:
    """An L2 entry for a compressed run."""
    return (1 << 63) | (csize << (63 - cluster_bits)) | offset


def backing_opener_for(overlay_path):
    """A backing_opener resolving names like QEMU (relative to the overlay's dir)."""
    def opener(name: bytes):
        path = os.path.join(os.path.dirname(os.fspath(overlay_path)), os.fsdecode(name))
        return open_image(path, read_only=True)
    return opener


def open_image(path, *, read_only=True, l2_cache_tables=None, **kwargs):
    """Open a QCOW1 (by magic) or raw file as a Backend."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        if is_qcow1(os.pread(fd, 48, 0)):
            return Qcow1Image(fd, path, read_only=read_only,
                              backing_opener=backing_opener_for(path),
                              l2_cache_tables=l2_cache_tables, **kwargs)
        return RawImage(fd, path, read_only=read_only)
    except BaseException:
        os.close(fd)
        raise


def read_all(image) -> bytes:
    """The whole disk of an open Backend."""
    buf = bytearray(image.size)
    image.read_into(0, memoryview(buf))
    return bytes(buf)


def run(cmd, timeout=60, check=True):
    """Run a tool; returns the CompletedProcess (text mode)."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stderr}")
    return result


def qemu_raw(image_path, out_path) -> bytes:
    """What QEMU reads from a QCOW1 image: `qemu-img convert -O raw`."""
    run(["qemu-img", "convert", "-f", "qcow", "-O", "raw", image_path, out_path])
    with open(out_path, "rb") as f:
        return f.read()


def qemu_compare(image_path, raw_path) -> subprocess.CompletedProcess:
    """`qemu-img compare -f qcow IMAGE -F raw REF` (exit 0 = identical)."""
    return run(["qemu-img", "compare", "-f", "qcow", image_path, "-F", "raw", raw_path],
               check=False)
