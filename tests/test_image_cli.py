"""qcownbd create/info/map/check/convert, with qemu-img as the oracle."""

import json
import os
import struct
import subprocess

import pytest

from helpers import on_terminal, qcownbd_cmd, qcownbd_env, qemu_img, qemu_io, run

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20


def qcownbd(*args, cwd=None, ok=True):
    res = run(qcownbd_cmd(*args), timeout=60, check=False, env=qcownbd_env(), cwd=cwd)
    assert "Traceback" not in res.stderr, res.stderr
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def mixed_raw(path, size=4 * MiB):
    """Text, random, repeated and zero regions, with holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"qcownbd mixed content line\n" * 3000)
        f.seek(MiB + 4096)
        f.write(os.urandom(70000))
        f.seek(3 * MiB - 512)
        f.write(b"\xee" * 4096)
        f.seek(2 * MiB)
        f.write(bytes(65536))          # written zeros: allocated in the file, still zero
    return path


@pytest.fixture
def chain(tmp_path):
    """base.raw <- mid.qcow <- top.qcow (relative names, sizes differ), made by QEMU."""
    mixed_raw(tmp_path / "base.raw")
    qemu_img("create", "-f", "qcow", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow", "4M")
    qemu_io(tmp_path / "mid.qcow", "write -P 3 512k 8k", "write -P 4 3584k 4k")
    qemu_img("create", "-f", "qcow", "-b", "mid.qcow", "-F", "qcow", tmp_path / "top.qcow", "6M")
    qemu_io(tmp_path / "top.qcow", "write -P 5 32k 4k", "write -z 2M 4k", "write -P 6 5M 1000")
    return tmp_path


@pytest.fixture
def compressed(tmp_path):
    src = mixed_raw(tmp_path / "src.raw")
    # QEMU 7.2 exits 1 here yet writes a complete image (qcow1.md §5): check it instead
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow", src, tmp_path / "c.qcow"],
                   capture_output=True, timeout=60)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow", src, tmp_path / "c.qcow"], timeout=60)
    return tmp_path / "c.qcow"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory nobody, root included, can create files in (ext4 immutable flag)."""
    path = tmp_path / "locked"
    path.mkdir()
    if subprocess.run(["chattr", "+i", path], capture_output=True, timeout=20).returncode:
        pytest.skip("chattr +i not possible here")
    yield path
    subprocess.run(["chattr", "-i", path], check=True, timeout=20)


# -- create ----------------------------------------------------------------------

@pytest.mark.parametrize("size", ["512", "1000", "2M", "2097664", "64M", "10000000",
                                  "1.5G", "1T", "3k"])
def test_create_byte_identical(tmp_path, size):
    qemu_img("create", "-f", "qcow", tmp_path / "q.qcow", size)
    qcownbd("create", tmp_path / "o.qcow", size)
    run(["cmp", tmp_path / "q.qcow", tmp_path / "o.qcow"], timeout=30)


