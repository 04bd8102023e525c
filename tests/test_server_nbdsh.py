"""Error paths through libnbd (nbdsh's Python module) with its own checks off.

libnbd runs under Debian's /usr/bin/python3, so each check is a small script
run there; it prints JSON that the test asserts on.
"""

import json
import subprocess

import pytest

from helpers import run

pytestmark = pytest.mark.timeout(60)
SIZE = 16 * 1024 * 1024

PRELUDE = '''
import errno, json, nbd, sys
URI = sys.argv[1]
def conn(name, contexts=("base:allocation",)):
    h = nbd.NBD()
    h.set_strict_mode(0)  # send what a polite client never would
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.connect_uri(URI + name)
    return h
def fails(fn):
    """The errno name a command failed with, or "ok"."""
    try:
        fn()
        return "ok"
    except nbd.Error as exc:
        code = exc.errno
        return errno.errorcode.get(code, code) if isinstance(code, int) else str(code)
out = {}
'''


def nbdsh(server, script: str) -> dict:
    """Run a libnbd script against ``server``; returns its ``out`` dict."""
    code = PRELUDE + script + "\nprint(json.dumps(out))\n"
    result = run(["/usr/bin/python3", "-c", code, server.uri("")], timeout=45)
    return json.loads(result.stdout)


@pytest.fixture
def images(tmp_path):
    """A writable raw image with data at 1 MiB and a read-only copy."""
    paths = {}
    for name in ("rw", "ro"):
        path = tmp_path / f"{name}.raw"
        run(["qemu-img", "create", "-q", "-f", "raw", path, str(SIZE)])
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 1M", path])
        paths[name] = path
    return paths


def test_range_errors_and_bad_flags(images, qcownbd_server):
    server = qcownbd_server(f"rw={images['rw']}")
    out = nbdsh(server, '''
h = conn("rw")
size = h.get_size()
out["read_past_end"] = fails(lambda: h.pread(512, size - 511))
out["read_at_end"] = fails(lambda: h.pread(512, size))
out["write_past_end"] = fails(lambda: h.pwrite(b"x" * 512, size - 100))
out["zero_past_end"] = fails(lambda: h.zero(4096, size))
out["trim_past_end"] = fails(lambda: h.trim(4096, size))
out["cache_past_end"] = fails(lambda: h.cache(4096, size))
out["status_past_end"] = fails(lambda: h.block_status(4096, size, lambda *a: 0))
out["read_too_big"] = fails(lambda: h.pread(32 * 1024 * 1024 + 1, 0))
out["read_zero_length"] = fails(lambda: h.pread(0, 0))
out["unknown_flag"] = fails(lambda: h.pread(512, 0, flags=0x80))
out["fua_on_read"] = fails(lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_FUA))
out["after_errors"] = h.pread(4, 1024 * 1024).hex()
h.shutdown()
''')
    assert out.pop("after_errors") == "42424242", "errors must not end the connection"
    expected = {"read_past_end": "EINVAL", "read_at_end": "EINVAL", "write_past_end": "ENOSPC",
                "zero_past_end": "ENOSPC", "trim_past_end": "EINVAL", "cache_past_end": "EINVAL",
                "status_past_end": "EINVAL", "read_too_big": "EINVAL",
                "read_zero_length": "EINVAL", "unknown_flag": "EINVAL", "fua_on_read": "EINVAL"}
    assert out == expected


def test_read_only_export_refuses_writes_with_eperm(images, qcownbd_server):
    server = qcownbd_server("--read-only", f"ro={images['ro']}")
    out = nbdsh(server, '''
h = conn("ro")
out["write"] = fails(lambda: h.pwrite(b"x" * 4096, 0))
out["zero"] = fails(lambda: h.zero(4096, 0))
out["trim"] = fails(lambda: h.trim(4096, 0))
out["flush"] = fails(h.flush)
out["cache"] = fails(lambda: h.cache(4096, 0))
out["data"] = h.pread(2, 1024 * 1024).hex()
''')
    assert out == {"write": "EPERM", "zero": "EPERM", "trim": "EPERM", "flush": "ok",
                   "cache": "ok", "data": "4242"}


