"""Fleet exports: per-client QCOW1 overlays of one read-only golden image.

Real clients (qemu-io, nbdinfo, libnbd, a raw socket client) talk to a real
server; QEMU (qemu-img compare/convert/info) then reads every overlay with
its backing chain and is the oracle for what each client wrote.
"""

import hashlib
import json
import os
import re
import signal
import time
import tomllib
from pathlib import Path

import pytest

from helpers import REPO, children, qcownbd_cmd, qcownbd_env, qemu_io, run, wait_for
from nbdclient import ERR_UNKNOWN, NbdClient
from qcownbd.config import load_config, parse_config
from qcownbd.errors import ConfigError
from qcownbd.config import FleetConfig

pytestmark = pytest.mark.timeout(90)

SIZE = 16 * 1024 * 1024
#: how a refusal of an unknown export shows in the text of `refused`
UNKNOWN = f"{ERR_UNKNOWN:#x}"
# What each client writes (qemu-io commands), applied to a raw copy of the
# golden image they give what that client must see.
WRITES = {"a": ["write -P 0xaa 1M 64k", "write -z 10M 4k"],
          "b": ["write -P 0xbb 1536k 4k"]}
# libnbd (Debian's python3): NBD_OPT_INFO on a new overlay name, then abort
INFO_SCRIPT = """
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.set_export_name("fleet/peek")
h.opt_info()
print(h.get_size())
h.opt_abort()
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["qcow1", "raw"])
def golden(tmp_path, request):
    """(path, format) of a golden image with data at 0-2M and 10-11M, holes elsewhere."""
    fmt = request.param
    path = tmp_path / f"golden.{'qcow' if fmt == 'qcow1' else 'raw'}"
    qemu_fmt = "qcow" if fmt == "qcow1" else "raw"
    run(["qemu-img", "create", "-q", "-f", qemu_fmt, path, str(SIZE)])
    run(["qemu-io", "-f", qemu_fmt, "-c", "write -P 0x11 0 2M", "-c", "write -P 0x33 10M 1M",
         path])
    return path, fmt


def write_config(tmp_path: Path, golden, overlays="persistent", extra="") -> Path:
    path, fmt = golden
    config = tmp_path / "fleet.toml"
    config.write_text(f'[exports.fleet]\ngolden = "{path.name}"\ngolden_format = "{fmt}"\n'
                      f'overlay_dir = "overlays"\noverlays = "{overlays}"\n'
                      f'description = "test fleet"\n{extra}')
    return config


def expected_image(tmp_path: Path, golden, ident: str) -> Path:
    """A raw file holding what client ``ident`` must see: golden plus its writes."""
    path, fmt = golden
    raw = tmp_path / f"expected-{ident}.raw"
    run(["qemu-img", "convert", "-f", "qcow" if fmt == "qcow1" else "raw", "-O", "raw",
         path, raw])
    run(["qemu-io", "-f", "raw", *[arg for cmd in WRITES[ident] for arg in ("-c", cmd)], raw])
    return raw


def refused(port: int, name: str) -> str:
    """The GO refusal text for ``name`` (AssertionError if the server accepts it)."""
    try:
        client = NbdClient.connect(port, name, timeout=10)
    except ValueError as exc:
        return str(exc)
    client.close()
    raise AssertionError(f"export {name!r} was accepted")


def test_overlays_are_isolated_and_qemu_reads_them(tmp_path, golden, qcownbd_server):
    before = sha256(golden[0])
    server = qcownbd_server("--config", write_config(tmp_path, golden))
    for ident, commands in WRITES.items():
        qemu_io(server.uri(f"fleet/{ident}"), *commands, fmt="raw")
    # each client sees its own writes over the golden data, not the other's
    qemu_io(server.uri("fleet/a"), "read -P 0xaa 1M 64k", "read -P 0x11 1536k 4k",
            "read -P 0 10M 4k", "read -P 0x33 10489856 4k", "read -P 0 4M 1M", fmt="raw")
    qemu_io(server.uri("fleet/b"), "read -P 0xbb 1536k 4k", "read -P 0x11 1M 64k",
            "read -P 0x33 10M 4k", fmt="raw")
    listing = run(["nbdinfo", "--list", "--json", server.uri()]).stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert list(exports) == ["fleet"], "overlays are not listed"
    assert "fleet/ID" in exports["fleet"]["description"]
    assert exports["fleet"]["is_read_only"] and exports["fleet"]["export-size"] == SIZE
    # the fleet export itself is the golden image, read-only
    reader = NbdClient.connect(server.port, "fleet")
    assert reader.write(0, b"\1" * 4096) != 0 and reader.read(0, 4096) == b"\x11" * 4096
    reader.close()
    assert server.stop() == 0 and "Traceback" not in server.stderr, server.stderr

    assert sha256(golden[0]) == before, "the golden image was written"
    for ident in WRITES:
        overlay = tmp_path / "overlays" / f"{ident}.qcow"
        info = json.loads(run(["qemu-img", "info", "--output=json", overlay]).stdout)
        assert info["format"] == "qcow" and info["backing-filename"] == str(golden[0])
        expected = expected_image(tmp_path, golden, ident)
        assert run(["qemu-img", "compare", "-f", "raw", expected, "-F", "qcow", overlay],
                   check=False).returncode == 0
        flat = tmp_path / f"flat-{ident}.raw"
        run(["qemu-img", "convert", "-f", "qcow", "-O", "raw", overlay, flat])
        assert flat.read_bytes() == expected.read_bytes()


def test_persistent_overlay_survives_restart_and_is_shared(tmp_path, golden, qcownbd_server):
    config = write_config(tmp_path, golden)
    server = qcownbd_server("--config", config)
    first, second = (NbdClient.connect(server.port, "fleet/p") for _ in range(2))
    assert first.write(3 * 4096, b"\x5a" * 4096) == 0 and first.flush() == 0
    # multi-conn: one backend behind every connection to the overlay
    assert second.read(3 * 4096, 4096) == b"\x5a" * 4096
    first.close()
    second.close()
    assert server.stop() == 0

    server = qcownbd_server("--config", config)
    again = NbdClient.connect(server.port, "fleet/p")
    assert again.read(3 * 4096, 4096) == b"\x5a" * 4096
    assert again.read(0, 4096) == b"\x11" * 4096
    again.close()
    assert NbdClient.connect(server.port, "fleet/q").read(3 * 4096, 4096) == b"\x11" * 4096


def test_ephemeral_overlays_are_deleted(tmp_path, golden, qcownbd_server):
    config = write_config(tmp_path, golden, overlays="ephemeral")
    ephemeral = tmp_path / "overlays" / "ephemeral"
    ephemeral.mkdir(parents=True)
    (ephemeral / ".left.1234.tmp").write_bytes(b"half an overlay")
    kept = tmp_path / "overlays" / "kept.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", golden[0],
         "-F", "qcow" if golden[1] == "qcow1" else "raw", kept])
    server = qcownbd_server("--config", config)
    assert not (ephemeral / ".left.1234.tmp").exists()
    one, two = (NbdClient.connect(server.port, "fleet/e") for _ in range(2))
    overlay = ephemeral / "e.qcow"
    assert overlay.exists()
    assert one.write(0, b"\x77" * 512) == 0 and two.read(0, 512) == b"\x77" * 512
    one.close()
    time.sleep(0.3)
    assert overlay.exists(), "deleted while a client still uses it"
    two.close()
    assert wait_for(lambda: not overlay.exists()), "not deleted after the last client left"
    fresh = NbdClient.connect(server.port, "fleet/e")
    assert fresh.read(0, 512) == b"\x11" * 512
    # a crash leaves the overlay behind; the next start removes it
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    fresh.sock.close()
    assert overlay.exists()
    qcownbd_server("--config", config)
    assert not overlay.exists() and kept.exists()


@pytest.mark.parametrize("golden", ["raw"], indirect=True)
def test_bad_overlay_names_are_refused(tmp_path, golden, qcownbd_server):
    server = qcownbd_server("--config", write_config(tmp_path, golden))
    before = sorted(p for p in tmp_path.rglob("*"))
    for name in ["fleet/../x", "fleet/a/b", "fleet/", "fleet/a\0b", "fleet/" + "x" * 65,
                 "fleet/.hidden", "fleet/a..b", "fleet/-x", "fleet/a b", "fleet/\u00e9t\u00e9",
                 "nofleet/a"]:
        assert UNKNOWN in refused(server.port, name), name
    assert sorted(p for p in tmp_path.rglob("*")) == before, "a refused name created a file"
    longest = "x" * 64
    NbdClient.connect(server.port, f"fleet/{longest}").close()
    assert wait_for((tmp_path / "overlays" / f"{longest}.qcow").exists)
    server.stop()
    assert "Traceback" not in server.stderr


@pytest.mark.parametrize("golden", ["qcow1"], indirect=True)
def test_info_creates_no_overlay_and_foreign_overlays_are_refused(tmp_path, golden,
                                                                  qcownbd_server):
    config = write_config(tmp_path, golden, extra="max_overlays = 2\n")
    server = qcownbd_server("--config", config)
    assert run(["/usr/bin/python3", "-c", INFO_SCRIPT, server.uri()]).stdout.strip() == str(SIZE)
    # at most a hidden temporary until the next lookup: no overlay, nothing to list
    assert not list((tmp_path / "overlays").glob("*.qcow")), "NBD_OPT_INFO created an overlay"
    other = tmp_path / "other.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", other, str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", other, "-F", "raw",
         tmp_path / "overlays" / "foreign.qcow"])
    assert UNKNOWN in refused(server.port, "fleet/foreign")
    NbdClient.connect(server.port, "fleet/one").close()
    # foreign.qcow and one.qcow: max_overlays = 2 is reached
    assert "is full" in refused(server.port, "fleet/two")
    NbdClient.connect(server.port, "fleet/one").close()
    server.stop()
    assert "not the golden image" in server.stderr and "max_overlays=2 reached" in server.stderr
    assert "Traceback" not in server.stderr
    left = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert left == ["foreign.qcow", "one.qcow"], left


def fleet_cli(*args, check=True):
    result = run(qcownbd_cmd("fleet", *args), timeout=60, check=False, env=qcownbd_env())
    if check:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


@pytest.mark.parametrize("golden", ["qcow1"], indirect=True)
def test_cli_list_info_delete_commit(tmp_path, golden, qcownbd_server):
    config = write_config(tmp_path, golden)
    server = qcownbd_server("--config", config)
    for ident, commands in WRITES.items():
        qemu_io(server.uri(f"fleet/{ident}"), *commands, fmt="raw")
    holder = NbdClient.connect(server.port, "fleet/a")
    rows = {r["overlay"]: r for r in json.loads(fleet_cli("list", config, "--json").stdout)}
    assert sorted(rows) == ["fleet/a", "fleet/b"]
    assert rows["fleet/a"]["in-use"] and not rows["fleet/b"]["in-use"]
    assert rows["fleet/a"]["allocated-bytes"] == 64 * 1024 + 4096
    assert rows["fleet/b"]["allocated-bytes"] == 4096
    assert "in use" in fleet_cli("delete", config, "fleet/a", check=False).stderr
    assert "in use" in fleet_cli("commit", config, "a", tmp_path / "new.raw",
                                 check=False).stderr
    holder.close()
    assert wait_for(lambda: not json.loads(
        fleet_cli("info", config, "a", "--json").stdout)["in-use"])

    text = fleet_cli("info", tmp_path / "overlays", "b").stdout
    assert f"golden image: {golden[0]} (qcow1)" in text and "allocated: 4 KiB" in text
    for fmt, name in (("raw", "new.raw"), ("qcow", "new.qcow")):
        fleet_cli("commit", config, "fleet/a", tmp_path / name, "-O", fmt)
        assert run(["qemu-img", "compare", "-f", "raw", expected_image(tmp_path, golden, "a"),
                    "-F", fmt, tmp_path / name], check=False).returncode == 0
    assert "backing-filename" not in run(["qemu-img", "info", "--output=json",
                                          tmp_path / "new.qcow"]).stdout
    assert "already exists" in fleet_cli("commit", config, "a", tmp_path / "new.raw",
                                         check=False).stderr
    for bad in ("../x", "fleet/zz", "other/a", "a/b/c"):
        fleet_cli("info", config, bad, check=False)
    fleet_cli("list", tmp_path / "missing", check=False)
    fleet_cli("delete", config, "a", "fleet/b")
    assert fleet_cli("list", tmp_path / "overlays").stdout.count("\n") == 1
    assert server.stop() == 0


@pytest.mark.parametrize("table, message", [
    ('golden = "g"\noverlay_dir = "o"', "golden_format missing"),
    ('golden = "g"\ngolden_format = "auto"\noverlay_dir = "o"', "golden_format must be"),
    ('golden = "g"\ngolden_format = "raw"\noverlay_dir = "o"\noverlays = "sometimes"',
     "overlays must be"),
    ('golden = "g"\ngolden_format = "raw"\noverlay_dir = "o"\npath = "p"', "unknown key(s) path"),
    ('golden = "g"\ngolden_format = "raw"\noverlay_dir = "o"\nmax_overlays = 0', "at least 1"),
])
def test_config_errors_name_the_problem(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(tomllib.loads(f"[exports.fleet]\n{table}\n"))
    with pytest.raises(ConfigError, match="cannot contain '/'"):
        parse_config(tomllib.loads('[exports."a/b"]\ngolden = "g"\ngolden_format = "raw"\n'
                                   'overlay_dir = "o"\n'))


def test_systemd_example_documents_a_working_fleet():
    """The example's commented fleet table, uncommented, loads with every key set."""
    text = (REPO / "systemd" / "exports.toml").read_text()
    block = re.search(r"^# \[exports\.fleet\]\n(?:#.*\n)+", text, re.MULTILINE).group(0)
    table = "\n".join(line[2:] for line in block.splitlines()
                      if re.match(r"# (\[|\w+ = )", line))
    fleet = parse_config(tomllib.loads(table)).exports["fleet"]
    assert isinstance(fleet, FleetConfig)
    assert fleet.golden == "/var/lib/qcownbd/golden.qcow" and fleet.overlays == "persistent"
    for key in ("golden", "golden_format", "overlay_dir", "overlays", "max_overlays"):
        assert re.search(rf"^# {key} = ", text, re.MULTILINE), key
    assert load_config(str(REPO / "systemd" / "exports.toml")).exports == {}, \
        "the example loads, with no live export"
    assert text.count("# How fleets work:") == 1


