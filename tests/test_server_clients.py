"""The server against the real clients: libnbd tools, QEMU, nbd-client and fio.

Every test runs on a raw and on a QCOW1 export built by QEMU; QEMU reading
the image directly (or a raw reference file given the same writes) is the
oracle.
"""

import json
import os

import pytest

from helpers import qemu_io, run

SIZE = 64 * 1024 * 1024
QEMU_FMT = {"raw": "raw", "qcow1": "qcow"}
#: what QEMU writes into every test image before the server sees it
LAYOUT = ["write -P 0x5a 0 1M", "write -P 0x11 10M 64k", "write -P 0x77 20M 3M",
          "write -P 0x33 40000 7000"]

pytestmark = pytest.mark.timeout(120)
each_format = pytest.mark.parametrize("fmt", ["raw", "qcow1"])


def qemu_io_clean(fmt, path, *commands):
    """Run qemu-io commands on an image (a file or an nbd:// URI); no error in its output."""
    result = qemu_io(path, *commands,
                     fmt=QEMU_FMT[fmt] if not str(path).startswith("nbd:") else "raw")
    assert "error" not in result.stdout.lower() and "fail" not in result.stdout.lower(), result.stdout
    return result


def make_image(tmp_path, fmt, name="disk", layout=LAYOUT, backing=None):
    """A QEMU-made image with recognisable data and holes."""
    path = tmp_path / f"{name}.{fmt}"
    args = ["qemu-img", "create", "-q", "-f", QEMU_FMT[fmt]]
    if backing:
        args += ["-b", backing[0], "-F", QEMU_FMT[backing[1]]]
    run(args + [path, str(SIZE)])
    if layout:
        qemu_io_clean(fmt, path, *layout)
    return path


def direct_map(fmt, path):
    """QEMU's own allocation map of an image: [(start, length, depth, present, zero, data)]."""
    out = run(["qemu-img", "map", "-U", "--output=json", "-f", QEMU_FMT[fmt], path]).stdout
    return json.loads(out)


def merged(runs):
    """Merge adjacent (start, length, state) runs with equal state."""
    out = []
    for start, length, state in runs:
        if out and out[-1][2] == state and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, state)
        else:
            out.append((start, length, state))
    return out