def test_create_with_backing_byte_identical(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    mixed_raw(tmp_path / "sub" / "base.raw", size=3 * MiB + 512)
    monkeypatch.chdir(tmp_path)       # names are resolved against the image's directory
    cases = [(["-b", "base.raw", "-F", "raw"], []),
             (["-b", "base.raw", "-F", "raw"], ["64M"]),
             (["-b", str(tmp_path / "sub" / "base.raw"), "-F", "raw"], []),
             (["-b", "q1.qcow", "-F", "qcow"], [])]
    for n, (opts, size) in enumerate(cases):
        qemu_img("create", "-f", "qcow", *opts, f"sub/q{n}.qcow", *size)
        ours = ["qcow1" if o == "qcow" else o for o in opts]
        qcownbd("create", *ours, f"sub/o{n}.qcow", *size)
        run(["cmp", f"sub/q{n}.qcow", f"sub/o{n}.qcow"], timeout=30)
    # without -F the backing's format is probed (QCOW1 or raw)
    qcownbd("create", "-b", "q1.qcow", "sub/probed.qcow")
    run(["cmp", "sub/q3.qcow", "sub/probed.qcow"], timeout=30)


def test_create_errors_are_one_line(tmp_path, unwritable_dir):
    (tmp_path / "exists.qcow").write_bytes(b"keep")
    bad = [(["0"], "must be positive"), (["-5"], "invalid size"), (["12Q"], "invalid size"),
           (["1.5"], "fractional"), (["100E"], "too large"), (["9E"], "too large")]
    for size, message in bad:
        res = qcownbd("create", tmp_path / "new.qcow", *size, ok=False)
        assert res.returncode != 0 and message in res.stderr
    for args, message in ((["exists.qcow", "1M"], "already exists"),
                          (["new.qcow"], "SIZE is required"),
                          (["-b", "gone.raw", "new.qcow"], "no such file"),
                          (["-b", "nbd:localhost:10809", "new.qcow"], "protocol"),
                          (["-F", "qcow2", "-b", "x", "new.qcow"], "invalid choice"),
                          (["nodir/new.qcow", "1M"], "No such file"),
                          ([unwritable_dir / "new.qcow", "1M"], "cannot create")):
        res = qcownbd("create", *args, cwd=tmp_path, ok=False)
        assert res.returncode != 0 and message in res.stderr, (args, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
    assert (tmp_path / "exists.qcow").read_bytes() == b"keep"
    assert not (tmp_path / "new.qcow").exists()


# -- info and map -----------------------------------------------------------------

def qemu_map(path):
    return run(["qemu-img", "map", "--output=json", path], timeout=60).stdout


def test_map_json_identical_to_qemu(chain, compressed):
    for path in (chain / "top.qcow", chain / "mid.qcow", chain / "base.raw", compressed):
        assert qcownbd("map", "--json", path).stdout == qemu_map(path)


def test_map_human_matches_qemu(chain):
    ours = qcownbd("map", chain / "top.qcow").stdout.splitlines()
    theirs = qemu_img("map", chain / "top.qcow").stdout.splitlines()
    assert len(ours) == len(theirs) > 3
    for mine, qemus in zip(ours[1:], theirs[1:]):
        assert mine.split()[:3] == qemus.split()[:3]
        assert os.path.basename(mine.split()[3]) == os.path.basename(qemus.split()[3])


def allocated_by_qemu(path, depth):
    return sum(e["length"] for e in json.loads(qemu_map(path))
               if e["data"] and e["depth"] == depth)


def test_info_matches_qemu(chain, compressed):
    top = chain / "top.qcow"
    ours = json.loads(qcownbd("info", "--json", top).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", "--backing-chain", top).stdout)
    levels = [ours] + ours["backing-chain"]
    assert len(levels) == len(theirs) == 3
    for mine, qemus in zip(levels, theirs):
        assert os.path.samefile(mine["filename"], chain / qemus["filename"])
        assert mine["format"] == {"qcow": "qcow1"}.get(qemus["format"], qemus["format"])
        for key in ("virtual-size", "actual-size", "cluster-size", "backing-filename"):
            assert mine.get(key) == qemus.get(key), key
    for depth, level in enumerate(levels[:2]):
        assert level["allocated-bytes"] == allocated_by_qemu(top, depth)
    c_info = json.loads(qcownbd("info", "--json", compressed).stdout)
    q_info = json.loads(qemu_img("info", "--output=json", compressed).stdout)
    assert c_info["virtual-size"] == q_info["virtual-size"] == 4 * MiB
    assert c_info["allocated-bytes"] == allocated_by_qemu(compressed, 0)
    text = qcownbd("info", top).stdout.splitlines()
    qemu_text = qemu_img("info", top).stdout.splitlines()
    for prefix in ("virtual size:", "disk size:", "cluster_size:", "backing file:"):
        assert [line for line in text if line.startswith(prefix)] == \
            [line for line in qemu_text if line.startswith(prefix)], prefix
    assert "file format: qcow1" in text


def test_info_and_map_errors(tmp_path, chain):
    for cmd in ("info", "map", "check"):
        for target, message in ((tmp_path / "missing", "no such file"), (tmp_path, "a directory")):
            res = qcownbd(cmd, target, ok=False)
            assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1
    os.unlink(chain / "base.raw")
    res = qcownbd("info", chain / "top.qcow", ok=False)
    assert res.returncode == 1 and "base.raw: no such file" in res.stderr


# -- check -------------------------------------------------------------------------

def test_check_clean_images(chain, compressed):
    for path in (chain / "top.qcow", chain / "mid.qcow", compressed):
        res = qcownbd("check", path, ok=False)
        assert res.returncode == 0, (path, res.stdout)
        assert "No errors" in res.stdout
    res = qcownbd("check", chain / "base.raw", ok=False)
    assert res.returncode == 63 and "no metadata" in res.stderr


def test_check_leaks(compressed):
    # QEMU moves rewritten compressed clusters and leaks the old runs (§12 #52); 20
    # runs packed 512 bytes apart leave whole clusters unused
    qemu_io(compressed, "write -P 9 0 80k")
    res = qcownbd("check", compressed, ok=False)
    assert res.returncode == 3 and "leaked" in res.stdout


def test_check_repair_gives_leaked_clusters_back(tmp_path):
    """A cluster QEMU wrote whose pointer is gone (a leak with data in it): `check`
    counts it (exit 3), `check --repair` punches it out of the file, and nothing
    referenced changes."""
    img = tmp_path / "leaky.qcow"
    qemu_img("create", "-f", "qcow", img, "4M")
    qemu_io(img, "write -P 5 0 4k", "write -P 6 8k 4k")
    with open(img, "r+b") as f:                 # drop L2[0]: guest 0's cluster leaks
        f.seek(40)
        l1_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_offset)
        f.write(bytes(8))
    res = qcownbd("check", img, ok=False)
    assert res.returncode == 3 and "4096 leaked bytes" in res.stdout
    blocks = os.stat(img).st_blocks
    res = qcownbd("check", "--repair", img, ok=False)
    assert res.returncode == 0, res.stdout
    assert "gave 4096 leaked bytes back" in res.stdout
    assert os.stat(img).st_blocks < blocks
    qemu_io(img, "read -P 0 0 4k", "read -P 6 8k 4k", "write -P 7 0 8k")
    assert qcownbd("check", img, ok=False).returncode == 0


def test_check_corruption_and_repair(tmp_path):
    img = tmp_path / "alias.qcow"
    qemu_img("create", "-f", "qcow", img, "4M")
    qemu_io(img, "write -P 7 0 4k")
    with open(img, "r+b") as f:                 # L1[1] = L1[0]: two ranges share a table
        f.seek(48)
        l1_0 = f.read(8)
        f.write(l1_0)
    res = qcownbd("check", img, ok=False)
    assert res.returncode == 2 and "ERROR" in res.stdout and "errors were found" in res.stdout
    opened = qcownbd("info", img)               # read-only use still works
    assert "qcow1" in opened.stdout
    res = qcownbd("check", "--repair", img, ok=False)
    assert res.returncode in (0, 3), res.stdout
    assert "Repaired" in res.stdout and "L1[1]" in res.stdout
    assert qcownbd("check", img, ok=False).returncode in (0, 3)
    assert struct.unpack(">Q", img.read_bytes()[56:64])[0] == 0
    qemu_io(img, "read -P 7 0 4k", "read -P 0 2M 4k", "write -P 8 2M 4k")


# -- convert -------------------------------------------------------------------------

def data_bytes(path, fmt):
    return sum(e["length"] for e in json.loads(
        run(["qemu-img", "map", "-f", fmt, "--output=json", path], timeout=60).stdout)
        if e["data"])


def test_convert_round_trip_keeps_sparseness(tmp_path):
    src = mixed_raw(tmp_path / "src.raw")
    qcownbd("convert", "-O", "qcow1", src, tmp_path / "a.qcow")
    qcownbd("convert", "-f", "qcow1", tmp_path / "a.qcow", tmp_path / "b.raw")
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow", src, tmp_path / "a.qcow"], timeout=60)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, tmp_path / "b.raw"], timeout=60)
    assert os.path.getsize(tmp_path / "b.raw") == 4 * MiB
    # zero blocks (holes and written zeros alike) are not copied
    assert data_bytes(tmp_path / "a.qcow", "qcow") == data_bytes(tmp_path / "b.raw", "raw")
    assert data_bytes(tmp_path / "b.raw", "raw") < 4 * 30000 + 70000 + 2 * 4096 + 3 * 4096
    qemu_img("convert", "-O", "qcow", src, tmp_path / "q.qcow")
    assert data_bytes(tmp_path / "a.qcow", "qcow") == data_bytes(tmp_path / "q.qcow", "qcow")


def test_convert_chain_and_compressed_and_backing(chain, compressed, tmp_path):
    qcownbd("convert", compressed, tmp_path / "c.raw")
    run(["qemu-img", "compare", compressed, tmp_path / "c.raw"], timeout=60)
    qcownbd("convert", "-O", "qcow1", chain / "top.qcow", tmp_path / "flat.qcow")
    run(["qemu-img", "compare", chain / "top.qcow", tmp_path / "flat.qcow"], timeout=60)
    # -B: an overlay of base.raw holding only what differs from it
    qcownbd("convert", "-O", "qcow1", "-B", "base.raw", "-F", "raw", chain / "top.qcow",
            chain / "delta.qcow")
    run(["qemu-img", "compare", chain / "top.qcow", chain / "delta.qcow"], timeout=60)
    entries = json.loads(qemu_map(chain / "delta.qcow"))
    own = sum(e["length"] for e in entries if e["depth"] == 0 and e["data"])
    assert own == 4096 + 8192 + 4096 + 1024       # the four writes; zeros over zeros skipped


def test_convert_errors_leave_no_output(tmp_path, chain, unwritable_dir):
    (tmp_path / "dst.raw").write_bytes(b"keep")
    for args, message in (([chain / "top.qcow", tmp_path / "dst.raw"], "already exists"),
                          ([tmp_path / "nope.raw", tmp_path / "o.raw"], "no such file"),
                          ([chain / "top.qcow", tmp_path / "nodir" / "o.raw"], "cannot create"),
                          (["-O", "qcow1", chain / "top.qcow", unwritable_dir / "o.qcow"],
                           "cannot create"),
                          (["-B", "base.raw", chain / "top.qcow", tmp_path / "o.raw"], "-O qcow1"),
                          (["-O", "qcow2", chain / "top.qcow", tmp_path / "o.raw"], "invalid")):
        res = qcownbd("convert", *args, ok=False)
        assert res.returncode != 0 and message in res.stderr and res.stderr.count("\n") == 1
    assert (tmp_path / "dst.raw").read_bytes() == b"keep"
    # a read error mid-way (L2 entry pointing past EOF, §12 #37) removes the half-made DST
    bad = tmp_path / "bad.qcow"
    qemu_img("create", "-f", "qcow", bad, "4M")
    qemu_io(bad, "write -P 1 0 8k")
    data = bytearray(bad.read_bytes())
    l2 = struct.unpack(">Q", data[48:56])[0]
    data[l2 + 8:l2 + 16] = struct.pack(">Q", 1 << 40)
    bad.write_bytes(data)
    res = qcownbd("convert", bad, tmp_path / "half.raw", ok=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert not (tmp_path / "half.raw").exists()


def test_convert_progress_only_on_a_terminal(tmp_path):
    src = mixed_raw(tmp_path / "src.raw")
    assert qcownbd("convert", src, tmp_path / "quiet.raw").stderr == ""
    for extra, shown in (([], True), (["-q"], False)):
        status, output = on_terminal("convert", *extra, src, tmp_path / f"t{shown}.raw")
        assert status == 0
        assert (b"(100.00/100%)" in output) == shown, output


def test_check_progress_only_on_a_terminal(tmp_path):
    image = tmp_path / "tables.qcow"
    run(["qemu-img", "create", "-f", "qcow", image, "64M"])
    # four L2 tables (2 MiB of guest space each): the bar moves by quarters
    run(["qemu-io", "-f", "qcow", *sum((["-c", f"write {n * 8}M 4k"] for n in range(4)), []),
         image])
    assert qcownbd("check", image).stderr == ""
    for extra, shown in (([], True), (["-q"], False)):
        status, output = on_terminal("check", *extra, image)
        assert status == 0
        assert (b"(50.00/100%)" in output and b"(100.00/100%)" in output) == shown, output