@pytest.mark.parametrize("golden", ["qcow1"], indirect=True)
def test_reload_keeps_clients_of_a_changed_fleet(tmp_path, golden, qcownbd_server):
    config = write_config(tmp_path, golden)
    server = qcownbd_server("--config", config)
    old = NbdClient.connect(server.port, "fleet/a")
    assert old.write(0, b"\x42" * 4096) == 0
    # a change that opens the fleet anew (where its golden image's backing files may
    # lie), with a new description
    config.write_text(config.read_text().replace("test fleet", "renamed fleet")
                      + 'backing_dirs = ["."]\n')
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "renamed fleet" in run(["nbdinfo", "--list", server.uri()]).stdout)
    # the retired fleet still serves its client; the new one cannot take the overlay yet
    assert old.write(4096, b"\x43" * 4096) == 0 and old.flush() == 0
    assert UNKNOWN in refused(server.port, "fleet/a")
    NbdClient.connect(server.port, "fleet/b").close()
    old.close()
    assert wait_for(lambda: not json.loads(fleet_cli("info", config, "a", "--json").stdout)
                    ["in-use"])
    new = NbdClient.connect(server.port, "fleet/a")
    assert new.read(0, 8192) == b"\x42" * 4096 + b"\x43" * 4096
    new.close()
    assert server.stop() == 0 and "Traceback" not in server.stderr, server.stderr