def nbd_map(uri, context="base:allocation"):
    """nbdinfo --map of an export as [(offset, length, type)]."""
    out = run(["nbdinfo", "--json", f"--map={context}", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


@each_format
def test_nbdinfo_list_json_and_nbd_client_list(fmt, tmp_path, qcownbd_server):
    first, second = make_image(tmp_path, fmt, "first"), make_image(tmp_path, fmt, "second")
    config = tmp_path / "exports.toml"
    config.write_text(f'[exports.alpha]\npath = "{first}"\ndescription = "first disk"\n'
                      f'[exports.beta]\npath = "{second}"\nread_only = true\n')
    server = qcownbd_server("--config", config)
    listing = json.loads(run(["nbdinfo", "--list", "--json", server.uri()]).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"alpha", "beta"}
    assert exports["alpha"]["description"] == "first disk"
    assert exports["alpha"]["export-size"] == SIZE
    assert exports["beta"]["is_read_only"] and not exports["alpha"]["is_read_only"]
    assert exports["alpha"]["block_size_minimum"] == 1
    assert exports["alpha"]["block_size_maximum"] == 32 * 1024 * 1024
    names = run(["nbd-client", "-l", "127.0.0.1", "-p", str(server.port)], timeout=30).stdout
    # one line per export: "name" or "name: description"
    assert {"alpha: first disk", "beta"} <= set(names.splitlines())


@each_format
def test_nbdinfo_can_every_flag(fmt, tmp_path, qcownbd_server):
    from qcownbd.image.probe import open_image

    image = make_image(tmp_path, fmt)
    backend = open_image(str(image), lock=False)
    can_trim, can_fast_zero = backend.can_trim, backend.can_fast_zero
    backend.close()
    server = qcownbd_server(f"rw={image}", f"ro={make_image(tmp_path, fmt, 'ro')}")
    server_ro = qcownbd_server("--read-only", f"ro={make_image(tmp_path, fmt, 'ro2')}")
    expect = {"connect": True, "read": True, "write": True, "flush": True, "fua": True,
              "zero": True, "trim": can_trim, "fast-zero": can_fast_zero, "df": True,
              "multi-conn": True, "cache": True, "structured-reply": True}
    for flag, wanted in expect.items():
        got = run(["nbdinfo", "--can", flag, server.uri("rw")], check=False).returncode == 0
        assert got == wanted, flag
    for flag in ("write", "fua", "zero", "trim", "fast-zero"):
        got = run(["nbdinfo", "--can", flag, server_ro.uri("ro")], check=False).returncode == 0
        assert not got, flag
    for flag in ("read", "flush", "df", "multi-conn", "cache"):
        assert run(["nbdinfo", "--can", flag, server_ro.uri("ro")], check=False).returncode == 0


@each_format
def test_map_over_nbd_matches_qemu_reading_the_image(fmt, tmp_path, qcownbd_server):
    image = make_image(tmp_path, fmt)
    qemu_io_clean(fmt, image, "write -z 8M 1M", "discard 20M 1M")
    server = qcownbd_server(f"d={image}")
    direct = merged([(e["start"], e["length"], (e["zero"], e["data"]))
                     for e in direct_map(fmt, image)])
    over_nbd = run(["qemu-img", "map", "--output=json", server.uri("d")]).stdout
    via_qemu = merged([(e["start"], e["length"], (e["zero"], e["data"]))
                       for e in json.loads(over_nbd)])
    assert via_qemu == direct
    # nbdinfo's view: type bit 0 = hole, bit 1 = zero
    via_nbdinfo = merged([(o, n, (bool(t & 2), not t & 1)) for o, n, t in nbd_map(server.uri("d"))])
    assert via_nbdinfo == direct


@pytest.mark.parametrize("base_fmt", ["raw", "qcow1"])
def test_allocation_depth_on_backing_chain(base_fmt, tmp_path, qcownbd_server):
    base = make_image(tmp_path, base_fmt, "base", layout=["write -P 1 0 4M", "write -P 4 50M 1M"])
    top = make_image(tmp_path, "qcow1", "top", layout=["write -P 2 1M 1M", "write -P 3 30M 512k"],
                     backing=(base.name, base_fmt))
    server = qcownbd_server(f"top={top}")
    expected = merged([(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0)
                       for e in direct_map("qcow1", top)])
    assert merged(nbd_map(server.uri("top"), "qemu:allocation-depth")) == expected
    # QEMU's qcow driver walks the chain one cluster at a time: flatten it once
    flat = tmp_path / "flat.raw"
    run(["qemu-img", "convert", "-U", "-f", "qcow", "-O", "raw", top, flat])
    run(["qemu-img", "compare", "-f", "raw", flat, server.uri("top")])


@each_format
def test_nbdcopy_both_directions_multi_conn(fmt, tmp_path, qcownbd_server):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(6 * 1024 * 1024) + bytes(2 * 1024 * 1024)
                       + os.urandom(1234567))
    os.truncate(source, SIZE)
    image = make_image(tmp_path, fmt, layout=[])
    server = qcownbd_server(f"d={image}")
    run(["nbdcopy", "-C", "4", "--requests=16", source, server.uri("d")])
    back = tmp_path / "back.bin"
    run(["nbdcopy", "-C", "4", server.uri("d"), back])
    assert back.read_bytes() == source.read_bytes()
    assert server.stop() == 0
    run(["qemu-img", "compare", "-f", QEMU_FMT[fmt], "-F", "raw", image, source])


@each_format
def test_qemu_img_info_convert_compare(fmt, tmp_path, qcownbd_server):
    image = make_image(tmp_path, fmt)
    server = qcownbd_server(f"d={image}", f"copy={make_image(tmp_path, fmt, 'copy', layout=[])}")
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri("d")]).stdout)
    assert info["virtual-size"] == SIZE
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-O", "raw", server.uri("d"), out])
    run(["qemu-img", "compare", "-U", "-f", QEMU_FMT[fmt], "-F", "raw", image, out])
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", out, server.uri("copy")])
    run(["qemu-img", "compare", server.uri("d"), server.uri("copy")])


@each_format
def test_qemu_io_unaligned_patterns_match_reference(fmt, tmp_path, qcownbd_server):
    image = make_image(tmp_path, fmt)
    reference = tmp_path / "reference.raw"
    run(["qemu-img", "convert", "-f", QEMU_FMT[fmt], "-O", "raw", image, reference])
    script = ["write -P 0xa1 1000 5000", "write -P 0xb2 65535 131075", "write -z 300001 70000",
              "discard 10M 64k", "write -z 20M 1M", "write -P 0xc3 33554431 2",
              "aio_write -P 0xd4 5000000 4097", "aio_write -P 0xe5 5010000 9000", "aio_flush",
              "write -f -P 0xf6 67100000 8864"]
    server = qcownbd_server(f"d={image}")
    qemu_io_clean("raw", server.uri("d"), *script, "read -P 0xa1 1000 5000",
                  "read -P 0 300001 70000", "read -P 0xf6 67100000 8864",
                  "read -P 0xe5 5010000 9000")
    qemu_io_clean("raw", reference, *script)
    run(["qemu-img", "compare", "-f", "raw", reference, server.uri("d")])
    assert server.stop() == 0
    run(["qemu-img", "compare", "-f", QEMU_FMT[fmt], "-F", "raw", image, reference])


@each_format
def test_fio_verify_random_mixed_sizes(fmt, tmp_path, qcownbd_server):
    server = qcownbd_server(f"d={make_image(tmp_path, fmt, layout=[])}")
    result = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri('d')}",
                  "--rw=randwrite", "--bsrange=512-128k", "--size=24M", "--iodepth=16",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                  "--randrepeat=0", "--output-format=json"], timeout=90,
                 cwd=tmp_path)  # fio leaves its verify state file in the working directory
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 24 * 1024 * 1024
    assert job["read"]["io_bytes"] >= 24 * 1024 * 1024