def test_block_status_without_context_is_einval(images, qcownbd_server):
    server = qcownbd_server(f"rw={images['rw']}")
    out = nbdsh(server, '''
h = conn("rw", contexts=())
out["status"] = fails(lambda: h.block_status(4096, 0, lambda *a: 0))
out["read"] = fails(lambda: h.pread(4096, 0))
''')
    assert out == {"status": "EINVAL", "read": "ok"}


def test_df_gives_one_chunk_and_sparse_reads_use_holes(images, qcownbd_server):
    server = qcownbd_server(f"rw={images['rw']}")
    out = nbdsh(server, '''
h = conn("rw")
def chunks(flags):
    seen = []
    def chunk(buf, offset, status, err):
        seen.append([offset, len(buf), status])
        return 0
    data = h.pread_structured(4 * 1024 * 1024, 0, chunk, flags=flags)
    return seen, data
split, data = chunks(0)
whole, data_df = chunks(nbd.CMD_FLAG_DF)
out["split"], out["whole"] = split, whole
out["same"] = data == data_df
out["expected"] = data == bytes(1 << 20) + b"\\x42" * (1 << 20) + bytes(2 << 20)
''')
    assert out["same"] and out["expected"]
    assert out["whole"] == [[0, 4 * 1024 * 1024, 1]]          # 1 = LIBNBD_READ_DATA
    kinds = [status for _offset, _length, status in out["split"]]
    assert 2 in kinds and 1 in kinds                          # 2 = LIBNBD_READ_HOLE
    assert sum(length for _o, length, _s in out["split"]) == 4 * 1024 * 1024


def test_fast_zero_refused_when_it_would_be_slow(tmp_path, qcownbd_server):
    base = tmp_path / "base.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", base, str(SIZE)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 2M", base])
    top = tmp_path / "top.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", base.name, "-F", "raw", top, str(SIZE)])
    server = qcownbd_server(f"top={top}")
    advertised = run(["nbdinfo", "--can", "fast-zero", server.uri("top")],
                     check=False).returncode == 0
    out = nbdsh(server, '''
h = conn("top")
out["fast"] = fails(lambda: h.zero(65536, 0, flags=nbd.CMD_FLAG_FAST_ZERO))
out["after_fast"] = h.pread(2, 0).hex()
out["slow"] = fails(lambda: h.zero(65536, 0))
out["after_slow"] = h.pread(2, 0).hex()
out["no_hole"] = fails(lambda: h.zero(4096, 1024 * 1024, flags=nbd.CMD_FLAG_NO_HOLE))
out["after_no_hole"] = h.pread(4096, 1024 * 1024) == bytes(4096)
''')
    # zeroing over backing data needs real writes in QCOW1: never "fast"
    assert not advertised
    assert out == {"fast": "ENOTSUP", "after_fast": "4242", "slow": "ok", "after_slow": "0000",
                   "no_hole": "ok", "after_no_hole": True}


def test_flush_fua_and_multi_conn_share_data(images, qcownbd_server):
    server = qcownbd_server(f"rw={images['rw']}")
    out = nbdsh(server, '''
a, b = conn("rw"), conn("rw")
a.pwrite(b"A" * 4096, 8192, flags=nbd.CMD_FLAG_FUA)
b.pwrite(b"B" * 4096, 12288)
a.flush()
out["b_sees_a"] = b.pread(4096, 8192) == b"A" * 4096
out["a_sees_b"] = a.pread(4096, 12288) == b"B" * 4096
out["multi_conn"] = a.can_multi_conn()
''')
    assert out == {"b_sees_a": True, "a_sees_b": True, "multi_conn": True}
    assert subprocess.run(["cmp", "-n", "4096", "-i", "8192:0", images["rw"], "-"],
                          input=b"A" * 4096, capture_output=True, timeout=10).returncode == 0