def test_reload_of_a_description_keeps_the_fleet_and_its_overlays_open(tmp_path, golden,
                                                                      qcownbd_server):
    """Only the description changes: the open fleet takes it in place, and a second
    client of a busy overlay is served by the same overlay (no 'unavailable')."""
    config = write_config(tmp_path, golden)
    server = qcownbd_server("--config", config)
    old = NbdClient.connect(server.port, "fleet/a")
    assert old.write(0, b"\x42" * 4096) == 0
    config.write_text(config.read_text().replace("test fleet", "renamed fleet"))
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "renamed fleet" in run(["nbdinfo", "--list", server.uri()]).stdout)
    second = NbdClient.connect(server.port, "fleet/a")
    assert second.read(0, 4096) == b"\x42" * 4096
    second.close()
    old.close()
    third = NbdClient.connect(server.port, "fleet/a")
    assert third.read(0, 4096) == b"\x42" * 4096
    third.close()
    assert server.stop() == 0 and "Traceback" not in server.stderr, server.stderr


@pytest.mark.parametrize("golden", ["raw"], indirect=True)
def test_tenant_by_address_binds_an_overlay_to_the_client_that_made_it(tmp_path, golden,
                                                                       qcownbd_server):
    """tenant = "address": 127.0.0.2 makes fleet/a and gets it back; 127.0.0.3 gets the
    answer a name that does not exist gets, and its own overlay works as usual."""
    config = write_config(tmp_path, golden, extra='tenant = "address"\n')
    server = qcownbd_server("--config", config)
    with NbdClient.connect(server.port, "fleet/a", source="127.0.0.2") as owner:
        assert owner.write(0, b"\x42" * 512) == 0 and owner.flush() == 0
    assert (tmp_path / "overlays" / "a.owner").read_text().strip() == "127.0.0.2"
    with pytest.raises(ValueError, match="no export named 'fleet/a'"):
        NbdClient.connect(server.port, "fleet/a", source="127.0.0.3")
    with NbdClient.connect(server.port, "fleet/a", source="127.0.0.2") as owner:
        assert owner.read(0, 512) == b"\x42" * 512
        # a second connection of another client while the overlay is open: refused too
        with pytest.raises(ValueError, match="no export named 'fleet/a'"):
            NbdClient.connect(server.port, "fleet/a", source="127.0.0.3")
    with NbdClient.connect(server.port, "fleet/b", source="127.0.0.3") as other:
        assert other.read(0, 512) != b"\x42" * 512
    assert fleet_cli("delete", config, "a").returncode == 0
    assert not (tmp_path / "overlays" / "a.owner").exists()
    assert server.stop() == 0 and "Traceback" not in server.stderr


@pytest.mark.parametrize("golden", ["raw"], indirect=True)
def test_allow_list_guards_the_fleet_and_its_overlays(tmp_path, golden, qcownbd_server):
    config = write_config(tmp_path, golden, extra='allow = ["192.0.2.0/24"]\n')
    server = qcownbd_server("--config", config)
    for name in ("fleet", "fleet/a"):
        assert UNKNOWN in refused(server.port, name)
    assert "fleet" not in run(["nbdinfo", "--list", server.uri()], check=False).stdout
    assert server.stop() == 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == []


@pytest.mark.parametrize("golden", ["qcow1"], indirect=True)
def test_one_golden_backend_and_one_backend_per_overlay(tmp_path, golden, qcownbd_server):
    server = qcownbd_server("--config", write_config(tmp_path, golden))
    clients = [NbdClient.connect(server.port, name)
               for name in ("fleet/a", "fleet/a", "fleet/b", "fleet/c", "fleet")]
    # the server and its worker processes: each has the golden image open once
    # (or none, the parent of workers), and one of them each overlay
    per_process = [_open_files(pid) for pid in [server.proc.pid, *children(server.proc.pid)]]
    open_files = [path for files in per_process for path in files]
    overlays = tmp_path / "overlays"
    assert all(files.count(str(golden[0])) <= 1 for files in per_process), per_process
    assert open_files.count(str(golden[0])) >= 1, open_files
    for ident in "abc":
        assert open_files.count(str(overlays / f"{ident}.qcow")) == 1, open_files
    for client in clients:
        client.close()
    assert server.stop() == 0


def _open_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
